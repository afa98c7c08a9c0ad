"""Bad input across the HTTP API, on both stores: a problem answer, never a 5xx, nothing appended.

Every refusal is ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail`` and ``errors``, and names the offending field
(``results[3].severity``). Oversize bodies get 413 however they arrive; a
read that names a position the views have not reached gets 503 + Retry-After;
state conflicts get 409.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

import service.api
from domain import findings as rules
from service.api import MAX_BODY_BYTES, create_app
from service.database import parse_database_url
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings
from tests.conftest import free_port

PROBLEM = "application/problem+json"
GOOD = list(findings(5, seed=5))
Ids = dict[str, str]

# ------------------------------------------------------------------ the world


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    ids: Ids
    team: dict[str, str]  # headers: ingest + read + compliance
    ops: dict[str, str]

    def head(self) -> int:
        return self.runtime.app.head_position()

    def fresh(self) -> Ids:
        return _populate(self.runtime, uuid.UUID(self.ids["team"]))


def _populate(runtime: Runtime, team: uuid.UUID) -> Ids:
    app = runtime.app
    account, _ = app.link_account_role(
        team, "arn:aws:iam::123456789012:role/scanner", verified=False, actor="test"
    )
    plan, _ = app.create_plan(team, account.id, "weekly")
    run, _ = app.start_run(team, plan.id)
    app.record_results(team, run.id, GOOD)
    runtime.projector.catch_up()
    return {"team": str(team), "account": str(account.id), "plan": str(plan.id), "run": str(run.id)}


class CatchingUpClient(TestClient):
    runtime: Runtime

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if method.upper() == "GET":
            self.runtime.projector.catch_up()
        return super().request(method, url, *args, **kwargs)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def store_url(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('errors-db')}/resultsvc.db"
        return
    database: str = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    parts = urlsplit(database)
    yield urlunsplit((parts.scheme, parts.netloc, parts.path, f"schema={schema}", ""))
    config = parse_database_url(database)
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def world(store_url: str, tmp_path_factory: Any) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("errors")
    runtime = Runtime.open(
        Settings.from_env(
            {
                "RESULTSVC_DATABASE_URL": store_url,
                "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
                "RESULTSVC_MASTER_KEY": f"file://{folder}/master.key",
            }
        )
    )
    try:
        team, _ = runtime.app.create_team("Errors")
        ids = _populate(runtime, team.id)
        runtime.app.request_backup_exclusion(
            team.id,
            uuid.UUID(_populate(runtime, team.id)["plan"]),
            reason="r",
            ticket=None,
            actor="test",
        )
        token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read", "compliance"}))
        ops = runtime.tokens.create(None, frozenset({"ops"}))
        CatchingUpClient.runtime = runtime
        with CatchingUpClient(create_app(runtime), raise_server_exceptions=False) as client:
            yield World(
                runtime,
                client,
                ids,
                {"Authorization": f"Bearer {token}"},
                {"Authorization": f"Bearer {ops}"},
            )
    finally:
        runtime.close()


def _assert_refused(
    response: Any, status: int | tuple[int, ...], fields: tuple[str, ...] = ()
) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    views_behind = statuses == (503,)  # the one 5xx of the contract, asked for explicitly
    assert response.status_code < 500 or views_behind, (response.status_code, response.text)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == response.status_code
    assert body["type"].startswith("https://") and body["title"] and body["detail"]
    assert isinstance(body["errors"], list)
    named = [error["field"] for error in body["errors"]]
    for error in body["errors"]:
        assert set(error) == {"field", "rule"} and error["rule"]
    for field in fields:
        assert field in named, (field, body)
    return body


# ------------------------------------------------------------------ the corpus

RAW = object()  # marker: body is raw bytes


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    body: Any = None
    status: int | tuple[int, ...] = 422
    fields: tuple[str, ...] = ()
    ops: bool = False
    raw: bool = False  # body is bytes, sent as application/json


def _changed(item: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    changed = {**item, **changes}
    return {name: value for name, value in changed.items() if value is not RAW}


def _finding(**changes: Any) -> dict[str, Any]:
    return _changed(GOOD[0], changes)


def _batch(at: int, **changes: Any) -> dict[str, Any]:
    """The good batch with finding ``at`` changed (``RAW`` removes a field)."""
    return {"results": [_changed(item, changes if i == at else {}) for i, item in enumerate(GOOD)]}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


RESULTS = "/v1/runs/{run}/results"
LIMITS = {
    "rule_id": rules.MAX_RULE_ID,
    "title": rules.MAX_TITLE,
    "resource_arn": rules.MAX_RESOURCE_ARN,
    "region": rules.MAX_REGION,
    "message": rules.MAX_MESSAGE,
}

CORPUS = [
    # ---- results: shape
    Bad("unknown top-level field", "POST", RESULTS, {**_batch(0), "extra": 1}, fields=("extra",)),
    Bad(
        "unknown field in a finding",
        "POST",
        RESULTS,
        _batch(2, colour="red"),
        fields=("results[2].colour",),
    ),
    Bad(
        "missing field in a finding",
        "POST",
        RESULTS,
        _batch(1, title=RAW),
        fields=("results[1].title",),
    ),
    Bad("results not a list", "POST", RESULTS, {"results": "all of them"}, fields=("results",)),
    Bad(
        "finding not an object", "POST", RESULTS, {"results": [GOOD[0], 7]}, fields=("results[1]",)
    ),
    Bad("body is a list", "POST", RESULTS, [GOOD[0]], fields=("body",)),
    Bad("body is null", "POST", RESULTS, b"null", fields=("body",), raw=True),
    Bad("no body", "POST", RESULTS, b"", fields=("body",), raw=True),
    Bad("0 results", "POST", RESULTS, {"results": []}, fields=("results",)),
    Bad("1001 results", "POST", RESULTS, {"results": list(findings(1001))}, fields=("results",)),
    # ---- results: types and enums
    Bad("title is a number", "POST", RESULTS, _batch(0, title=5), fields=("results[0].title",)),
    Bad("region is null", "POST", RESULTS, _batch(4, region=None), fields=("results[4].region",)),
    Bad(
        "message is a list",
        "POST",
        RESULTS,
        _batch(0, message=["a"]),
        fields=("results[0].message",),
    ),
    Bad(
        "severity unknown",
        "POST",
        RESULTS,
        _batch(3, severity="catastrophic"),
        fields=("results[3].severity",),
    ),
    Bad(
        "severity wrong case",
        "POST",
        RESULTS,
        _batch(3, severity="HIGH"),
        fields=("results[3].severity",),
    ),
    Bad("status unknown", "POST", RESULTS, _batch(4, status="fail"), fields=("results[4].status",)),
    Bad("status a number", "POST", RESULTS, _batch(0, status=1), fields=("results[0].status",)),
    Bad(
        "observed_at not a date",
        "POST",
        RESULTS,
        _batch(2, observed_at="yesterday"),
        fields=("results[2].observed_at",),
    ),
    Bad(
        "observed_at without zone",
        "POST",
        RESULTS,
        _batch(2, observed_at="2026-01-01T00:00:00"),
        fields=("results[2].observed_at",),
    ),
    Bad(
        "observed_at a number",
        "POST",
        RESULTS,
        _batch(2, observed_at=1767225600),
        fields=("results[2].observed_at",),
    ),
    Bad(
        "observed_at out of range",
        "POST",
        RESULTS,
        _batch(2, observed_at="0001-01-01T00:00:00+01:00"),
        fields=("results[2].observed_at",),
    ),
    Bad("empty title", "POST", RESULTS, _batch(1, title=""), fields=("results[1].title",)),
    Bad(
        "NUL in message",
        "POST",
        RESULTS,
        _batch(1, message="a\x00b"),
        fields=("results[1].message",),
    ),
    # ---- results: details
    Bad("details a list", "POST", RESULTS, _batch(0, details=[1]), fields=("results[0].details",)),
    Bad(
        "details over 16 KiB",
        "POST",
        RESULTS,
        _batch(0, details={"blob": "x" * rules.MAX_DETAILS_BYTES}),
        fields=("results[0].details",),
    ),
    Bad(
        "details nested 300 deep",
        "POST",
        RESULTS,
        _batch(0, details=_nested(300)),
        fields=("results[0].details",),
    ),
    Bad(
        "details with NaN",
        "POST",
        RESULTS,
        b'{"results":[' + orjson.dumps(GOOD[0])[:-1] + b',"details":{"x":NaN}}]}',
        fields=("results[0].details",),
        raw=True,
    ),
    Bad(
        "details huge integer",
        "POST",
        RESULTS,
        _batch(0, details={"n": 10**30}),
        fields=("results[0].details",),
    ),
    Bad(
        "details reserved pair",
        "POST",
        RESULTS,
        _batch(0, details={"_type_": "uuid", "_data_": "x"}),
        fields=("results[0].details",),
    ),
    # ---- results: JSON itself
    Bad("malformed JSON", "POST", RESULTS, b'{"results": [', status=400, raw=True),
    Bad("not JSON at all", "POST", RESULTS, b"results=1", status=(400, 422), raw=True),
    Bad(
        "100000 nested arrays",
        "POST",
        RESULTS,
        b"[" * 100_000 + b"]" * 100_000,
        status=(400, 422),
        raw=True,
    ),
    Bad(
        "100000 nested arrays in results",
        "POST",
        RESULTS,
        b'{"results":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        status=(400, 422),
        raw=True,
    ),
    Bad(
        "100000 nested objects in details",
        "POST",
        RESULTS,
        b'{"results":['
        + orjson.dumps(GOOD[0])[:-1]
        + b',"details":'
        + b'{"a":' * 100_000
        + b"1"
        + b"}" * 100_000
        + b"}]}",
        status=(400, 422),
        raw=True,
    ),
    Bad("invalid UTF-8", "POST", RESULTS, b'{"results":"\xff\xfe"}', status=(400, 422), raw=True),
    # ---- plans
    Bad(
        "plan: unknown field",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "account_id": "{account}", "name": "p", "owner": "x"},
        fields=("owner",),
    ),
    Bad(
        "plan: team_id not a uuid",
        "POST",
        "/v1/plans",
        {"team_id": "team-a", "account_id": "{account}", "name": "p"},
        fields=("team_id",),
    ),
    Bad(
        "plan: account_id missing",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "name": "p"},
        fields=("account_id",),
    ),
    Bad(
        "plan: name a number",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "account_id": "{account}", "name": 3},
        fields=("name",),
    ),
    Bad(
        "plan: name 201 chars",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "account_id": "{account}", "name": "n" * 201},
        fields=("name",),
    ),
    Bad(
        "plan: name blank",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "account_id": "{account}", "name": "  \t "},
        fields=("name",),
    ),
    Bad(
        "plan: name with NUL",
        "POST",
        "/v1/plans",
        {"team_id": "{team}", "account_id": "{account}", "name": "a\x00"},
        fields=("name",),
    ),
    # ---- teams (ops)
    Bad(
        "team: name 201 chars", "POST", "/v1/teams", {"name": "t" * 201}, fields=("name",), ops=True
    ),
    Bad("team: name empty", "POST", "/v1/teams", {"name": ""}, fields=("name",), ops=True),
    Bad(
        "team: unknown field",
        "POST",
        "/v1/teams",
        {"name": "x", "id": "y"},
        fields=("id",),
        ops=True,
    ),
    Bad("team: name a list", "POST", "/v1/teams", {"name": ["x"]}, fields=("name",), ops=True),
    # ---- complete
    Bad(
        "complete: status unknown",
        "POST",
        "/v1/runs/{run}/complete",
        {"status": "done"},
        fields=("status",),
    ),
    Bad(
        "complete: status running",
        "POST",
        "/v1/runs/{run}/complete",
        {"status": "running"},
        fields=("status",),
    ),
    Bad("complete: status missing", "POST", "/v1/runs/{run}/complete", {}, fields=("status",)),
    Bad(
        "complete: error 4097 chars",
        "POST",
        "/v1/runs/{run}/complete",
        {"status": "failed", "error": "e" * 4097},
        fields=("error",),
    ),
    Bad(
        "complete: error blank",
        "POST",
        "/v1/runs/{run}/complete",
        {"status": "failed", "error": "   "},
        fields=("error",),
    ),
    Bad(
        "complete: unknown field",
        "POST",
        "/v1/runs/{run}/complete",
        {"status": "failed", "reason": "x"},
        fields=("reason",),
    ),
    # ---- exclusions
    Bad(
        "exclusion: reason missing",
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        {},
        fields=("reason",),
    ),
    Bad(
        "exclusion: reason 2001 chars",
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        {"reason": "r" * 2001},
        fields=("reason",),
    ),
    Bad(
        "exclusion: ticket 201 chars",
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        {"reason": "r", "ticket": "t" * 201},
        fields=("ticket",),
    ),
    Bad(
        "exclusion: ticket empty",
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        {"reason": "r", "ticket": ""},
        fields=("ticket",),
    ),
    Bad(
        "exclusion: unknown field",
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        {"reason": "r", "by": "me"},
        fields=("by",),
    ),
    # ---- display purges
    Bad("purge: nothing named", "POST", "/v1/display-purges", {}, fields=("body",)),
    Bad(
        "purge: plan and team",
        "POST",
        "/v1/display-purges",
        {"plan_id": "{plan}", "team_id": "{team}"},
        fields=("body",),
    ),
    Bad(
        "purge: plan and older_than",
        "POST",
        "/v1/display-purges",
        {"plan_id": "{plan}", "older_than": "30d"},
        fields=("body",),
    ),
    Bad(
        "purge: older_than not a duration",
        "POST",
        "/v1/display-purges",
        {"older_than": "soon"},
        fields=("older_than",),
    ),
    Bad(
        "purge: older_than zero",
        "POST",
        "/v1/display-purges",
        {"older_than": "0d"},
        fields=("older_than",),
    ),
    Bad(
        "purge: older_than 17 chars",
        "POST",
        "/v1/display-purges",
        {"older_than": "1" * 16 + "d"},
        fields=("older_than",),
    ),
    Bad(
        "purge: plan_id not a uuid",
        "POST",
        "/v1/display-purges",
        {"plan_id": "p-1"},
        fields=("plan_id",),
    ),
    Bad(
        "purge: reason 2001 chars",
        "POST",
        "/v1/display-purges",
        {"team_id": "{team}", "reason": "r" * 2001},
        fields=("reason",),
    ),
    # ---- backups (ops)
    Bad(
        "backup: full not a bool",
        "POST",
        "/v1/backups",
        {"full": "maybe"},
        fields=("full",),
        ops=True,
    ),
    Bad(
        "backup: unknown field", "POST", "/v1/backups", {"kind": "full"}, fields=("kind",), ops=True
    ),
    # ---- paths
    Bad(
        "run id not a uuid (results)",
        "POST",
        "/v1/runs/run-1/results",
        {"results": GOOD},
        fields=("run",),
    ),
    Bad(
        "run id not a uuid (complete)",
        "POST",
        "/v1/runs/1/complete",
        {"status": "failed"},
        fields=("run",),
    ),
    Bad("plan id not a uuid (runs)", "POST", "/v1/plans/plan/runs", fields=("plan",)),
    Bad(
        "plan id not a uuid (exclusion)",
        "POST",
        "/v1/plans/x/backup-exclusion",
        {"reason": "r"},
        fields=("plan",),
    ),
    Bad("account id not a uuid", "DELETE", "/v1/accounts/123", fields=("account",)),
    Bad("team id not a uuid", "GET", "/v1/teams/blue", fields=("team",)),
    Bad("team id not a uuid (accounts)", "GET", "/v1/teams/blue/accounts", fields=("team",)),
    Bad("team id not a uuid (plans)", "GET", "/v1/teams/blue/plans", fields=("team",)),
    Bad("plan id not a uuid", "GET", "/v1/plans/'; drop table x;--", fields=("plan",)),
    Bad("plan id not a uuid (runs list)", "GET", "/v1/plans/0/runs", fields=("plan",)),
    Bad("run id not a uuid", "GET", "/v1/runs/" + "f" * 33, fields=("run",)),
    Bad("run id not a uuid (results list)", "GET", "/v1/runs/x/results", fields=("run",)),
    # ---- queries
    Bad("cursor garbage (results)", "GET", RESULTS + "?cursor=garbage", fields=("cursor",)),
    Bad("cursor garbage (runs)", "GET", "/v1/plans/{plan}/runs?cursor=%25%25", fields=("cursor",)),
    Bad("cursor garbage (plans)", "GET", "/v1/teams/{team}/plans?cursor=e30", fields=("cursor",)),
    Bad(
        "cursor garbage (accounts)",
        "GET",
        "/v1/teams/{team}/accounts?cursor=W10",
        fields=("cursor",),
    ),
    Bad(
        "cursor garbage (exclusions)",
        "GET",
        "/v1/backup-exclusions?cursor=bnVsbA",
        fields=("cursor",),
    ),
    Bad(
        "cursor of another list",
        "GET",
        "/v1/teams/{team}/plans?cursor="
        + base64.urlsafe_b64encode(b'["results",1]').decode().rstrip("="),
        fields=("cursor",),
    ),
    Bad("cursor 513 chars", "GET", RESULTS + "?cursor=" + "a" * 513, fields=("cursor",)),
    Bad("limit 0", "GET", RESULTS + "?limit=0", fields=("limit",)),
    Bad("limit 1001", "GET", "/v1/teams/{team}/plans?limit=1001", fields=("limit",)),
    Bad("limit not a number", "GET", "/v1/backup-exclusions?limit=ten", fields=("limit",)),
    Bad("limit huge", "GET", RESULTS + "?limit=" + "9" * 40, fields=("limit",)),
    Bad("after -1", "GET", "/v1/runs/{run}?after=-1", fields=("after",)),
    Bad("after over 2^62", "GET", "/v1/plans/{plan}?after=" + str(2**62 + 1), fields=("after",)),
    Bad("after a float", "GET", "/v1/teams/{team}?after=1.5", fields=("after",)),
    Bad("severity filter unknown", "GET", RESULTS + "?severity=urgent", fields=("severity",)),
    Bad("status filter unknown", "GET", RESULTS + "?status=FAILED", fields=("status",)),
]


def _fill(value: Any, ids: Ids) -> Any:
    if isinstance(value, str):
        return value.format(**ids) if "{" in value and "}" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _send_bad(world: World, bad: Bad, ids: Ids) -> Any:
    headers = dict(world.ops if bad.ops else world.team)
    path = bad.path.format(**ids) if "{" in bad.path else bad.path
    kwargs: dict[str, Any] = {"headers": headers}
    if bad.raw:
        kwargs["content"] = bad.body
        headers["Content-Type"] = "application/json"
    elif bad.body is not None:
        kwargs["content"] = json.dumps(_fill(bad.body, ids)).encode()
        headers["Content-Type"] = "application/json"
    return world.client.request(bad.method, path, **kwargs)


def test_the_corpus_names_distinct_cases() -> None:
    assert len({bad.name for bad in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("bad", CORPUS, ids=lambda bad: bad.name)
def test_bad_input_gets_a_problem_and_appends_nothing(world: World, bad: Bad) -> None:
    head = world.head()
    response = _send_bad(world, bad, world.ids)
    _assert_refused(response, bad.status, bad.fields)
    assert world.head() == head


def test_every_finding_field_is_checked_at_its_limit(world: World) -> None:
    """limit + 1 is refused naming the field; the limit itself is accepted and reads back."""
    ids = world.fresh()
    path = f"/v1/runs/{ids['run']}/results"
    for name, limit in LIMITS.items():
        head = world.head()
        over = _batch(3, **{name: "x" * (limit + 1)})
        _assert_refused(
            world.client.post(path, json=over, headers=world.team), 422, (f"results[3].{name}",)
        )
        assert world.head() == head
        at = {"results": [_finding(**{name: "y" * limit})]}
        accepted = world.client.post(path, json=at, headers=world.team)
        assert accepted.status_code == 201, (name, accepted.text)
    page = world.client.get(f"{path}?limit=1000", headers=world.team).json()["items"]
    for name, limit in LIMITS.items():
        assert any(item[name] == "y" * limit for item in page), name
    big = {"blob": "z" * (rules.MAX_DETAILS_BYTES - len('{"blob":""}'))}
    assert len(orjson.dumps(big)) == rules.MAX_DETAILS_BYTES
    assert (
        world.client.post(
            path, json={"results": [_finding(details=big)]}, headers=world.team
        ).status_code
        == 201
    )
    thousand = world.client.post(
        path, json={"results": list(findings(rules.MAX_BATCH))}, headers=world.team
    )
    assert thousand.status_code == 201 and thousand.json()["accepted"] == rules.MAX_BATCH


def test_text_fields_are_checked_at_their_limits(world: World) -> None:
    ids = world.fresh()
    cases: list[tuple[str, str, Callable[[str], dict[str, Any]], int, str, bool]] = [
        ("POST", "/v1/teams", lambda s: {"name": s}, 200, "name", True),
        (
            "POST",
            "/v1/plans",
            lambda s: {"team_id": ids["team"], "account_id": ids["account"], "name": s},
            200,
            "name",
            False,
        ),
        (
            "POST",
            f"/v1/plans/{ids['plan']}/backup-exclusion",
            lambda s: {"reason": "r", "ticket": s},
            200,
            "ticket",
            False,
        ),
        (
            "POST",
            f"/v1/plans/{ids['plan']}/backup-exclusion",
            lambda s: {"reason": s},
            2000,
            "reason",
            False,
        ),
        (
            "POST",
            f"/v1/runs/{ids['run']}/complete",
            lambda s: {"status": "failed", "error": s},
            4096,
            "error",
            False,
        ),
    ]
    for method, path, body, limit, field, as_ops in cases:
        headers = world.ops if as_ops else world.team
        head = world.head()
        over = world.client.request(method, path, json=body("a" * (limit + 1)), headers=headers)
        _assert_refused(over, 422, (field,))
        assert world.head() == head
    for method, path, body, limit, field, as_ops in cases:
        if field == "reason":
            continue  # the ticket case already excluded this plan: checked below
        headers = world.ops if as_ops else world.team
        at = world.client.request(method, path, json=body("b" * limit), headers=headers)
        assert at.status_code in (200, 201), (field, at.text)
    other = world.fresh()
    at = world.client.post(
        f"/v1/plans/{other['plan']}/backup-exclusion",
        json={"reason": "c" * 2000},
        headers=world.team,
    )
    assert at.status_code == 201, at.text


# ------------------------------------------------------------- crafted cursors


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


LISTS = {
    "accounts": "/v1/teams/{team}/accounts",
    "plans": "/v1/teams/{team}/plans",
    "runs": "/v1/plans/{plan}/runs",
    "exclusions": "/v1/backup-exclusions",
}
CRAFTED = [
    *[(kind, "lone surrogate", _cursor(kind, "\ud800", "x")) for kind in LISTS],
    *[(kind, "NUL", _cursor(kind, "2026\x00", "x")) for kind in LISTS],
    ("results", "2^63", _cursor("results", 2**63)),
    ("results", "-2^63-1", _cursor("results", -(2**63) - 1)),
    ("results", "10^30", _cursor("results", 10**30)),
]


@pytest.mark.parametrize(
    ("kind", "what", "cursor"), CRAFTED, ids=[f"{k}-{w}" for k, w, _ in CRAFTED]
)
def test_crafted_cursors_never_fail_the_service(
    world: World, kind: str, what: str, cursor: str
) -> None:
    """A cursor decodes to a JSON list the client controls: its values must not reach SQL raw.

    (Lone surrogates answered 500 on both stores, NUL on PostgreSQL and integers
    over 2^63 on SQLite, until decode_cursor learnt to refuse them.)
    """
    path = LISTS.get(kind, RESULTS).format(**world.ids)
    response = world.client.get(path, params={"cursor": cursor}, headers=world.team)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        _assert_refused(response, 422, ("cursor",))


@pytest.mark.parametrize("older_than", ["3000y", "999999d", "999999w"])
def test_a_purge_older_than_the_calendar_is_refused_or_done(world: World, older_than: str) -> None:
    head = world.head()
    response = world.client.post(
        "/v1/display-purges", json={"older_than": older_than}, headers=world.team
    )
    assert response.status_code < 500, response.text
    assert response.status_code in (201, 422), response.text
    if response.status_code == 422:
        _assert_refused(response, 422, ("older_than",))
        assert world.head() == head


@pytest.mark.parametrize(
    "body",
    [b'{"results": [', b"[" * 100_000 + b"]" * 100_000],
    ids=["malformed", "deeply-nested"],
)
def test_an_unparsable_body_names_the_body(world: World, body: bytes) -> None:
    response = world.client.post(
        RESULTS.format(**world.ids),
        content=body,
        headers={**world.team, "Content-Type": "application/json"},
    )
    refused = _assert_refused(response, 400)
    assert [error["field"] for error in refused["errors"]] == ["body"]


# ------------------------------------------------------------ body size: 413


def _padded(size: int, body: dict[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_a_body_at_the_limit_is_accepted(world: World) -> None:
    ids = world.fresh()
    raw = _padded(MAX_BODY_BYTES, {"results": GOOD})
    assert len(raw) == MAX_BODY_BYTES
    response = world.client.post(
        f"/v1/runs/{ids['run']}/results",
        content=raw,
        headers={**world.team, "Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text[:300]


def test_a_body_over_the_limit_is_413_with_content_length(world: World) -> None:
    raw = _padded(MAX_BODY_BYTES + 1, {"results": GOOD})
    head = world.head()
    response = world.client.post(
        RESULTS.format(**world.ids),
        content=raw,
        headers={**world.team, "Content-Type": "application/json"},
    )
    body = _assert_refused(response, 413)
    assert str(MAX_BODY_BYTES) in body["detail"]
    assert world.head() == head


def test_a_body_over_the_limit_is_413_without_content_length(world: World) -> None:
    raw = _padded(MAX_BODY_BYTES + 1024, {"results": GOOD})

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 1 << 16):
            yield raw[start : start + (1 << 16)]

    head = world.head()
    response = world.client.post(
        RESULTS.format(**world.ids),
        content=chunks(),
        headers={**world.team, "Content-Type": "application/json"},
    )
    assert "content-length" not in {k.lower() for k in response.request.headers}
    _assert_refused(response, 413)
    assert world.head() == head


def test_a_streamed_body_is_cut_off_at_the_limit(world: World) -> None:
    """At the ASGI level, as a server hands over a chunked body: refused before it all arrives."""
    import anyio

    app = world.client.app
    chunk = b" " * (1 << 20)
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > 64:
            raise AssertionError("the app kept reading a body far over the limit")
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    token = world.team["Authorization"].encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": RESULTS.format(**world.ids),
        "raw_path": RESULTS.format(**world.ids).encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
            (b"authorization", token),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    head = world.head()
    anyio.run(app, scope, receive, send)  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert headers["content-type"] == PROBLEM
    assert pulled <= MAX_BODY_BYTES // len(chunk) + 1
    assert world.head() == head


def test_a_chunked_body_over_the_limit_is_413_over_real_http(world: World) -> None:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        create_app(world.runtime),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        head = world.head()
        answer = _chunked_post(port, RESULTS.format(**world.ids), world.team["Authorization"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    head_part, _, payload = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head_part.lower()
    assert json.loads(payload)["status"] == 413
    assert world.head() == head


def _chunked_post(port: int, path: str, authorization: str) -> bytes:
    """Send 9 MiB chunked, reading the answer concurrently (the server may stop reading)."""
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:

        def read() -> None:
            try:
                while chunk := sock.recv(65536):
                    received.append(chunk)
                    if b"\r\n\r\n" in b"".join(received) and _complete(b"".join(received)):
                        return
            except OSError:
                return

        reader = threading.Thread(target=read)
        reader.start()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        try:
            sock.sendall(head)
            piece = b" " * (1 << 16)
            frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            for _ in range((9 << 20) // len(piece)):
                if received:
                    break
                sock.sendall(frame)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        reader.join(timeout=20)
    return b"".join(received)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# --------------------------------------------------- after=: 503 + Retry-After


READ_PATHS = [
    "/v1/teams/{team}",
    "/v1/teams/{team}/accounts",
    "/v1/teams/{team}/plans",
    "/v1/plans/{plan}",
    "/v1/plans/{plan}/runs",
    "/v1/runs/{run}",
    "/v1/runs/{run}/results",
    "/v1/backup-exclusions",
]


def test_a_position_the_views_have_not_reached_is_503(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.api, "WAIT_SECONDS", 0.2)
    world.runtime.projector.catch_up()
    head = world.head()
    with TestClient(create_app(world.runtime), raise_server_exceptions=False) as plain:
        for path in READ_PATHS:
            url = path.format(**world.ids)
            started = time.monotonic()
            response = plain.get(url, params={"after": head + 1000}, headers=world.team)
            waited = time.monotonic() - started
            body = _assert_refused(response, 503)
            assert response.headers["retry-after"].isdigit(), path
            assert str(head + 1000) in body["detail"]
            assert 0.2 <= waited < 3, (path, waited)
            # A position the views have reached is served at once.
            assert plain.get(url, params={"after": head}, headers=world.team).status_code == 200


# ----------------------------------------------------------- state conflicts


def test_results_after_the_run_ended_are_409(world: World) -> None:
    ids = world.fresh()
    path = f"/v1/runs/{ids['run']}/results"
    done = world.client.post(
        f"/v1/runs/{ids['run']}/complete", json={"status": "succeeded"}, headers=world.team
    )
    assert done.status_code == 200, done.text
    head = world.head()
    late = world.client.post(path, json={"results": GOOD}, headers=world.team)
    body = _assert_refused(late, 409)
    assert ids["run"] in body["detail"]
    again = world.client.post(
        f"/v1/runs/{ids['run']}/complete", json={"status": "failed"}, headers=world.team
    )
    _assert_refused(again, 409)
    assert world.head() == head
    view = world.client.get(f"/v1/runs/{ids['run']}", headers=world.team).json()
    assert view["total"] == len(GOOD) and view["status"] == "succeeded"


def test_runs_and_plans_on_an_unlinked_account_are_409(world: World) -> None:
    ids = world.fresh()
    unlinked = world.client.delete(f"/v1/accounts/{ids['account']}", headers=world.team)
    assert unlinked.status_code == 200, unlinked.text
    head = world.head()
    run = world.client.post(f"/v1/plans/{ids['plan']}/runs", headers=world.team)
    _assert_refused(run, 409)
    plan = world.client.post(
        "/v1/plans",
        json={"team_id": ids["team"], "account_id": ids["account"], "name": "again"},
        headers=world.team,
    )
    _assert_refused(plan, 409)
    twice = world.client.delete(f"/v1/accounts/{ids['account']}", headers=world.team)
    _assert_refused(twice, 409)
    assert world.head() == head


def test_a_second_exclusion_of_a_plan_is_409(world: World) -> None:
    ids = world.fresh()
    path = f"/v1/plans/{ids['plan']}/backup-exclusion"
    assert world.client.post(path, json={"reason": "r"}, headers=world.team).status_code == 201
    head = world.head()
    _assert_refused(world.client.post(path, json={"reason": "r"}, headers=world.team), 409)
    assert world.head() == head


def test_unknown_routes_and_methods_are_problems(world: World) -> None:
    _assert_refused(world.client.get("/v1/nothing-here", headers=world.team), 404)
    _assert_refused(world.client.put(f"/v1/runs/{world.ids['run']}", headers=world.team), 405)
