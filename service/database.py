"""``RESULTSVC_DATABASE_URL`` → the event store.

Two stores, one URL each:

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (the embedded default),
- ``postgresql://user:password@host:port/dbname?schema=name`` (production; all
  tables in one schema, ``public`` unless given, created if missing).

The URL is mapped onto eventsourcing's own settings. A store that cannot be
reached raises ``DatabaseUnavailable`` with a one-line reason that never
contains the password.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from domain.application import ResultsApp
from projections.sqlstore import ViewDatabase

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
LOCK_TIMEOUT_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 5


class DatabaseUnavailable(Exception):
    """The configured database cannot be used; the message is one line, no secrets."""


class BadDatabaseUrl(ValueError):
    """``RESULTSVC_DATABASE_URL`` is not a URL this service understands."""


@dataclass(frozen=True)
class DatabaseConfig:
    """A parsed database URL: which store, and how to tell eventsourcing about it."""

    kind: str  # "sqlite" or "postgresql"
    display: str  # the URL with the password masked, safe to print
    sqlite_path: Path | None = None
    host: str = ""
    port: int = 5432
    user: str = ""
    password: str = field(default="", repr=False)
    dbname: str = ""
    schema: str = "public"

    def eventsourcing_env(self) -> dict[str, str]:
        """The environment eventsourcing reads to build its recorders."""
        common = {"COMPRESSOR_TOPIC": "service.compression:ZstdCompressor"}
        if self.kind == "sqlite":
            return common | {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(self.sqlite_path),
                "SQLITE_LOCK_TIMEOUT": "30",
            }
        return common | {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            # eventsourcing insists on a password; with trust auth any string does.
            "POSTGRES_PASSWORD": self.password or os.environ.get("PGPASSWORD") or "unused",
            "POSTGRES_DBNAME": self.dbname,
            "POSTGRES_SCHEMA": self.schema,
            "POSTGRES_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT_SECONDS),
            "POSTGRES_PRE_PING": "y",
            # A writer waits at most this long for the log's table lock, so one
            # stuck transaction makes others fail (503, retried) instead of hang.
            "POSTGRES_LOCK_TIMEOUT": str(LOCK_TIMEOUT_SECONDS),
            # Not POSTGRES_ENABLE_DB_FUNCTIONS: its insert function skips the
            # table lock that keeps log order equal to commit order, and the
            # projector's "everything after position N" relies on that order.
        }

    def conninfo(self, connect_timeout: int = CONNECT_TIMEOUT_SECONDS) -> str:
        """A libpq connection string for direct psycopg connections (views, admin)."""
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or os.environ.get("PGPASSWORD") or None,
            dbname=self.dbname,
            connect_timeout=connect_timeout,
        )


def parse_database_url(url: str) -> DatabaseConfig:
    """Parse and check a database URL; raise ``BadDatabaseUrl`` with the reason."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise BadDatabaseUrl(
                "sqlite URLs have no host: use sqlite:///relative/path or sqlite:////absolute/path"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise BadDatabaseUrl("sqlite URL names no file: use sqlite:///./var/resultsvc.db")
        return DatabaseConfig(kind="sqlite", display=url, sqlite_path=Path(path))
    if parts.scheme in ("postgresql", "postgres"):
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise BadDatabaseUrl("postgresql URL names no database: postgresql://user@host/db")
        query = parse_qs(parts.query)
        schema = query.get("schema", ["public"])[-1]
        if not _SCHEMA_NAME.fullmatch(schema):
            raise BadDatabaseUrl(f"schema must match [a-z_][a-z0-9_]*, got {schema!r}")
        try:
            port = parts.port or 5432
        except ValueError:
            raise BadDatabaseUrl("postgresql URL has an invalid port") from None
        user = unquote(parts.username or "") or os.environ.get("PGUSER", "postgres")
        host = parts.hostname or "127.0.0.1"
        display = f"postgresql://{user}@{host}:{port}/{dbname}"
        if schema != "public":
            display += f"?schema={schema}"
        return DatabaseConfig(
            kind="postgresql",
            display=display,
            host=host,
            port=port,
            user=user,
            password=unquote(parts.password or ""),
            dbname=dbname,
            schema=schema,
        )
    raise BadDatabaseUrl(
        f"unsupported database URL scheme {parts.scheme!r}: use sqlite:/// or postgresql://"
    )


def prepare(config: DatabaseConfig) -> None:
    """Make the store usable: the SQLite folder, or a reachable server and the schema."""
    if config.kind == "sqlite":
        assert config.sqlite_path is not None
        try:
            config.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatabaseUnavailable(
                f"cannot create folder for {config.display}: {error.strerror}"
            ) from None
        return
    try:
        with psycopg.connect(config.conninfo(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(config.schema))
            )
    except psycopg.Error as error:
        raise DatabaseUnavailable(
            f"cannot reach database {config.display}: {_first_line(error)}"
        ) from None


def open_application(url: str) -> ResultsApp:
    """Open the results application on the store a URL names."""
    config = parse_database_url(url)
    prepare(config)
    try:
        return ResultsApp(env=config.eventsourcing_env())
    except (psycopg.Error, OSError) as error:
        raise DatabaseUnavailable(
            f"cannot open event store {config.display}: {_first_line(error)}"
        ) from None


def view_database(url: str) -> ViewDatabase:
    """The display views' database: the same store as the events."""
    config = parse_database_url(url)
    return ViewDatabase(
        config.kind,
        sqlite_path=config.sqlite_path,
        conninfo=config.conninfo() if config.kind == "postgresql" else "",
        schema=config.schema,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
