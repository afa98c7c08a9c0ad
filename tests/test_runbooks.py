"""Runbooks of docs/operations.md that no other test walks through, step by step.

"Add a replica": a second ``resultsvc serve --no-projector --no-scheduler`` on
the same database serves writes and reads; reads with ``after=`` on it are
satisfied by the projector of the first process (read-your-writes across
replicas); both stop cleanly on SIGTERM.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings
from tests.test_serve import Server, _start


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_add_a_replica(database_url: str, tmp_path: Path) -> None:
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        team, _ = runtime.app.create_team("replicated")
        account, _ = runtime.app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/r", verified=False, actor="t"
        )
        token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read"}))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _start(database_url, tmp_path / "a")
    replicas: list[Server] = [first]
    try:
        replica = _start(database_url, tmp_path / "b", "--no-projector", "--no-scheduler")
        replicas.append(replica)
        # Writes through the replica...
        status, plan, _ = replica.call(
            "POST",
            "/v1/plans",
            token,
            {"team_id": str(team.id), "account_id": str(account.id), "name": "p"},
        )
        assert status == 201, plan
        status, run, _ = replica.call("POST", f"/v1/plans/{plan['id']}/runs", token)
        assert status == 201, run
        status, accepted, _ = replica.call(
            "POST", f"/v1/runs/{run['id']}/results", token, {"results": list(findings(250))}
        )
        assert status == 201, accepted
        position = accepted["position"]
        # ...are readable on both, once the one projector (in the first process) got there.
        for server in (replica, first):
            status, view, _ = server.call("GET", f"/v1/runs/{run['id']}?after={position}", token)
            assert status == 200, view
            assert view["total"] == 250
        # Writes through the first are readable on the replica too.
        status, second, _ = first.call(
            "POST", f"/v1/runs/{run['id']}/results", token, {"results": list(findings(50))}
        )
        assert status == 201, second
        status, view, _ = replica.call(
            "GET", f"/v1/runs/{run['id']}?after={second['position']}", token
        )
        assert status == 200 and view["total"] == 300, view
        for server in replicas:
            status, ready, _ = server.call("GET", "/readyz")
            assert status == 200, ready
    finally:
        for server in replicas:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        codes = [server.process.wait(timeout=60) for server in replicas]
    assert codes == [0] * len(replicas)
