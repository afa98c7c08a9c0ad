"""The API end to end on both stores: a client that only knows the contract."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from service.samples import findings


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_run_from_plan_to_results_page(api: Any, runtime: Any) -> None:
    ops = runtime.tokens.create(None, frozenset({"ops"}))
    created = api.post("/v1/teams", json={"name": "Blue"}, headers=_auth(ops))
    assert created.status_code == 201, created.text
    team = created.json()
    account, _ = runtime.app.link_account_role(
        UUID(team["id"]),
        "arn:aws:iam::123456789012:role/a",
        verified=False,
        actor="t",
    )
    token = runtime.tokens.create(team["id"], frozenset({"ingest", "read"}))
    plan = api.post(
        "/v1/plans",
        json={"team_id": team["id"], "account_id": str(account.id), "name": "cis"},
        headers=_auth(token),
    )
    assert plan.status_code == 201, plan.text
    run = api.post(f"/v1/plans/{plan.json()['id']}/runs", headers=_auth(token))
    assert run.status_code == 201 and run.json()["status"] == "running"
    run_id = run.json()["id"]
    batch = list(findings(250))
    posted = api.post(f"/v1/runs/{run_id}/results", json={"results": batch}, headers=_auth(token))
    assert posted.status_code == 201, posted.text
    assert posted.json()["accepted"] == 250
    done = api.post(
        f"/v1/runs/{run_id}/complete", json={"status": "succeeded"}, headers=_auth(token)
    )
    assert done.status_code == 200, done.text
    position = done.json()["position"]
    view = api.get(f"/v1/runs/{run_id}?after={position}", headers=_auth(token))
    assert view.status_code == 200
    assert view.json()["total"] == 250 and view.json()["status"] == "succeeded"
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"/v1/runs/{run_id}/results?limit=100" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(query, headers=_auth(token)).json()
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [item["resource_arn"] for item in seen] == [f["resource_arn"] for f in batch]
