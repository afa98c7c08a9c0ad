"""Shared fixtures: the two event stores, a throwaway PostgreSQL database, moto over HTTP.

PostgreSQL is found, in order, at ``RESULTSVC_TEST_DATABASE_URL``, at
127.0.0.1:5432 (as on CI), or in a testcontainers container where a Docker
engine answers. Each test session creates its own database and drops it at
the end; each test gets its own schema in it. With ``CI=true`` a missing
PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from domain.application import ResultsApp
from service.database import open_application, parse_database_url

LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(url: str) -> bool:
    config = parse_database_url(url)
    try:
        psycopg.connect(config.conninfo(connect_timeout=3)).close()
    except psycopg.Error:
        return False
    return True


def _docker_postgres() -> tuple[str, Any] | None:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]
    except Exception:
        return None
    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    return container.get_connection_url(), container


def _with_dbname(url: str, dbname: str, query: str = "") -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", query, ""))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a database created for this test session, dropped afterwards."""
    container = None
    server = os.environ.get("RESULTSVC_TEST_DATABASE_URL")
    if server is None:
        if _reachable(LOCAL_PG):
            server = LOCAL_PG
        else:
            found = _docker_postgres()
            if found is not None:
                server, container = found
    if server is None or not _reachable(server):
        message = "no PostgreSQL: set RESULTSVC_TEST_DATABASE_URL or start one on 127.0.0.1:5432"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{message} (CI=true: PostgreSQL tests never skip)")
        pytest.skip(message)
    admin = parse_database_url(server)
    dbname = f"resultsvc_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield _with_dbname(server, dbname)
    finally:
        with psycopg.connect(admin.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
        if container is not None:
            container.stop()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A PostgreSQL URL with a schema of this test's own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield _with_dbname(pg_database, urlsplit(pg_database).path.lstrip("/"), f"schema={schema}")
    config = parse_database_url(pg_database)
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The same test on the embedded store and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/resultsvc.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def app(database_url: str) -> Iterator[ResultsApp]:
    application = open_application(database_url)
    try:
        yield application
    finally:
        application.close()


# ------------------------------------------------------------------ moto over HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server (S3, KMS, IAM, STS, SQS) on a free loopback port, for the session."""
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server through its own settings (``AWS_ENDPOINT_URL``)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint


# ------------------------------------------------------------------ the HTTP API


@pytest.fixture
def runtime(database_url: str, tmp_path: Any) -> Iterator[Any]:
    """The composition root on the parametrised store (SQLite and PostgreSQL).

    Backups and the master key go to the test's own folder, never to ./var.
    """
    from service.runtime import Runtime
    from service.settings import Settings

    settings = Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
        }
    )
    opened = Runtime.open(settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def api(runtime: Any) -> Iterator[Any]:
    """An in-process client of the API; views are projected synchronously on every GET.

    No projector thread runs: ``after=`` waits are satisfied by a catch-up the
    client runs before each GET, which keeps the tests deterministic.
    """
    from fastapi.testclient import TestClient

    from service.api import create_app

    class CatchingUpClient(TestClient):
        def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            if method.upper() == "GET":
                runtime.projector.catch_up()
            return super().request(method, url, *args, **kwargs)

    with CatchingUpClient(create_app(runtime), raise_server_exceptions=False) as client:
        yield client
