"""Helpers shared by the benchmarks: a scratch PostgreSQL database and a timer.

Benchmarks run by hand (``make bench``) and print their figures beside a
baseline measured in the same run; only ratios are comparable across machines.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from service.database import parse_database_url

SERVER_URL = os.environ.get(
    "RESULTSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A database created for one benchmark and dropped afterwards, whatever happens."""
    admin = parse_database_url(SERVER_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(SERVER_URL)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))
    finally:
        with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class Stopwatch:
    """Wall-clock seconds of a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start
