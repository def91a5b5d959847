"""Over 600 lines: one test module for one small app, each test short; split by endpoint it
would repeat the database set-up.

The app's tests (stdlib unittest): configuration, migrations (also several migrators at once,
in threads and in processes), the endpoints, liveness and readiness, and TLS to MySQL.

Runs against sqlite files in a temporary directory, or against MySQL/MariaDB when
TEST_DATABASE_URL=mysql://... is set. That database is emptied before every test, so its name
must contain "test"; DATABASE_URL is never read here, so a real one in the environment is safe.
The login-from-a-secret tests also need TEST_AWS_ENDPOINT_URL (a moto server) and, for MySQL,
TEST_TLS_DATABASE_URL: a MySQL server with TLS whose certificate, for the host name in that URL,
TEST_TLS_CA signed (TEST_TLS_OTHER_CA: another CA), and whose user may create users and grant on
its database. The TLS tests need the same. Without them they skip. test.sh provides all of it.

    python3 test.py [-v] [-k pattern]      # last line: "<backend>: N passed, N failed, N skipped"
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid
from dataclasses import replace
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import DEFAULT_RDS_CA_BUNDLE, Config, ConfigError, DatabaseUrl, SecretRef  # noqa: E402
from credentials import Credentials, CredentialsError, SecretsManagerCredentials  # noqa: E402
from migrations import LATEST, Migration, MigrationLockTimeout, migrate, schema_version  # noqa: E402
from store import Database, DatabaseErrors, TlsError  # noqa: E402
from web import create_app  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RDS_BUNDLE = os.path.join(HERE, "certs", "rds-global-bundle.pem")
TEST_URL = os.environ.get("TEST_DATABASE_URL", "")
TLS_URL = os.environ.get("TEST_TLS_DATABASE_URL", "")
TLS_CA = os.environ.get("TEST_TLS_CA", "")
TLS_OTHER_CA = os.environ.get("TEST_TLS_OTHER_CA", "")
AWS_ENDPOINT = os.environ.get("TEST_AWS_ENDPOINT_URL", "")
BACKEND = DatabaseUrl.parse(TEST_URL).dialect if TEST_URL else "sqlite"
DIGEST = "sha256:" + "ab" * 32


_bound: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port that refuses connections: bound by this process, never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _bound.append(s)  # held until the tests end, so no one else can take the port
    return s.getsockname()[1]


class DatabaseTest(unittest.TestCase):
    """Each test gets an empty database: a new sqlite file, or the MySQL test database emptied."""

    def setUp(self) -> None:
        if BACKEND == "sqlite":
            tmp = tempfile.mkdtemp(prefix="skiff-app-test-")
            self.addCleanup(shutil.rmtree, tmp, True)
            self.url = f"sqlite:///{tmp}/app.db"
        else:
            self.url = TEST_URL
            empty_mysql_database(DatabaseUrl.parse(TEST_URL))
        self.db = Database(DatabaseUrl.parse(self.url))

    def applied_versions(self) -> list[int]:
        with self.db.connect() as c:
            return [r["version"] for r in c.query("SELECT version FROM schema_migrations ORDER BY version")]

    def count(self, table: str) -> int:
        with self.db.connect() as c:
            return c.scalar(f"SELECT COUNT(*) FROM {table}")


def empty_mysql_database(url: DatabaseUrl) -> None:
    if "test" not in url.database:
        raise SystemExit(f"refusing to empty database {url.database!r}: its name lacks 'test'")
    with Database(url).connect() as c:
        tables = [r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
        ).fetchall()]
        for t in tables:
            c.execute(f"DROP TABLE `{t}`")


# Migrations for the concurrency tests: the insert would run twice if two migrators both saw
# version 2 as pending, and the CREATE TABLE would fail if two both saw version 1.
COUNTER = [
    Migration(1, "create counter", sqlite=["CREATE TABLE counter (n INTEGER)"],
              mysql=["CREATE TABLE counter (n INTEGER)"]),
    Migration(2, "count once", sqlite=["INSERT INTO counter VALUES (1)"],
              mysql=["INSERT INTO counter VALUES (1)"]),
]


def _migrate_in_process(url: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        results.put(("ok", migrate(Database(DatabaseUrl.parse(url)), timeout=30,
                                   after_read=lambda: time.sleep(0.3))))
    except Exception as err:  # reported to the parent, which fails the test
        results.put(("error", repr(err)))


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        c = Config.from_env({})
        self.assertEqual(c.database, DatabaseUrl("sqlite", path="/tmp/skiff-app.db"))
        self.assertEqual((c.release.tag, c.release.digest), ("unknown", ""))
        self.assertEqual((c.migrate_timeout, c.db_timeout), (60.0, 5.0))

    def test_release_from_agent_then_app_release(self):
        c = Config.from_env({"SKIFF_RELEASE_TAG": "v7", "SKIFF_RELEASE_DIGEST": DIGEST, "APP_RELEASE": "x"})
        self.assertEqual(c.release.as_dict(), {"tag": "v7", "digest": DIGEST})
        self.assertEqual(Config.from_env({"APP_RELEASE": "v6"}).release.tag, "v6")

    def test_mysql_url(self):
        u = DatabaseUrl.parse("mysql://app%40x:p%3A%2Fss@db.internal:3307/notes?ssl_ca=/etc/rds.pem")
        self.assertEqual(
            (u.dialect, u.user, u.password, u.host, u.port, u.database, u.ssl_ca),
            ("mysql", "app@x", "p:/ss", "db.internal", 3307, "notes", "/etc/rds.pem"),
        )
        self.assertNotIn("p:/ss", u.redacted())
        self.assertEqual(DatabaseUrl.parse("mysql+pymysql://u@h/d").port, 3306)

    def test_sqlite_url(self):
        self.assertEqual(DatabaseUrl.parse("sqlite:////var/lib/app/app.db").path, "/var/lib/app/app.db")
        self.assertEqual(DatabaseUrl.parse("sqlite:///data/app.db").path, "data/app.db")

    def test_sqlite_path_is_the_default_when_no_database_is_set(self):
        c = Config.from_env({"SQLITE_PATH": "/data/app.db"})
        self.assertEqual(c.database, DatabaseUrl("sqlite", path="/data/app.db"))
        with self.assertRaises(ConfigError):
            Config.from_env({"SQLITE_PATH": "app.db"})

    def test_mysql_from_the_stack_with_the_login_in_a_secret(self):
        arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:rds!db-1a2b-Xy12Ab"
        env = {"DATABASE_HOST": "db.internal", "DATABASE_PORT": "3307", "DATABASE_NAME": "app",
               "DATABASE_SECRET_ARN": arn, "DATABASE_SSL_CA": RDS_BUNDLE}
        u = Config.from_env(env).database
        self.assertEqual((u.dialect, u.host, u.port, u.database, u.user, u.password, u.ssl_ca),
                         ("mysql", "db.internal", 3307, "app", "", "", RDS_BUNDLE))
        self.assertEqual(u.secret, SecretRef(arn=arn, region="eu-central-1"))
        self.assertIn(arn, u.redacted())
        self.assertEqual(Config.from_env({**env, "DATABASE_PORT": ""}).database.port, 3306)
        # The region: AWS_REGION, then AWS_DEFAULT_REGION, then the ARN's.
        self.assertEqual(Config.from_env({**env, "AWS_DEFAULT_REGION": "us-west-2"}).database.secret.region, "us-west-2")
        s = Config.from_env({**env, "AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "us-west-2",
                             "AWS_ENDPOINT_URL": "http://127.0.0.1:5055"}).database.secret
        self.assertEqual((s.region, s.endpoint_url), ("us-east-2", "http://127.0.0.1:5055"))
        # An explicit DATABASE_URL wins over what the stack passes.
        self.assertEqual(Config.from_env({**env, "DATABASE_URL": "mysql://u:p@h/d"}).database.secret, None)

    def test_stack_database_problems_reported_at_once(self):
        with self.assertRaises(ConfigError) as ctx:
            Config.from_env({"DATABASE_HOST": "db", "DATABASE_PORT": "x", "DATABASE_SSL_CA": RDS_BUNDLE})
        self.assertEqual(len(ctx.exception.problems), 3, ctx.exception.problems)  # port, name, secret
        with self.assertRaises(ConfigError) as ctx:
            Config.from_env({"DATABASE_SECRET_ARN": "rds!db", "DATABASE_NAME": "app",
                             "DATABASE_SSL_CA": RDS_BUNDLE})
        self.assertEqual(len(ctx.exception.problems), 2, ctx.exception.problems)  # host, ARN

    def test_the_stack_database_is_always_tls_verified_against_a_ca_bundle(self):
        arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-1a2b-Xy12Ab"
        env = {"DATABASE_HOST": "db.internal", "DATABASE_NAME": "app", "DATABASE_SECRET_ARN": arn}
        if os.path.exists(DEFAULT_RDS_CA_BUNDLE):  # as in the image
            self.assertEqual(Config.from_env(env).database.ssl_ca, DEFAULT_RDS_CA_BUNDLE)
        else:  # here: the default is missing, and the error says what to set
            with self.assertRaises(ConfigError) as ctx:
                Config.from_env(env)
            self.assertIn("DATABASE_SSL_CA", str(ctx.exception))
            self.assertIn(DEFAULT_RDS_CA_BUNDLE, str(ctx.exception))
        self.assertIn(f"TLS verified against {RDS_BUNDLE}",
                      Config.from_env({**env, "DATABASE_SSL_CA": RDS_BUNDLE}).database.redacted())
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as not_pem:
            not_pem.write("hello\n")
            not_pem.flush()
            for bad in ("/nonexistent/ca.pem", "relative/ca.pem", not_pem.name):
                with self.subTest(ca=bad), self.assertRaises(ConfigError) as ctx:
                    Config.from_env({**env, "DATABASE_SSL_CA": bad, "PORT": "x"})
                self.assertEqual(len(ctx.exception.problems), 2, ctx.exception.problems)
                self.assertIn(bad, ctx.exception.problems[0])

    def test_the_rds_bundle_shipped_in_the_repository(self):
        import ssl

        ctx = ssl.create_default_context(cafile=RDS_BUNDLE)
        names = {dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()}
        # The roots RDS certificates chain to now, for the regions a stack is likely in.
        for region in ("eu-west-1", "eu-central-1", "us-east-1", "us-west-2"):
            for kind in ("RSA2048", "RSA4096", "ECC384"):
                self.assertIn(f"Amazon RDS {region} Root CA {kind} G1", names)

    def test_database_url_tls_from_its_ssl_ca_or_database_ssl_ca(self):
        url = "mysql://u:p@db.internal/app"
        self.assertEqual(Config.from_env({"DATABASE_URL": url}).database.ssl_ca, "")
        self.assertEqual(Config.from_env({"DATABASE_URL": url, "DATABASE_SSL_CA": RDS_BUNDLE}).database.ssl_ca,
                         RDS_BUNDLE)
        self.assertEqual(Config.from_env({"DATABASE_URL": f"{url}?ssl_ca={RDS_BUNDLE}"}).database.ssl_ca,
                         RDS_BUNDLE)
        with self.assertRaises(ConfigError):
            Config.from_env({"DATABASE_URL": f"{url}?ssl_ca=/nonexistent/ca.pem"})

    def test_every_problem_reported_at_once(self):
        with self.assertRaises(ConfigError) as ctx:
            Config.from_env({"DATABASE_URL": "postgres://h/db", "PORT": "http", "MIGRATE_TIMEOUT": "-1"})
        self.assertEqual(len(ctx.exception.problems), 3, ctx.exception.problems)
        for bad in ("sqlite:///:memory:", "sqlite://", "mysql://h", "mysql://h:port/db", "mysql://h/db?x=1"):
            with self.subTest(bad), self.assertRaises(ConfigError):
                Config.from_env({"DATABASE_URL": bad})


class MigrationTests(DatabaseTest):
    def test_fresh_database_gets_every_migration_once(self):
        self.assertEqual(migrate(self.db), [1, 2])
        self.assertEqual(migrate(self.db), [])
        self.assertEqual(self.applied_versions(), [1, 2])
        with self.db.connect() as c:
            self.assertEqual(schema_version(c), LATEST)

    def test_newer_schema_from_a_later_release_is_accepted(self):
        migrate(self.db)
        with self.db.connect() as c:
            c.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 'x')")
        self.assertEqual(migrate(self.db), [])
        resp = create_app(Config.from_env({"DATABASE_URL": self.url})).test_client().get("/ready")
        self.assertEqual(resp.status_code, 200)

    def test_concurrent_migrators_in_threads(self):
        n = 4
        barrier, results, errors = threading.Barrier(n), [], []

        def run():
            barrier.wait()
            try:
                results.append(migrate(self.db, timeout=30, migrations=COUNTER,
                                       after_read=lambda: time.sleep(0.3)))
            except Exception as err:
                errors.append(err)

        threads = [threading.Thread(target=run) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(results, key=len), [[]] * (n - 1) + [[1, 2]])
        self.assertEqual(self.count("counter"), 1)
        self.assertEqual(self.applied_versions(), [1, 2])

    @unittest.skipUnless(BACKEND == "sqlite", "sqlite's journal-mode switch on a new file")
    def test_first_migrators_of_a_new_sqlite_file_all_wait(self):
        # Without after_read's sleep the migrators meet while the first switches the new file to
        # WAL, where sqlite answers "locked" at once instead of waiting (about one round in five
        # failed before the migrator retried until its deadline).
        n, rounds = 4, 40
        for r in range(rounds):
            db = Database(DatabaseUrl.parse(f"{self.url[:-len('.db')]}-{r}.db"))
            barrier, results, errors = threading.Barrier(n), [], []

            def run(db=db, barrier=barrier, results=results, errors=errors):
                barrier.wait()
                try:
                    results.append(migrate(db, timeout=30, migrations=COUNTER))
                except Exception as err:
                    errors.append(err)

            threads = [threading.Thread(target=run) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            self.assertEqual(errors, [], f"round {r}")
            self.assertEqual(sorted(results, key=len), [[]] * (n - 1) + [[1, 2]], f"round {r}")

    def test_concurrent_migrators_in_processes(self):
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        start = time.time() + 0.5  # all start together, as instances of one deployment would
        procs = [ctx.Process(target=_migrate_in_process, args=(self.url, start, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        self.assertTrue(all(kind == "ok" for kind, _ in outcomes), outcomes)
        self.assertEqual(sorted((v for _, v in outcomes), key=len), [[], [], [1, 2]])
        self.assertEqual(self.applied_versions(), [1, 2])

    def test_lock_wait_is_bounded(self):
        if BACKEND == "sqlite":
            holder = self.db.connect()
            holder.execute("BEGIN EXCLUSIVE")
        else:
            holder = self.db.connect()
            name = f"skiff-app-migrate:{DatabaseUrl.parse(self.url).database}"[:64]
            self.assertEqual(holder.scalar("SELECT GET_LOCK(?, 0)", (name,)), 1)
        self.addCleanup(holder.close)
        started = time.monotonic()
        with self.assertRaises(MigrationLockTimeout):
            migrate(self.db, timeout=1)
        self.assertLess(time.monotonic() - started, 5)
        holder.close()
        self.assertEqual(migrate(self.db, timeout=5), [1, 2])

    def test_failed_migration_is_not_recorded_and_a_rerun_completes(self):
        broken = [COUNTER[0], Migration(2, "broken", sqlite=["INSERT INTO nowhere VALUES (1)"],
                                        mysql=["INSERT INTO nowhere VALUES (1)"])]
        with self.assertRaises(DatabaseErrors):
            migrate(self.db, migrations=broken)
        # sqlite rolls the whole run back; MySQL keeps version 1, which it committed.
        self.assertEqual(migrate(self.db, migrations=COUNTER), [1, 2] if BACKEND == "sqlite" else [2])
        self.assertEqual(self.applied_versions(), [1, 2])
        self.assertEqual(self.count("counter"), 1)


class WebTests(DatabaseTest):
    def setUp(self) -> None:
        super().setUp()
        env = {"DATABASE_URL": self.url, "SKIFF_RELEASE_TAG": "v1.2.3", "SKIFF_RELEASE_DIGEST": DIGEST}
        self.client = create_app(Config.from_env(env)).test_client()

    def post(self, body):
        return self.client.post("/notes", json={"body": body})

    def test_create_and_read_a_note(self):
        resp = self.post("  buy milk  ")
        self.assertEqual(resp.status_code, 201)
        note = resp.get_json()
        self.assertEqual((note["body"], note["release_tag"]), ("buy milk", "v1.2.3"))
        self.assertEqual(resp.headers["Location"], f"/notes/{note['id']}")
        self.assertEqual(self.client.get(f"/notes/{note['id']}").get_json(), note)

    def test_list_is_newest_first_and_limited(self):
        for i in range(3):
            self.post(f"note {i}")
        bodies = [n["body"] for n in self.client.get("/notes").get_json()["notes"]]
        self.assertEqual(bodies, ["note 2", "note 1", "note 0"])
        self.assertEqual(len(self.client.get("/notes?limit=2").get_json()["notes"]), 2)
        for bad in ("0", "501", "two", "-1"):
            with self.subTest(limit=bad):
                self.assertEqual(self.client.get(f"/notes?limit={bad}").status_code, 400)

    def test_invalid_notes_are_refused_and_not_stored(self):
        cases = [
            self.client.post("/notes", json={}),
            self.client.post("/notes", json=["body"]),
            self.client.post("/notes", json={"body": 5}),
            self.post("   "),
            self.post("x" * 2001),
            self.client.post("/notes", data="{not json", content_type="application/json"),
        ]
        for resp in cases:
            self.assertEqual(resp.status_code, 400, resp.get_data(as_text=True))
            self.assertEqual(resp.get_json()["error"], "bad request")
        self.assertEqual(self.client.get("/notes").get_json(), {"notes": []})

    def test_unknown_note_route_and_method(self):
        self.assertEqual(self.client.get("/notes/424242").status_code, 404)
        self.assertEqual(self.client.get("/nowhere").get_json()["error"], "not found")
        self.assertEqual(self.client.delete("/notes").status_code, 405)

    def test_page_shows_release_and_escaped_notes(self):
        resp = self.client.post("/notes", data={"body": "<script>alert(1)</script>"})
        self.assertEqual((resp.status_code, resp.headers["Location"]), (303, "/"))
        page = self.client.get("/").get_data(as_text=True)
        self.assertIn("v1.2.3", page)
        self.assertIn(DIGEST, page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertNotIn("<script>", page)

    def test_health_and_ready_ok(self):
        resp = self.client.get("/health")
        self.assertEqual(resp.status_code, 200)
        self.assertEqual(resp.get_json()["status"], "ok")
        self.assertEqual(resp.get_json()["release"], {"tag": "v1.2.3", "digest": DIGEST})
        resp = self.client.get("/ready")
        self.assertEqual(resp.status_code, 200)
        body = resp.get_json()
        self.assertEqual((body["status"], body["database"], body["schema_version"]), ("ready", "ok", LATEST))
        self.assertEqual(body["release"], {"tag": "v1.2.3", "digest": DIGEST})


    def test_every_response_names_the_host_that_served_it(self):
        host = socket.gethostname()
        for resp in (self.client.get("/health"), self.client.get("/"), self.post("x"),
                     self.client.get("/notes/424242"), self.client.get("/nowhere")):
            with self.subTest(path=resp.request.path, status=resp.status_code):
                self.assertEqual(resp.headers.get("X-Served-By"), host)


class UnmigratedTests(DatabaseTest):
    def test_ready_503_and_requests_503_before_the_schema_exists_health_200(self):
        client = create_app(Config.from_env({"DATABASE_URL": self.url}), run_migrations=False).test_client()
        resp = client.get("/ready")
        self.assertEqual((resp.status_code, resp.get_json()["status"]), (503, "unavailable"))
        self.assertEqual(client.get("/health").status_code, 200)
        with self.assertLogs("app.web", "ERROR"):
            resp = client.get("/notes")
        self.assertEqual((resp.status_code, resp.get_json()["error"]), (503, "database unavailable"))

    def test_ready_503_while_the_schema_is_behind(self):
        migrate(self.db, migrations=[m for m in COUNTER if m.version == 1])
        client = create_app(Config.from_env({"DATABASE_URL": self.url}), run_migrations=False).test_client()
        resp = client.get("/ready")
        self.assertEqual(resp.status_code, 503)
        self.assertIn(f"needs {LATEST}", resp.get_json()["database"])
        self.assertEqual(client.get("/health").status_code, 200)


def assert_database_503(test: unittest.TestCase, client) -> None:
    """While the database is away: /health 200, /ready 503 with the reason, the API 503 in JSON
    and the page (also a form post) 503 as a readable page; all with Retry-After."""
    test.assertEqual(client.get("/health").status_code, 200)
    resp = client.get("/ready")
    test.assertEqual((resp.status_code, resp.get_json()["status"]), (503, "unavailable"))
    test.assertTrue(resp.get_json()["database"].startswith("error: "), resp.get_json())
    with test.assertLogs("app.web", "ERROR"):
        api = [client.get("/notes"), client.post("/notes", json={"body": "lost"}), client.get("/notes/1")]
        pages = [client.get("/"), client.post("/notes", data={"body": "lost"}),
                 client.get("/notes", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})]
    for resp in api:
        test.assertEqual((resp.status_code, resp.mimetype), (503, "application/json"))
        test.assertEqual(resp.get_json()["error"], "database unavailable")
        test.assertEqual(resp.headers["Retry-After"], "5")
    for resp in pages:
        test.assertEqual((resp.status_code, resp.mimetype), (503, "text/html"))
        test.assertIn("Notes are unavailable for a moment", resp.get_data(as_text=True))
        test.assertEqual(resp.headers["Retry-After"], "5")


class DatabaseOutageTests(unittest.TestCase):
    """sqlite only: its file's folder moved away and back is the outage. Against MariaDB,
    image-test.sh stops and starts the server under the app the agent runs."""

    def test_database_gone_then_back_without_a_restart(self):
        root = tempfile.mkdtemp(prefix="skiff-app-test-")
        self.addCleanup(shutil.rmtree, root, True)
        folder, away = os.path.join(root, "db"), os.path.join(root, "away")
        os.mkdir(folder)
        client = create_app(Config.from_env({"DATABASE_URL": f"sqlite:///{folder}/app.db",
                                             "SKIFF_RELEASE_TAG": "v-outage"})).test_client()
        self.assertEqual(client.post("/notes", json={"body": "before"}).status_code, 201)
        os.rename(folder, away)
        assert_database_503(self, client)
        os.rename(away, folder)
        self.assertEqual(client.get("/ready").status_code, 200)
        self.assertEqual([n["body"] for n in client.get("/notes").get_json()["notes"]], ["before"])
        self.assertIn("before", client.get("/").get_data(as_text=True))
        self.assertEqual(client.post("/notes", data={"body": "after"}).status_code, 303)


class UnreachableDatabaseTests(unittest.TestCase):
    """Needs no server: a refused port and a missing directory."""

    def test_health_200_ready_and_requests_503_without_a_database(self):
        for url in (f"mysql://u:secret-pw@127.0.0.1:{closed_port()}/db", "sqlite:////nonexistent-dir/app.db"):
            with self.subTest(url=url):
                config = Config.from_env({"DATABASE_URL": url, "DB_TIMEOUT": "1"})
                client = create_app(config, run_migrations=False).test_client()
                assert_database_503(self, client)
                self.assertNotIn("secret-pw", client.get("/ready").get_data(as_text=True))

    def test_start_gives_up_after_the_migrate_timeout(self):
        config = Config.from_env({
            "DATABASE_URL": f"mysql://u:p@127.0.0.1:{closed_port()}/db",
            "MIGRATE_TIMEOUT": "1.5", "DB_TIMEOUT": "1",
        })
        started = time.monotonic()
        with self.assertRaises(DatabaseErrors):
            create_app(config)
        self.assertLess(time.monotonic() - started, 6)


class HungDatabaseTests(unittest.TestCase):
    """A server that takes connections and never answers, as a database that hangs: a listening
    socket that nobody accepts from (the kernel completes the TCP handshake)."""

    def test_one_attempt_at_a_time_waits_the_others_fail_at_once(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        self.addCleanup(listener.close)
        db = Database(DatabaseUrl.parse(f"mysql://u:p@127.0.0.1:{listener.getsockname()[1]}/db"), timeout=1)

        def attempt() -> tuple[str, float]:
            started = time.monotonic()
            try:
                db.connect().close()
                return "connected", time.monotonic() - started
            except Exception as err:
                return type(err).__name__, time.monotonic() - started

        kind, waited = attempt()  # nothing known yet: it waits for the timeout
        self.assertEqual(kind, "OperationalError")
        self.assertGreaterEqual(waited, 0.9)
        barrier, results = threading.Barrier(4), []

        def together():
            barrier.wait()
            results.append(attempt())

        threads = [threading.Thread(target=together) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        results.sort(key=lambda r: r[1])
        self.assertEqual([k for k, _ in results], ["DatabaseBusy"] * 3 + ["OperationalError"], results)
        self.assertLess(results[2][1], 0.5)  # the three that did not wait
        self.assertGreaterEqual(results[3][1], 0.9)
        # No lockout: the next request tries again.
        self.assertEqual(attempt()[0], "OperationalError")


class DatabaseSlotsTests(unittest.TestCase):
    """At most WEB_THREADS - 1 requests of a process use the database at once; the others wait
    SLOT_WAIT at most, then answer 503, so one gunicorn thread stays free for /health."""

    def test_a_hung_database_holds_all_threads_but_one(self):
        listener = socket.socket()  # takes connections, never answers: a database that hangs
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        self.addCleanup(listener.close)
        app = create_app(Config.from_env({
            "DATABASE_URL": f"mysql://u:p@127.0.0.1:{listener.getsockname()[1]}/db",
            "DB_TIMEOUT": "1", "WEB_THREADS": "4"}), run_migrations=False)
        barrier, results = threading.Barrier(5), []

        def ask():
            client = app.test_client()
            barrier.wait()
            started = time.monotonic()
            resp = client.get("/notes")
            results.append((resp.status_code, time.monotonic() - started))

        askers = [threading.Thread(target=ask) for _ in range(5)]
        for t in askers:
            t.start()
        time.sleep(0.5)  # the slots are taken, their attempts still waiting
        started = time.monotonic()
        ready = app.test_client().get("/ready")
        self.assertEqual(ready.status_code, 503)
        self.assertIn("database slot", ready.get_json()["database"])
        self.assertLess(time.monotonic() - started, 0.6)
        for t in askers:
            t.join(30)
        results.sort(key=lambda r: r[1])
        self.assertEqual([code for code, _ in results], [503] * 5, results)
        # Two found no slot and answered within SLOT_WAIT; three waited on the database.
        self.assertLess(results[1][1], 0.6, results)
        self.assertGreaterEqual(results[2][1], 0.9, results)

    def test_a_database_that_answers_serves_every_thread_of_a_busy_worker(self):
        # As gunicorn runs it: WEB_THREADS threads, all asking at once, one slot fewer.
        root = tempfile.mkdtemp(prefix="skiff-app-slots-")
        self.addCleanup(shutil.rmtree, root, True)
        app = create_app(Config.from_env({"DATABASE_URL": f"sqlite:///{root}/app.db", "WEB_THREADS": "4"}))
        self.assertEqual(app.test_client().post("/notes", json={"body": "one"}).status_code, 201)
        barrier, codes = threading.Barrier(4), []

        def ask():
            client = app.test_client()
            barrier.wait()
            for _ in range(25):
                codes.append(client.get("/notes").status_code)

        askers = [threading.Thread(target=ask) for _ in range(4)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(60)
        self.assertEqual(codes, [200] * 100)

    def test_web_threads_is_checked(self):
        for raw in ("0", "x", "-1", "257"):
            with self.subTest(raw=raw), self.assertRaises(ConfigError) as caught:
                Config.from_env({"WEB_THREADS": raw})
            self.assertIn("WEB_THREADS", str(caught.exception))
        self.assertEqual(Config.from_env({"WEB_THREADS": "8"}).web_threads, 8)
        self.assertEqual(Config.from_env({}).web_threads, 4)


class FakeSecretsManager:
    """Stands in for the boto3 client: hands out `value` and counts the reads."""

    def __init__(self, value: str):
        self.value = value
        self.reads = 0

    def get_secret_value(self, SecretId: str) -> dict:
        self.reads += 1
        return {"ARN": SecretId, "SecretString": self.value}


class SecretCredentialsTests(unittest.TestCase):
    """The re-read rules, with a fake client and a fake clock."""

    ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!x-AbCdEf"

    def setUp(self) -> None:
        self.fake = FakeSecretsManager('{"username": "app", "password": "old-pw"}')
        self.now = 100.0
        self.creds = SecretsManagerCredentials(
            SecretRef(self.ARN, "us-east-1"), min_reread_interval=5,
            client_factory=lambda: self.fake, clock=lambda: self.now)

    def test_read_once_and_kept(self):
        self.assertEqual(self.creds.current(), Credentials("app", "old-pw"))
        self.creds.current()
        self.assertEqual(self.fake.reads, 1)
        self.assertNotIn("old-pw", repr(self.creds.current()))

    def test_reread_after_a_rejection_returns_only_a_change_and_is_spaced(self):
        rejected = self.creds.current()
        self.assertIsNone(self.creds.reread(rejected))  # unchanged: nothing new to try
        self.fake.value = '{"username": "app", "password": "new-pw"}'
        self.now += 1
        self.assertIsNone(self.creds.reread(rejected))  # too soon after the last re-read
        self.assertEqual(self.fake.reads, 2)
        self.now += 5
        self.assertEqual(self.creds.reread(rejected), Credentials("app", "new-pw"))
        self.assertEqual(self.creds.current(), Credentials("app", "new-pw"))
        # Another caller rejected with the old login: it gets the new one without a read.
        self.assertEqual(self.creds.reread(rejected), Credentials("app", "new-pw"))
        self.assertEqual(self.fake.reads, 3)

    def test_malformed_secrets_are_fatal_and_never_quoted(self):
        for text in ('{"username": "app"}', "not json hunter2", '["hunter2"]', '{"username": 1, "password": "hunter2"}'):
            with self.subTest(text=text):
                self.fake.value = text
                creds = SecretsManagerCredentials(SecretRef(self.ARN, "us-east-1"),
                                                  client_factory=lambda: self.fake)
                with self.assertRaises(CredentialsError) as ctx:
                    creds.current()
                self.assertFalse(ctx.exception.retryable)
                self.assertIn(self.ARN, str(ctx.exception))
                self.assertNotIn("hunter2", str(ctx.exception))


@unittest.skipUnless(AWS_ENDPOINT, "needs TEST_AWS_ENDPOINT_URL (a moto server)")
class SecretTests(unittest.TestCase):
    """The login read from a Secrets Manager secret in moto, as the skiff stack passes it:
    DATABASE_HOST, DATABASE_PORT, DATABASE_NAME, DATABASE_SECRET_ARN; as in production, over
    TLS verified against DATABASE_SSL_CA (the MySQL server is the TLS one, TEST_TLS_*)."""

    def setUp(self) -> None:
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1"}
        patcher = mock.patch.dict(os.environ, aws)
        patcher.start()
        self.addCleanup(patcher.stop)
        import boto3

        self.sm = boto3.client("secretsmanager", endpoint_url=AWS_ENDPOINT, region_name="us-east-1")
        self.run_id = uuid.uuid4().hex[:10]
        if BACKEND == "mysql":
            if not TLS_URL:
                self.skipTest("needs TEST_TLS_DATABASE_URL and TEST_TLS_CA (test.sh)")
            self.admin = replace(DatabaseUrl.parse(TLS_URL), ssl_ca=TLS_CA)
            empty_mysql_database(self.admin)

    def capture_logs(self) -> CapturedLogs:
        """From now on, every log record, at every level; the test's own AWS calls excepted."""
        logs = CapturedLogs()
        self.addCleanup(logs.close)
        return logs

    def make_secret(self, value: dict) -> str:
        arn = self.sm.create_secret(Name=f"rds!skiff-app-test-{self.run_id}",
                                    SecretString=json.dumps(value))["ARN"]
        self.addCleanup(self.sm.delete_secret, SecretId=arn, ForceDeleteWithoutRecovery=True)
        return arn

    def stack_env(self, arn: str, host: str = "127.0.0.1", port: int = 3306, name: str = "app") -> dict:
        return {"DATABASE_HOST": host, "DATABASE_PORT": str(port), "DATABASE_NAME": name,
                "DATABASE_SECRET_ARN": arn, "AWS_ENDPOINT_URL": AWS_ENDPOINT,
                "DATABASE_SSL_CA": TLS_CA or RDS_BUNDLE,
                "SKIFF_RELEASE_TAG": "v-secret", "MIGRATE_TIMEOUT": "10", "DB_TIMEOUT": "2"}

    def make_mysql_user(self) -> tuple[str, str]:
        """A user of this test's own, on the test database; dropped at the end."""
        admin = self.admin
        user, password = f"skiff_{self.run_id}", f"first-{uuid.uuid4().hex}"
        with Database(admin).connect() as c:
            c.execute(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY ?", (password,))
            c.execute(f"GRANT ALL ON `{admin.database}`.* TO '{user}'@'127.0.0.1'")
        self.addCleanup(self.drop_mysql_user, user)
        return user, password

    def drop_mysql_user(self, user: str) -> None:
        with Database(self.admin).connect() as c:
            c.execute(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'")

    def mysql_env(self, arn: str) -> dict:
        return self.stack_env(arn, host=self.admin.host, port=self.admin.port, name=self.admin.database)

    def test_app_logs_in_with_the_secret(self):
        if BACKEND != "mysql":
            self.skipTest("needs TEST_DATABASE_URL=mysql://...")
        user, password = self.make_mysql_user()
        arn = self.make_secret({"username": user, "password": password, "engine": "mysql"})
        logs = self.capture_logs()
        config = Config.from_env(self.mysql_env(arn))
        client = create_app(config).test_client()
        self.assertEqual(client.post("/notes", json={"body": "from the secret"}).status_code, 201)
        with Database(config.database).connect() as c:
            self.assertTrue(c.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")[0]["Value"], "not TLS")
        self.assertEqual(client.get("/ready").status_code, 200)
        with Database(self.admin).connect() as c:
            self.assertEqual(c.scalar("SELECT body FROM notes"), "from the secret")
        logs.assert_clean(self, password)

    def test_rotated_password_is_picked_up_after_a_login_failure(self):
        if BACKEND != "mysql":
            self.skipTest("needs TEST_DATABASE_URL=mysql://...")
        user, old = self.make_mysql_user()
        arn = self.make_secret({"username": user, "password": old})
        logs = self.capture_logs()
        client = create_app(Config.from_env(self.mysql_env(arn))).test_client()
        self.assertEqual(client.post("/notes", json={"body": "before"}).status_code, 201)

        # What RDS rotation does: a new password in the database and in the secret.
        new = f"second-{uuid.uuid4().hex}"
        with logs.paused():
            with Database(self.admin).connect() as c:
                c.execute(f"ALTER USER '{user}'@'127.0.0.1' IDENTIFIED BY ?", (new,))
            self.sm.put_secret_value(SecretId=arn, SecretString=json.dumps({"username": user, "password": new}))

        with self.assertLogs("app.store", "WARNING") as warned:
            resp = client.post("/notes", json={"body": "after"})
        self.assertEqual(resp.status_code, 201, resp.get_data(as_text=True))
        self.assertIn("re-read from secret", warned.output[0])
        bodies = [n["body"] for n in client.get("/notes").get_json()["notes"]]
        self.assertEqual(bodies, ["after", "before"])
        self.assertEqual(client.get("/ready").status_code, 200)
        logs.assert_clean(self, old, new)

    def test_a_stale_secret_gives_503_without_the_password(self):
        if BACKEND != "mysql":
            self.skipTest("needs TEST_DATABASE_URL=mysql://...")
        user, password = self.make_mysql_user()
        arn = self.make_secret({"username": user, "password": "not-" + password})
        logs = self.capture_logs()
        config = Config.from_env(self.mysql_env(arn))
        with self.assertRaises(DatabaseErrors) as ctx:
            create_app(config)
        self.assertIn("Access denied", str(ctx.exception))
        resp = create_app(config, run_migrations=False).test_client().get("/ready")
        self.assertEqual(resp.status_code, 503)
        self.assertNotIn(password, resp.get_data(as_text=True))
        logs.assert_clean(self, password)

    def test_missing_secret_is_a_clear_error(self):
        arn = f"arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!missing-{self.run_id}-AbCdEf"
        config = Config.from_env(self.stack_env(arn, port=closed_port()))
        started = time.monotonic()
        with self.assertRaises(CredentialsError) as ctx:
            create_app(config)
        self.assertLess(time.monotonic() - started, 5)  # not retried until MIGRATE_TIMEOUT
        self.assertFalse(ctx.exception.retryable)
        self.assertIn("ResourceNotFoundException", str(ctx.exception))
        self.assertIn(arn, str(ctx.exception))
        client = create_app(config, run_migrations=False).test_client()
        resp = client.get("/ready")
        self.assertEqual(resp.status_code, 503)
        self.assertIn("ResourceNotFoundException", resp.get_json()["database"])
        self.assertEqual(client.get("/health").status_code, 200)

    def test_missing_secret_stops_gunicorn_start_with_exit_3(self):
        arn = f"arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!missing-{self.run_id}-AbCdEf"
        env = {**os.environ, **self.stack_env(arn, port=closed_port())}
        env.pop("DATABASE_URL", None)
        here = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=here, env=env,
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, 3, proc.stderr)
        self.assertIn("ResourceNotFoundException", proc.stderr)
        self.assertIn(arn, proc.stderr)


@unittest.skipUnless(TLS_URL and TLS_CA and TLS_OTHER_CA,
                     "needs TEST_TLS_DATABASE_URL, TEST_TLS_CA and TEST_TLS_OTHER_CA (test.sh)")
class TlsTests(unittest.TestCase):
    """MySQL over TLS with the server's chain and host name verified, against a MariaDB whose
    certificate the test CA signed for the name "localhost" only."""

    def url(self, ca: str = TLS_CA, host: str = "") -> DatabaseUrl:
        u = DatabaseUrl.parse(TLS_URL)
        return replace(u, ssl_ca=ca, host=host or u.host)

    def test_connects_encrypted_with_the_ca_that_signed_the_server_certificate(self):
        self.assertEqual(self.url().host, "localhost")
        with Database(self.url()).connect() as c:
            status = {r["Variable_name"]: r["Value"] for r in c.query("SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_cipher', 'Ssl_version')")}
        self.assertTrue(status["Ssl_cipher"], "the session is not encrypted")
        self.assertIn(status["Ssl_version"], ("TLSv1.2", "TLSv1.3"))

    def test_refuses_a_certificate_that_another_ca_signed(self):
        for ca in (TLS_OTHER_CA, RDS_BUNDLE):
            with self.subTest(ca=ca):
                started = time.monotonic()
                with self.assertRaises(TlsError) as ctx:
                    Database(self.url(ca=ca)).wait_until_reachable(time.monotonic() + 20)
                self.assertLess(time.monotonic() - started, 5)  # not retried as if transient
                self.assertIn("certificate verify failed", str(ctx.exception))
                self.assertIn(ca, str(ctx.exception))
                self.assertIn("DATABASE_SSL_CA", str(ctx.exception))

    def test_refuses_a_host_name_the_certificate_does_not_name(self):
        # The same server, reached by its address: its certificate names only "localhost".
        with self.assertRaises(TlsError) as ctx:
            Database(self.url(host="127.0.0.1")).connect()
        self.assertIn("mismatch", str(ctx.exception))
        self.assertIn("127.0.0.1", str(ctx.exception))

    def test_refuses_a_server_without_tls_before_sending_the_login(self):
        if not TEST_URL:
            self.skipTest("needs TEST_DATABASE_URL (a server without TLS)")
        with self.assertRaises(TlsError) as ctx:
            Database(replace(DatabaseUrl.parse(TEST_URL), ssl_ca=TLS_CA)).connect()
        self.assertIn("offers no TLS", str(ctx.exception))

    def test_pages_answer_503_with_the_reason_in_ready(self):
        config = Config.from_env({"DATABASE_URL": f"{TLS_URL}?ssl_ca={TLS_OTHER_CA}"})
        client = create_app(config, run_migrations=False).test_client()
        assert_database_503(self, client)
        self.assertIn("certificate verify failed", client.get("/ready").get_json()["database"])

    def test_start_fails_at_once_with_exit_3_and_says_why(self):
        env = {**os.environ, "DATABASE_URL": f"{TLS_URL}?ssl_ca={TLS_OTHER_CA}", "MIGRATE_TIMEOUT": "30"}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 3, proc.stderr)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("certificate verify failed", proc.stderr)
        self.assertIn(TLS_OTHER_CA, proc.stderr)
        self.assertNotIn(DatabaseUrl.parse(TLS_URL).password, proc.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket: (status, headers, body).
    Raises ConnectionError when the server closed the connection before a whole response."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the response's headers: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of the response's body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class Gunicorn:
    """The app as the image runs it: gunicorn with gunicorn.conf.py, on sqlite in a temporary
    directory, the port from PORT. Stopped (and killed if need be) by stop()."""

    def __init__(self, tmp: str, **env: str):
        self.port = free_port()
        self.log = open(os.path.join(tmp, "gunicorn.log"), "w+")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
        child_env.update(PORT=str(self.port), HOST="127.0.0.1",
                         SQLITE_PATH=os.path.join(tmp, "app.db"), **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
            cwd=HERE, env=child_env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"gunicorn did not listen on {self.port}:\n{self.output()}") from None
                time.sleep(0.1)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode()


@unittest.skipIf(TEST_URL, "the server's behaviour is checked once, on sqlite")
class ServeTests(unittest.TestCase):
    """What skiff's handover needs from the app as served (README.md, "The handover contract"):
    the port from PORT, connections kept alive (longer than the load balancer's idle timeout),
    and on SIGTERM the request in flight finished while idle connections are closed at once."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="skiff-app-serve-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def serve(self, **env: str) -> Gunicorn:
        server = Gunicorn(self.tmp, **env)
        self.addCleanup(server.stop)
        return server

    def test_settings_keep_alive_past_the_alb_idle_timeout_and_stop_before_the_agent_kills(self):
        spec = importlib.util.spec_from_file_location("gunicorn_conf", os.path.join(HERE, "gunicorn.conf.py"))
        conf = importlib.util.module_from_spec(spec)
        with mock.patch.dict(os.environ, {"WEB_THREADS": "1"}):
            spec.loader.exec_module(conf)
        self.assertGreater(conf.keepalive, 60, "keep-alive must outlast the ALB's 60 s idle timeout")
        self.assertLess(conf.graceful_timeout, 30, "must end before the agent's default stop_timeout")
        # Even with one thread: not the sync worker, which keeps no connection alive.
        self.assertEqual(conf.worker_class, "worker.HandoverWorker")

    def test_listens_on_port_from_the_environment(self):
        server = self.serve(WEB_CONCURRENCY="1")
        with server.connect() as sock:
            sock.sendall(get("/health"))
            status, _, body = read_response(sock)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["status"], "ok")
        self.assertIn(f"Listening at: http://127.0.0.1:{server.port}", server.output())

    def test_one_connection_serves_two_requests_also_after_an_idle_pause(self):
        # One thread: gunicorn would pick its sync worker (no keep-alive) were the class not named.
        server = self.serve(WEB_CONCURRENCY="1", WEB_THREADS="1")
        with server.connect() as sock:
            sock.sendall(get("/health"))
            status, headers, _ = read_response(sock)
            self.assertEqual(status, 200)
            self.assertNotEqual(headers.get("connection", "").lower(), "close")
            # Longer than gunicorn's default keep-alive (2 s), which would have closed it by now.
            self.assertFalse(closed_by_peer(sock, 3), "the idle connection was closed within 3 s")
            sock.sendall(get("/ready"))
            status, _, body = read_response(sock)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["status"], "ready")

    def test_sigterm_finishes_the_request_in_flight_and_closes_idle_connections_at_once(self):
        # One worker, so that the idle connection and the request in flight share it: that is
        # where gthread alone would leave the idle one open until the slow request ended.
        server = self.serve(WEB_CONCURRENCY="1")
        idle = server.connect()
        self.addCleanup(idle.close)
        idle.sendall(get("/health"))
        self.assertEqual(read_response(idle)[0], 200)

        # A request in flight: headers and half of the body sent, the app waiting for the rest.
        body = json.dumps({"body": "written across a SIGTERM"}).encode()
        slow = server.connect()
        self.addCleanup(slow.close)
        slow.sendall(b"POST /notes HTTP/1.1\r\nHost: app\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.5)

        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        self.assertTrue(closed_by_peer(idle, 2), "the idle kept-alive connection stayed open after SIGTERM")
        self.assertLess(time.monotonic() - sent, 1.5)
        self.assertIsNone(server.proc.poll(), "gunicorn exited with a request in flight")

        time.sleep(1)
        slow.sendall(body[10:])
        status, headers, answer = read_response(slow)
        self.assertEqual(status, 201, answer)
        self.assertEqual(json.loads(answer)["body"], "written across a SIGTERM")
        self.assertTrue(closed_by_peer(slow, 5), "the connection stayed open after its response")
        self.assertEqual(server.proc.wait(15), 0, server.output())


class CapturedLogs(logging.Handler):
    """Every log record of every logger, at every level, while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._paused = False
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        if not self._paused:
            self.lines.append(record.getMessage())

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)
        super().close()

    def assert_clean(self, test: unittest.TestCase, *secrets: str) -> None:
        test.assertTrue(self.lines, "no log lines captured at all")
        for s in secrets:
            test.assertFalse([line for line in self.lines if s in line], "a password was logged")


if __name__ == "__main__":
    result = unittest.main(exit=False).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    print(f"{BACKEND}: {result.testsRun - failed - skipped} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed or not result.testsRun else 0)
