"""Storage: one small connection type over sqlite3 and PyMySQL, and the notes queries.

SQL is written once with `?` placeholders; the MySQL side translates them. Connections run in
autocommit mode and open a transaction only where one is wanted (migrations), so both engines
behave the same way.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from datetime import datetime, timezone
from typing import Any, Sequence

import pymysql

from config import DatabaseUrl
from credentials import Credentials, CredentialsError, FixedCredentials, SecretsManagerCredentials

log = logging.getLogger("app.store")



class TlsError(Exception):
    """The MySQL server's TLS could not be verified (wrong CA, wrong host name, no TLS at all).
    Not transient: someone has to fix the CA bundle or the host name."""


class DatabaseBusy(Exception):
    """MySQL did not answer this process's last connection attempt, and another request is
    trying it now: this one fails at once instead of waiting as well."""


# What a failing database raises, whichever engine, and a login that cannot be read; callers
# catch this, never engine types.
DatabaseErrors: tuple[type[Exception], ...] = (
    sqlite3.Error, pymysql.err.Error, CredentialsError, TlsError, DatabaseBusy,
)

# A handshake cut short (a server restarting, a connection reset): worth another try, unlike a
# certificate that does not verify.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)

# "SSL connection error": PyMySQL's refusal when TLS is required and the server offers none.
_MYSQL_SSL_CONNECTION_ERROR = 2026

# "Access denied for user": a wrong password, e.g. the secret was rotated since it was read.
_MYSQL_LOGIN_REJECTED = 1045

# MySQL client errors that mean "not reachable (yet)": can't connect, lost connection, too many
# connections, server shutting down. Worth a retry at start; anything else is not.
_MYSQL_TRANSIENT = {1040, 1053, 2002, 2003, 2006, 2013}
# Of those, the ones that say the server is away (refused, timed out, gone).
_MYSQL_UNREACHABLE = {2002, 2003, 2006, 2013}


class Connection:
    def __init__(self, raw: Any, dialect: str):
        self.raw = raw
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self.dialect == "mysql":
            sql = sql.replace("?", "%s")
        cursor = self.raw.cursor()
        cursor.execute(sql, tuple(params))
        return cursor

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        try:
            self.raw.close()
        except DatabaseErrors:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mysql_code(err: Exception) -> object:
    return err.args[0] if err.args else None


class Database:
    def __init__(self, url: DatabaseUrl, timeout: float = 5.0,
                 credentials: FixedCredentials | SecretsManagerCredentials | None = None):
        self.url = url
        self.timeout = timeout
        if credentials is None:
            credentials = (SecretsManagerCredentials(url.secret, timeout=timeout) if url.secret
                           else FixedCredentials(url.user, url.password))
        self.credentials = credentials
        self._tls = tls_context(url.ssl_ca) if url.dialect == "mysql" and url.ssl_ca else None
        # While MySQL is unreachable, one connection attempt at a time in this process; the
        # others fail at once. A server that hangs (a failover, a dropped route) then holds one
        # thread for DB_TIMEOUT, not every thread, and /health keeps answering the agent. Any
        # attempt that gets through clears it: recovery is on the next request.
        self._unreachable = False
        self._trial = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.url.dialect

    def connect(self, timeout: float | None = None) -> Connection:
        """Opens a connection; `timeout` bounds the connect and each query (and sqlite's wait
        for a lock)."""
        timeout = self.timeout if timeout is None else timeout
        u = self.url
        if u.dialect == "sqlite":
            raw = sqlite3.connect(u.path, timeout=timeout, isolation_level=None)
            return Connection(raw, "sqlite")
        if not self._unreachable:
            return self._connect_noting_reachability(timeout)
        if not self._trial.acquire(blocking=False):
            raise DatabaseBusy(
                f"MySQL at {u.host}:{u.port} did not answer the last attempt, and another"
                " request is trying it now")
        try:
            return self._connect_noting_reachability(timeout)
        finally:
            self._trial.release()

    def _connect_noting_reachability(self, timeout: float) -> Connection:
        try:
            conn = self._connect_with_login(timeout)
        except pymysql.err.OperationalError as err:
            if _mysql_code(err) in _MYSQL_UNREACHABLE:
                self._unreachable = True
            raise
        self._unreachable = False
        return conn

    def _connect_with_login(self, timeout: float) -> Connection:
        login = self.credentials.current()
        try:
            raw = self._connect_mysql(login, timeout)
        except pymysql.err.OperationalError as err:
            if _mysql_code(err) != _MYSQL_LOGIN_REJECTED:
                raise
            fresh = self.credentials.reread(login)
            if fresh is None:
                raise
            log.warning("MySQL rejected the login; retrying once with the one re-read from %s",
                        self.credentials.source)
            raw = self._connect_mysql(fresh, timeout)
        return Connection(raw, "mysql")

    def _connect_mysql(self, login: Credentials, timeout: float) -> Any:
        u = self.url
        try:
            return pymysql.connect(
                host=u.host,
                port=u.port,
                user=login.user,
                password=login.password,
                database=u.database,
                charset="utf8mb4",
                autocommit=True,
                connect_timeout=max(1, round(timeout)),
                read_timeout=max(1, round(timeout)),
                write_timeout=max(1, round(timeout)),
                ssl=self._tls,
            )
        except ssl.SSLError as err:
            if isinstance(err, _TLS_CUT):
                raise
            raise self._tls_failed(err) from None
        except pymysql.err.OperationalError as err:
            # PyMySQL wraps every OSError of the handshake, ssl.SSLError included, as "can't
            # connect" (2003), which would pass for transient; the original tells them apart.
            original = getattr(err, "original_exception", None)
            if isinstance(original, ssl.SSLError) and not isinstance(original, _TLS_CUT):
                raise self._tls_failed(original) from None
            if self._tls is not None and _mysql_code(err) == _MYSQL_SSL_CONNECTION_ERROR:
                raise TlsError(
                    f"MySQL at {u.host}:{u.port} offers no TLS, and this app requires it"
                    f" ({err.args[1] if len(err.args) > 1 else err}); enable TLS on the server"
                ) from None
            raise

    def _tls_failed(self, err: ssl.SSLError) -> TlsError:
        # The handshake fails before any credential is sent.
        u = self.url
        if isinstance(err, ssl.SSLCertVerificationError):
            why = f"certificate verify failed: {err.verify_message}"
        else:
            why = getattr(err, "reason", "") or str(err)
        return TlsError(
            f"TLS to MySQL at {u.host}:{u.port} failed: {why} (CA bundle {u.ssl_ca}). Check that"
            " DATABASE_SSL_CA holds the CA that signed the server's certificate and that the host"
            " name is one the certificate names (for RDS: the endpoint address, not an IP"
            " address or a CNAME)"
        )

    def wait_until_reachable(self, deadline: float) -> None:
        """Retries connecting, with backoff, while the server (or Secrets Manager) is not
        reachable, until the monotonic `deadline`; then raises the last error. Other errors are
        raised at once."""
        delay = 0.2
        while True:
            try:
                self.connect().close()
                return
            except (pymysql.err.OperationalError, CredentialsError, DatabaseBusy) as err:
                transient = (err.retryable if isinstance(err, CredentialsError)
                             else isinstance(err, DatabaseBusy) or _mysql_code(err) in _MYSQL_TRANSIENT)
                if not transient or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def tls_context(ca_bundle: str) -> ssl.SSLContext:
    """TLS that verifies the server's chain against `ca_bundle` and its host name; TLS 1.2 or
    newer. Built once per Database: loading a bundle of a hundred certificates costs time."""
    ctx = ssl.create_default_context(cafile=ca_bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


NOTE_COLUMNS = "id, body, created_at, release_tag"


def add_note(conn: Connection, body: str, release_tag: str) -> dict[str, Any]:
    cursor = conn.execute(
        "INSERT INTO notes (body, created_at, release_tag) VALUES (?, ?, ?)",
        (body, _now(), release_tag),
    )
    note = get_note(conn, int(cursor.lastrowid))
    assert note is not None
    return note


def get_note(conn: Connection, note_id: int) -> dict[str, Any] | None:
    rows = conn.query(f"SELECT {NOTE_COLUMNS} FROM notes WHERE id = ?", (note_id,))
    return rows[0] if rows else None


def list_notes(conn: Connection, limit: int) -> list[dict[str, Any]]:
    return conn.query(f"SELECT {NOTE_COLUMNS} FROM notes ORDER BY id DESC LIMIT ?", (limit,))
