"""The schema, as an ordered list of versioned migrations, and the code that applies them.

Applied versions are recorded in `schema_migrations`. Any number of instances may start at once:
each takes a lock before it reads what is applied, so every migration runs exactly once.
  * sqlite: `BEGIN EXCLUSIVE`; the whole run is one transaction (sqlite's DDL is transactional).
  * MySQL/MariaDB: `GET_LOCK` on a name derived from the database. MySQL commits DDL implicitly, so
    each migration is recorded right after it ran; keep MySQL migrations to one statement each so
    that a crash cannot leave one half-applied.
Migrations only add (tables, nullable or defaulted columns): a rollback to an older release then
still works against the newer schema, which is why versions newer than this code are accepted.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

from store import Connection, Database, DatabaseErrors

log = logging.getLogger("app.migrations")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: Sequence[str]
    mysql: Sequence[str]

    def statements(self, dialect: str) -> Sequence[str]:
        return self.sqlite if dialect == "sqlite" else self.mysql


MIGRATIONS: Sequence[Migration] = (
    Migration(
        1,
        "create notes",
        sqlite=[
            "CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " body TEXT NOT NULL, created_at TEXT NOT NULL)"
        ],
        mysql=[
            "CREATE TABLE IF NOT EXISTS notes (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
            " body TEXT NOT NULL, created_at VARCHAR(20) NOT NULL)"
            " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        ],
    ),
    Migration(
        2,
        "notes remember the release that wrote them",
        sqlite=["ALTER TABLE notes ADD COLUMN release_tag TEXT NOT NULL DEFAULT ''"],
        mysql=["ALTER TABLE notes ADD COLUMN release_tag VARCHAR(255) NOT NULL DEFAULT ''"],
    ),
)
LATEST = max(m.version for m in MIGRATIONS)


class MigrationError(RuntimeError):
    pass


class MigrationLockTimeout(MigrationError):
    pass


def migrate(
    db: Database,
    *,
    timeout: float = 60.0,
    migrations: Sequence[Migration] = MIGRATIONS,
    after_read: Callable[[], None] | None = None,
) -> list[int]:
    """Applies the migrations not yet applied and returns their versions. Waits at most
    `timeout` seconds in all, for the database to be reachable and for the lock.
    `after_read` runs between reading the applied versions and applying: tests use it to widen
    the window in which two unsynchronised migrators would both apply the same migration."""
    deadline = time.monotonic() + timeout
    db.wait_until_reachable(deadline)
    if db.dialect == "sqlite":
        # sqlite's busy timeout is the wait for the lock.
        with db.connect(timeout=max(0.1, deadline - time.monotonic())) as conn:
            return _migrate_sqlite(conn, migrations, after_read, deadline)
    with db.connect() as conn:
        return _migrate_mysql(conn, migrations, after_read, deadline)


def _migrate_sqlite(conn: Connection, migrations, after_read, deadline: float) -> list[int]:
    while True:
        try:
            # WAL lets readers go on while a writer writes; the mode is stored in the database
            # file.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN EXCLUSIVE")
            break
        except DatabaseErrors as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            # sqlite answers "locked" at once, without waiting out the busy timeout, where
            # waiting could deadlock (another connection switching the journal mode, or
            # holding a lock this one would need): try again until the deadline.
            if time.monotonic() >= deadline:
                raise MigrationLockTimeout("timed out waiting for the sqlite migration lock") from err
            time.sleep(0.05)
    try:
        applied = _apply_pending(conn, migrations, after_read)
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except DatabaseErrors:
            pass  # the connection is gone, and with it the transaction
        raise
    return applied


def _migrate_mysql(conn: Connection, migrations, after_read, deadline: float) -> list[int]:
    # One lock per database, so apps sharing a server do not wait for each other. Max 64 chars.
    name = f"skiff-app-migrate:{conn.scalar('SELECT DATABASE()')}"[:64]
    while True:
        # Whole seconds (what every server version takes), short enough to stay well inside the
        # connection's read timeout; the last wait may overrun the deadline by under a second.
        wait = max(1, min(2, math.ceil(deadline - time.monotonic())))
        got = conn.scalar("SELECT GET_LOCK(?, ?)", (name, wait))
        if got == 1:
            break
        if got is None:
            raise MigrationError(f"GET_LOCK({name!r}) failed")
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout(f"timed out waiting for the MySQL lock {name!r}")
    try:
        return _apply_pending(conn, migrations, after_read)
    finally:
        # Also released when the session ends, should this process die holding it.
        conn.scalar("SELECT RELEASE_LOCK(?)", (name,))


def _apply_pending(conn: Connection, migrations, after_read) -> list[int]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER NOT NULL PRIMARY KEY,"
        " name VARCHAR(255) NOT NULL, applied_at VARCHAR(20) NOT NULL)"
    )
    applied = {row["version"] for row in conn.query("SELECT version FROM schema_migrations")}
    if after_read:
        after_read()
    done = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in applied:
            continue
        log.info("applying migration %d: %s", m.version, m.name)
        for statement in m.statements(conn.dialect):
            conn.execute(statement)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (m.version, m.name, now),
        )
        done.append(m.version)
    return done


def schema_version(conn: Connection) -> int | None:
    """The newest applied version; raises when no migration ever ran (no table)."""
    return conn.scalar("SELECT MAX(version) FROM schema_migrations")
