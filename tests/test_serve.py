"""``resultsvc serve`` as deployed: a real uvicorn process, its projector, SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings
from tests.conftest import free_port

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")


class Server:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        content = json.loads(raw) if raw and raw[:1] in b"{[" else raw.decode()
        return response.status, content, dict(response.getheaders())


def _start(database_url: str, cwd: Path, *extra: str) -> Server:
    port = free_port()
    env = {**os.environ, "RESULTSVC_DATABASE_URL": database_url}
    process = subprocess.Popen(
        [RESULTSVC, "serve", "--port", str(port), *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(port, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded wait for the port to answer
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode() if process.stderr else "exited")
        try:
            if server.call("GET", "/healthz")[0] == 200:
                return server
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("server did not answer /healthz")


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        team, _ = runtime.app.create_team("served")
        account, _ = runtime.app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/s", verified=False, actor="t"
        )
        ids = {
            "team": str(team.id),
            "account": str(account.id),
            "token": runtime.tokens.create(str(team.id), frozenset({"ingest", "read"})),
            "ops": runtime.tokens.create(None, frozenset({"ops"})),
        }
    server = _start(database_url, tmp_path)
    try:
        yield server, ids
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_appends_are_readable_with_after_and_sigterm_stops_cleanly(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, ids = served
    token = ids["token"]
    status, plan, _ = server.call(
        "POST",
        "/v1/plans",
        token,
        {"team_id": ids["team"], "account_id": ids["account"], "name": "p"},
    )
    assert status == 201, plan
    status, run, _ = server.call("POST", f"/v1/plans/{plan['id']}/runs", token)
    assert status == 201
    status, accepted, _ = server.call(
        "POST", f"/v1/runs/{run['id']}/results", token, {"results": list(findings(300))}
    )
    assert status == 201 and accepted["accepted"] == 300
    # The projector thread of this process makes the write readable: no sleep.
    status, view, _ = server.call(
        "GET", f"/v1/runs/{run['id']}?after={accepted['position']}", token
    )
    assert status == 200, view
    assert view["total"] == 300
    status, ready, _ = server.call("GET", "/readyz")
    assert status == 200 and ready["status"] == "ready"
    status, metrics, _ = server.call("GET", "/metrics")
    assert status == 200
    route = 'method="POST",route="/v1/runs/{run}/results",status="201"'
    assert f"resultsvc_http_requests_total{{{route}}} 1.0" in metrics
    assert 'resultsvc_projector_lag{view="display"}' in metrics

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0


def test_no_projector_serves_the_api_but_reads_wait_then_503(
    database_url: str, tmp_path: Path
) -> None:
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        team, position = runtime.app.create_team("lonely")
        token = runtime.tokens.create(str(team.id), frozenset({"read"}))
    server = _start(database_url, tmp_path, "--no-projector")
    try:
        status, problem, headers = server.call(
            "GET", f"/v1/teams/{team.id}?after={position}", token
        )
        # Nobody projects: the read waits its bounded time and says so.
        assert status == 503, problem
        assert headers.get("retry-after") == "1"
        assert problem["status"] == 503 and "behind" in problem["detail"]
        # An API replica is ready while the views lag little; it reports the lag.
        status, ready, _ = server.call("GET", "/readyz")
        assert status == 200
        assert ready["lag"]["display"] == position
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
