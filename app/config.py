"""The app's configuration: read from the environment once, at start, into a typed value.

Every invalid value is reported at once, so one failed start shows everything to fix.
Each key and its default is documented in README.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_DATABASE_URL = "sqlite:////tmp/skiff-app.db"


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DatabaseUrl:
    """Where the data lives. `dialect` is "sqlite" (uses `path`) or "mysql" (the rest)."""

    dialect: str
    path: str = ""
    host: str = ""
    port: int = 3306
    user: str = ""
    password: str = ""
    database: str = ""
    ssl_ca: str = ""

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
        return f"mysql://{self.user}@{self.host}:{self.port}/{self.database}"


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
        try:
            database = DatabaseUrl.parse(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
        except ValueError as err:
            problems.append(f"DATABASE_URL: {err}")
        # PORT and HOST are read by gunicorn.conf.py; checked here too so all errors come at once.
        port = env.get("PORT", "")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            problems.append(f"PORT={port!r}: expected a TCP port number")
        release = Release(
            tag=env.get("SKIFF_RELEASE_TAG") or env.get("APP_RELEASE") or "unknown",
            digest=env.get("SKIFF_RELEASE_DIGEST", ""),
        )
        config = cls(
            database=database,
            release=release,
            migrate_timeout=seconds("MIGRATE_TIMEOUT", 60.0),
            db_timeout=seconds("DB_TIMEOUT", 5.0),
        )
        if problems:
            raise ConfigError(problems)
        return config
