"""The web app: notes as JSON and as a page; a liveness check and a readiness check.

Routes:
  GET  /              page with the release this process runs and the latest notes
  GET  /notes         {"notes": [...]}, newest first; ?limit=1..500 (default 50)
  POST /notes         JSON {"body": "..."} -> 201 and the note; a form post -> 303 to /
  GET  /notes/<id>    one note, or 404
  GET  /health        liveness: 200 {"status": "ok", ...} whenever this process serves requests.
                      It never asks the database: the skiff agent probes it, and the load
                      balancer follows the agent, so a database outage must not fail it (the
                      group would replace every instance, and the new ones would not help).
  GET  /ready         readiness/detail: 200 {"status": "ready", ...} when the database answers
                      and its schema is current; 503 {"status": "unavailable", "database":
                      "<why>"} otherwise. For people, dashboards and the agent's /status.
Every response carries `X-Served-By: <host name>`: which instance behind the load balancer answered.
While the database is away, pages answer 503 with a readable page and the API 503 with JSON;
each request opens its own connection, so the first request after it is back succeeds.
At most WEB_THREADS - 1 requests of a process use the database at once (DatabaseSlots): the
last thread stays free for /health even when every other one waits on a database that hangs.
"""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import contextmanager
from typing import Any

from flask import Flask, g, jsonify, redirect, render_template, request
from werkzeug.exceptions import HTTPException

from config import Config
from migrations import LATEST, migrate, schema_version
from store import Connection, Database, DatabaseBusy, DatabaseErrors, add_note, get_note, list_notes

log = logging.getLogger("app.web")

MAX_BODY = 2000
MAX_LIMIT = 500
# Seconds /ready waits for the database: it is fetched every few seconds and must answer fast.
READY_TIMEOUT = 2.0
# What a 503 while the database is away suggests to clients and browsers.
RETRY_AFTER_SECONDS = 5
# Seconds a request waits for a database slot before it answers 503. Short: while the database
# hangs, a request waiting here holds the one thread kept for /health, and the agent's probe
# gives up after 1 s. With a database that answers, slots free within milliseconds.
SLOT_WAIT = 0.25


class DatabaseSlots:
    """How many requests of this process may use the database at once: one fewer than the
    threads of a gunicorn worker (at least one). When the database hangs (a failover, a dropped
    route), every request that reaches it waits up to DB_TIMEOUT; without this bound the first
    requests of an outage could take every thread, and /health, which never asks the database,
    would queue behind them until the agent's probe timed out and the load balancer took the
    instance out (CI saw it: 4 clients on a paused MariaDB, /healthz 503 for a second).
    A request that finds no slot within SLOT_WAIT fails with DatabaseBusy (a 503)."""

    def __init__(self, threads: int, wait: float = SLOT_WAIT):
        self.size = max(1, threads - 1)
        self.wait = wait
        self._free = threading.BoundedSemaphore(self.size)

    def acquire(self) -> None:
        if not self._free.acquire(timeout=self.wait):
            raise DatabaseBusy(
                f"all {self.size} database slot(s) of this process are in use (each thread but one"
                f" may use the database) and none freed within {self.wait:g} s")

    def release(self) -> None:
        self._free.release()

    @contextmanager
    def held(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class BadRequest(Exception):
    pass


def create_app(config: Config | None = None, *, run_migrations: bool = True) -> Flask:
    """Builds the app. Unless told otherwise, first brings the schema up to date, waiting for the
    database at most `config.migrate_timeout` seconds; raises if that fails."""
    config = config or Config.from_env()
    db = Database(config.database, timeout=config.db_timeout)
    slots = DatabaseSlots(config.web_threads)
    if run_migrations:
        applied = migrate(db, timeout=config.migrate_timeout)
        log.info(
            "database %s at schema version %d (applied now: %s)",
            config.database.redacted(), LATEST, applied or "none",
        )
    release = config.release
    hostname = socket.gethostname()
    app = Flask(__name__)

    def conn() -> Connection:
        if "db" not in g:
            if not g.get("db_slot"):
                slots.acquire()
                g.db_slot = True  # released at the end of the request, whatever happens
            g.db = db.connect()
        return g.db

    @app.teardown_appcontext
    def close_connection(_exc: BaseException | None) -> None:
        c = g.pop("db", None)
        if c is not None:
            c.close()
        if g.pop("db_slot", False):
            slots.release()

    @app.get("/")
    def index() -> Any:
        return render_template(
            "index.html", notes=list_notes(conn(), 50), release=release, hostname=hostname
        )

    @app.get("/notes")
    def notes_list() -> Any:
        raw = request.args.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadRequest(f"limit must be a number from 1 to {MAX_LIMIT}")
        return jsonify(notes=list_notes(conn(), int(raw)))

    @app.post("/notes")
    def notes_create() -> Any:
        from_form = not request.is_json
        if from_form:
            body = request.form.get("body")
        else:
            data = request.get_json(silent=True)
            body = data.get("body") if isinstance(data, dict) else None
        if not isinstance(body, str) or not body.strip():
            raise BadRequest('expected a non-empty "body" (JSON {"body": "..."} or a form field)')
        if len(body) > MAX_BODY:
            raise BadRequest(f"body is longer than {MAX_BODY} characters")
        note = add_note(conn(), body.strip(), release.tag)
        if from_form:
            return redirect("/", code=303)
        return jsonify(note), 201, {"Location": f"/notes/{note['id']}"}

    @app.get("/notes/<int:note_id>")
    def notes_get(note_id: int) -> Any:
        note = get_note(conn(), note_id)
        if note is None:
            return jsonify(error="not found", detail=f"no note {note_id}"), 404
        return jsonify(note)

    @app.get("/health")
    def health() -> Any:
        return jsonify(status="ok", release=release.as_dict(), hostname=hostname)

    @app.get("/ready")
    def ready() -> Any:
        # Its own short-lived connection: the check must not depend on a request's state.
        status = {"release": release.as_dict(), "hostname": hostname, "schema_needed": LATEST}
        try:
            with slots.held(), db.connect(timeout=min(READY_TIMEOUT, config.db_timeout)) as c:
                version = schema_version(c)
        except DatabaseErrors as err:
            return jsonify(status="unavailable", database=f"error: {err}", **status), 503
        if version is None or version < LATEST:
            return jsonify(
                status="unavailable",
                database=f"schema at version {version}, this release needs {LATEST}",
                schema_version=version,
                **status,
            ), 503
        return jsonify(status="ready", database="ok", schema_version=version, **status)

    @app.after_request
    def served_by(response: Any) -> Any:
        # Which host answered, on every response (errors too): behind a load balancer the
        # integration checks (app/integration.py) tell the instances apart by it.
        response.headers["X-Served-By"] = hostname
        return response

    @app.errorhandler(BadRequest)
    def bad_request(err: BadRequest) -> Any:
        return jsonify(error="bad request", detail=str(err)), 400

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Any:
        return jsonify(error=(err.name or "error").lower(), detail=err.description), err.code

    def wants_page() -> bool:
        """A person with a browser (the page, a form post, or an Accept that prefers HTML)
        rather than an API client."""
        if request.endpoint == "index" or (request.endpoint == "notes_create" and not request.is_json):
            return True
        best = request.accept_mimetypes.best_match(["application/json", "text/html"])
        return best == "text/html"

    for kind in DatabaseErrors:

        @app.errorhandler(kind)
        def database_error(err: Exception) -> Any:
            log.error("database error on %s %s: %s", request.method, request.path, err)
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            if wants_page():
                page = render_template("unavailable.html", release=release, hostname=hostname,
                                       retry_after=RETRY_AFTER_SECONDS)
                return page, 503, headers
            return jsonify(
                error="database unavailable",
                detail="the notes database does not answer; try again in a few seconds",
            ), 503, headers

    return app
