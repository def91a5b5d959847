"""The app's configuration: read from the environment once, at start, into a typed value.

Every invalid value is reported at once, so one failed start shows everything to fix.
Each key and its default is documented in README.md.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, replace
from typing import Mapping
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_SQLITE_PATH = "/tmp/skiff-app.db"

# Threads per gunicorn worker (WEB_THREADS): gunicorn.conf.py runs this many, and the app keeps
# one of them free of database work (web.py).
DEFAULT_WEB_THREADS = 4
MAX_WEB_THREADS = 256

# The RDS CA bundle (all regions) that the Dockerfile copies from certs/rds-global-bundle.pem.
# RDS server certificates chain to these roots; see
# https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/UsingWithRDS.SSL.html
DEFAULT_RDS_CA_BUNDLE = "/etc/ssl/certs/rds-global-bundle.pem"

# arn:<partition>:secretsmanager:<region>:<account>:secret:<name>
_SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):[0-9]{12}:secret:\S+$")


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SecretRef:
    """A Secrets Manager secret holding the MySQL user and password as JSON
    {"username": ..., "password": ...}: what RDS keeps for its master user and rotates."""

    arn: str
    region: str
    endpoint_url: str = ""  # AWS_ENDPOINT_URL: an emulator in tests; empty for AWS itself


@dataclass(frozen=True)
class DatabaseUrl:
    """Where the data lives. `dialect` is "sqlite" (uses `path`) or "mysql" (the rest). A MySQL
    database with a `secret` takes its user and password from that secret, not from here."""

    dialect: str
    path: str = ""
    host: str = ""
    port: int = 3306
    user: str = ""
    password: str = ""
    database: str = ""
    ssl_ca: str = ""  # MySQL only: TLS required, the server's chain and host name verified
    secret: SecretRef | None = None

    @classmethod
    def parse(cls, url: str) -> DatabaseUrl:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "sqlite":
            # sqlite:////abs/path.db -> /abs/path.db; sqlite:///rel.db -> rel.db
            path = unquote(url[len("sqlite:///"):]) if url.lower().startswith("sqlite:///") else ""
            if not path or path == ":memory:":
                raise ValueError("a sqlite URL needs a file: sqlite:////absolute/path.db")
            return cls("sqlite", path=path)
        if scheme in ("mysql", "mysql+pymysql", "mariadb"):
            database = parts.path.lstrip("/")
            if not parts.hostname or not database:
                raise ValueError("a mysql URL needs a host and a database: mysql://user:pass@host:3306/db")
            try:
                port = parts.port or 3306
            except ValueError:
                raise ValueError("the port in the mysql URL is not a number") from None
            query = parse_qs(parts.query)
            unknown = sorted(set(query) - {"ssl_ca"})
            if unknown:
                raise ValueError(f"unknown mysql URL parameter(s): {', '.join(unknown)} (known: ssl_ca)")
            return cls(
                "mysql",
                host=parts.hostname,
                port=port,
                user=unquote(parts.username or ""),
                password=unquote(parts.password or ""),
                database=unquote(database),
                ssl_ca=query.get("ssl_ca", [""])[-1],
            )
        raise ValueError(f"unsupported scheme {scheme!r}: use sqlite:/// or mysql://")

    def redacted(self) -> str:
        """The URL without its password, for logs and error messages."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        tls = f", TLS verified against {self.ssl_ca}" if self.ssl_ca else ", no verified TLS"
        if self.secret:
            return f"mysql://{self.host}:{self.port}/{self.database} (login from secret {self.secret.arn}{tls})"
        return f"mysql://{self.user}@{self.host}:{self.port}/{self.database} ({tls[2:]})"


@dataclass(frozen=True)
class Release:
    """The release this process runs, as the skiff agent passes it."""

    tag: str
    digest: str

    def as_dict(self) -> dict[str, str]:
        return {"tag": self.tag, "digest": self.digest}


@dataclass(frozen=True)
class Config:
    database: DatabaseUrl
    release: Release
    migrate_timeout: float  # seconds to wait for the database and the migration lock at start
    db_timeout: float  # seconds for a connection or a query
    web_threads: int = DEFAULT_WEB_THREADS  # gunicorn threads per worker (WEB_THREADS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        problems: list[str] = []

        def seconds(key: str, default: float) -> float:
            raw = env.get(key, "")
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not 0 < value <= 3600:
                problems.append(f"{key}={raw!r}: expected seconds between 0 and 3600")
                return default
            return value

        database = DatabaseUrl("sqlite", path="/dev/null")
        ca_env = env.get("DATABASE_SSL_CA", "")
        if env.get("DATABASE_URL"):
            try:
                database = DatabaseUrl.parse(env["DATABASE_URL"])
            except ValueError as err:
                problems.append(f"DATABASE_URL: {err}")
            if database.dialect == "mysql" and database.ssl_ca:
                _check_ca_bundle(database.ssl_ca, "DATABASE_URL's ssl_ca", problems)
            elif database.dialect == "mysql" and ca_env:
                if _check_ca_bundle(ca_env, "DATABASE_SSL_CA", problems):
                    database = replace(database, ssl_ca=ca_env)
        elif env.get("DATABASE_HOST") or env.get("DATABASE_SECRET_ARN"):
            database = _database_from_secret_env(env, problems) or database
            # Production: always TLS, verified against the RDS bundle unless told otherwise.
            ca = ca_env or DEFAULT_RDS_CA_BUNDLE
            if _check_ca_bundle(ca, "DATABASE_SSL_CA" if ca_env else
                                f"DATABASE_SSL_CA (default {DEFAULT_RDS_CA_BUNDLE})", problems):
                database = replace(database, ssl_ca=ca)
        else:
            database = DatabaseUrl("sqlite", path=env.get("SQLITE_PATH") or DEFAULT_SQLITE_PATH)
            if not os.path.isabs(database.path):
                problems.append(f"SQLITE_PATH={database.path!r}: expected an absolute path")
        # PORT and HOST are read by gunicorn.conf.py; checked here too so all errors come at once.
        port = env.get("PORT", "")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            problems.append(f"PORT={port!r}: expected a TCP port number")
        web_threads = DEFAULT_WEB_THREADS
        raw_threads = env.get("WEB_THREADS", "")
        if raw_threads:
            if raw_threads.isdigit() and 1 <= int(raw_threads) <= MAX_WEB_THREADS:
                web_threads = int(raw_threads)
            else:
                problems.append(f"WEB_THREADS={raw_threads!r}: expected a whole number from 1 to {MAX_WEB_THREADS}")
        release = Release(
            tag=env.get("SKIFF_RELEASE_TAG") or env.get("APP_RELEASE") or "unknown",
            digest=env.get("SKIFF_RELEASE_DIGEST", ""),
        )
        config = cls(
            database=database,
            release=release,
            migrate_timeout=seconds("MIGRATE_TIMEOUT", 60.0),
            db_timeout=seconds("DB_TIMEOUT", 5.0),
            web_threads=web_threads,
        )
        if problems:
            raise ConfigError(problems)
        return config


def _check_ca_bundle(path: str, what: str, problems: list[str]) -> bool:
    """Whether `path` is a readable PEM file with at least one CA certificate; if not, says
    what to do in `problems`."""
    if not os.path.isabs(path):
        problems.append(f"{what}={path!r}: expected an absolute path to a PEM CA bundle")
        return False
    try:
        ctx = ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        problems.append(
            f"{what}: {path} does not exist; set DATABASE_SSL_CA to the PEM bundle of the CAs that"
            " sign the MySQL server's certificate (for RDS: app/certs/rds-global-bundle.pem,"
            f" which the image has at {DEFAULT_RDS_CA_BUNDLE})")
        return False
    except (OSError, ssl.SSLError) as err:
        problems.append(f"{what}: cannot load {path} as a PEM CA bundle: {err}")
        return False
    if not ctx.get_ca_certs():
        problems.append(f"{what}: {path} holds no CA certificate (expected PEM, BEGIN CERTIFICATE)")
        return False
    return True


def _database_from_secret_env(env: Mapping[str, str], problems: list[str]) -> DatabaseUrl | None:
    """MySQL as the skiff stack describes it (DATABASE_HOST, DATABASE_PORT, DATABASE_NAME,
    DATABASE_SECRET_ARN); appends what is wrong to `problems` and then returns None."""
    found: list[str] = []
    host = env.get("DATABASE_HOST", "")
    if not host:
        found.append("DATABASE_SECRET_ARN is set but DATABASE_HOST is not")
    raw_port = env.get("DATABASE_PORT") or "3306"
    port = int(raw_port) if raw_port.isdigit() and 0 < int(raw_port) < 65536 else 0
    if not port:
        found.append(f"DATABASE_PORT={raw_port!r}: expected a TCP port number")
    name = env.get("DATABASE_NAME", "")
    if not name:
        found.append("DATABASE_NAME: needed with DATABASE_HOST (the database stack's DatabaseName)")
    arn = env.get("DATABASE_SECRET_ARN", "")
    match = _SECRET_ARN.match(arn)
    if not arn:
        found.append("DATABASE_SECRET_ARN: needed with DATABASE_HOST (the database stack's SecretArn)")
    elif not match:
        found.append(f"DATABASE_SECRET_ARN={arn!r}: expected arn:aws:secretsmanager:<region>:<account>:secret:<name>")
    problems.extend(found)
    if found or not match:
        return None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or match.group(1)
    secret = SecretRef(arn=arn, region=region, endpoint_url=env.get("AWS_ENDPOINT_URL", ""))
    return DatabaseUrl("mysql", host=host, port=port, database=name, secret=secret)
