"""A second, private PostgreSQL cluster for tests that stop, kill or restart the database.

The shared server on 127.0.0.1:5432 is never stopped by a test; this one is
made with ``initdb`` in a fresh folder under /tmp, started with ``pg_ctl`` on
a free port, and removed at the end. ``initdb`` refuses to run as root, so as
root every PostgreSQL program runs as the ``postgres`` user (``runuser``),
and the folder (pytest's tmp_path is not readable by that user) belongs to it.

With ``CI=true`` a missing ``initdb`` fails the run instead of skipping it,
like the PostgreSQL fixtures of conftest.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import free_port

PG_USER = "postgres"
_TIMEOUT = 120  # seconds any pg_ctl/initdb call may take before the test fails


def _binary(name: str) -> str | None:
    for candidate in (f"/usr/local/bin/{name}", shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


class PgCluster:
    """A private cluster: ``url(dbname)``, ``stop(mode)``, ``start()``, ``restart(mode)``."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.initdb = initdb
        self.pg_ctl = pg_ctl
        self.as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="resultsvc-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        if self.as_root:
            shutil.chown(self.folder, user=PG_USER, group=PG_USER)

    # ------------------------------------------------------------- commands

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if self.as_root:
            command = ["runuser", "-u", PG_USER, "--", *command]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            cwd=self.folder,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"{self.tail_log()}"
            )
        return done

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync")
        settings = (
            f"\nport = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.data}'\n"
            # Test data only: no fsync (a process crash loses nothing the OS has; an OS
            # crash would), commits stay synchronous so an acknowledged commit is kept.
            "fsync = off\n"
            "full_page_writes = off\n"
            "max_connections = 100\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "restart"
        )

    def running(self) -> bool:
        command = [self.pg_ctl, "-D", str(self.data), "status"]
        if self.as_root:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return subprocess.run(command, capture_output=True, timeout=_TIMEOUT).returncode == 0

    # ------------------------------------------------------------- databases

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={PG_USER} dbname={dbname} connect_timeout=5"

    def create_database(self, dbname: str) -> None:
        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def url(self, dbname: str = "test", *, port: int | None = None) -> str:
        """A ``RESULTSVC_DATABASE_URL`` for ``dbname`` (created if missing).

        ``port`` replaces the cluster's port in the URL (a proxy in front of it).
        """
        self.create_database(dbname)
        return f"postgresql://{PG_USER}@{self.host}:{port or self.port}/{dbname}"

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """Start a private cluster (with a database ``test``); stop and remove it afterwards."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        message = "initdb/pg_ctl not found: a second PostgreSQL cluster cannot be made"
        if _ci():
            pytest.fail(f"{message} (CI=true: PostgreSQL tests never skip)")
        pytest.skip(message)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.fail("running as root without runuser: initdb cannot run as root")
    cluster = PgCluster(initdb, pg_ctl)
    try:
        cluster.init()
        cluster.start()
        cluster.create_database("test")
        yield cluster
    finally:
        cluster.remove()
