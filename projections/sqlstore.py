"""One small SQL layer for the views on both stores: SQLite (embedded) and PostgreSQL.

Views live in the same database as the events (the same SQLite file, or the
same PostgreSQL schema), so one URL names everything. Statements are written
once with ``?`` placeholders and translated for psycopg. Bulk inserts use
``COPY`` on PostgreSQL and ``executemany`` on SQLite.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from eventsourcing import persistence as es_persistence
from psycopg import sql as pgsql
from psycopg_pool import ConnectionPool, PoolTimeout

Row = tuple[Any, ...]

# Errors that may pass (a dropped connection, a lock or statement timeout):
# retried, never recorded as a view's failure.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    sqlite3.OperationalError,
    # eventsourcing wraps the driver's errors when it reads the event log.
    es_persistence.OperationalError,
    es_persistence.InterfaceError,
    PoolTimeout,
)


class ViewDatabase:
    """Opens connections for the views and runs transactions on them.

    Built by the composition root (``service.database.view_database``) from
    the same URL as the event store.
    """

    def __init__(
        self,
        dialect: str,
        *,
        sqlite_path: Path | None = None,
        conninfo: str = "",
        schema: str = "public",
    ) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.sqlite_path = sqlite_path
        self.conninfo = conninfo
        self.schema = schema
        self._pool: ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()

    # ----------------------------------------------------------- connections

    def connect(self) -> Any:
        """A new connection in manual-transaction mode."""
        if self.dialect == "sqlite":
            assert self.sqlite_path is not None
            lite = sqlite3.connect(
                self.sqlite_path,
                timeout=30,
                isolation_level=None,
                check_same_thread=False,
            )
            lite.execute("PRAGMA journal_mode=WAL")
            lite.execute("PRAGMA synchronous=NORMAL")
            return lite
        conn = psycopg.connect(self.conninfo)
        conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self.schema)))
        conn.commit()
        return conn

    @contextmanager
    def reading(self) -> Iterator[Cursor]:
        """A short read transaction on a pooled connection (PostgreSQL) or a fresh one (SQLite).

        Requests run on many threads at once; connecting to PostgreSQL costs
        milliseconds, so they share a small pool.
        """
        with self._session(write=False) as cur:
            yield cur

    @contextmanager
    def writing(self) -> Iterator[Cursor]:
        """A short write transaction, pooled like ``reading``."""
        with self._session(write=True) as cur:
            yield cur

    @contextmanager
    def _session(self, *, write: bool) -> Iterator[Cursor]:
        if self.dialect == "sqlite":
            conn = self.connect()
            try:
                with self.transaction(conn, write=write) as cur:
                    yield cur
            finally:
                conn.close()
            return
        with self.pool().connection() as conn, self.transaction(conn, write=write) as cur:
            yield cur

    def pool(self) -> ConnectionPool[Any]:
        with self._pool_lock:
            if self._pool is None:
                schema = self.schema

                def configure(conn: psycopg.Connection[Any]) -> None:
                    conn.execute(
                        pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema))
                    )
                    conn.commit()

                self._pool = ConnectionPool(
                    self.conninfo,
                    min_size=1,
                    max_size=8,
                    configure=configure,
                    # After an outage, connections left in the pool are dead: check
                    # each one before handing it out, so the first request after the
                    # database's return does not fail on one.
                    check=ConnectionPool.check_connection,
                    open=True,
                )
            return self._pool

    def ping(self, timeout: float = 2.0) -> None:
        """Raise unless the database answers within ``timeout`` seconds (for /readyz).

        A fresh connection, not the pool: a pool waiting for a dead server
        would hold a readiness probe far longer than any orchestrator waits.
        """
        if self.dialect == "sqlite":
            conn = self.connect()
            conn.close()
            return
        with psycopg.connect(self.conninfo, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    @contextmanager
    def transaction(self, conn: Any, *, write: bool = True) -> Iterator[Cursor]:
        """A transaction; on SQLite a write transaction takes the write lock up front."""
        if self.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Cursor(self, conn.cursor())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            try:
                with conn.cursor() as cur:
                    yield Cursor(self, cur)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    # ------------------------------------------------------------- statements

    def translate(self, statement: str) -> str:
        return statement if self.dialect == "sqlite" else statement.replace("?", "%s")


class Cursor:
    """A cursor that speaks ``?`` on both stores, with a bulk insert."""

    def __init__(self, db: ViewDatabase, cursor: Any) -> None:
        self.db = db
        self.raw = cursor

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        self.raw.execute(self.db.translate(statement), tuple(params))
        return int(self.raw.rowcount)

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        self.raw.execute(self.db.translate(statement), tuple(params))
        return [tuple(row) for row in self.raw.fetchall()]

    def fetchone(self, statement: str, params: Sequence[Any] = ()) -> Row | None:
        self.raw.execute(self.db.translate(statement), tuple(params))
        row = self.raw.fetchone()
        return None if row is None else tuple(row)

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        """Bulk insert: ``COPY`` on PostgreSQL, ``executemany`` on SQLite."""
        if not rows:
            return
        if self.db.dialect == "sqlite":
            marks = ", ".join("?" for _ in columns)
            self.raw.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
            )
            return
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(table), pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
        )
        with self.raw.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
