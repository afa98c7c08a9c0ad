"""Tenant isolation and authentication of the HTTP API, route by route, on both stores.

A caller scoped to team A gets, for every id of team B, exactly the answer an
unknown id gets (404, same body modulo the id) and appends nothing. Missing or
bad tokens get 401, tokens lacking the scope 403, and token secrets are never
stored in clear.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from psycopg import sql

from service.api import create_app
from service.database import parse_database_url
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings

PROBLEM = "application/problem+json"
BATCH = list(findings(3, seed=11))

Ids = dict[str, str]

# ------------------------------------------------------------------ the routes


@dataclass(frozen=True)
class Route:
    """One route of service/api.py: who may call it and a valid request for given ids."""

    method: str
    path: str
    scopes: frozenset[str]
    body: Callable[[Ids], Any] | None = None

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    def url(self, ids: Ids) -> str:
        return self.path.format(**ids)


def _scopes(*names: str) -> frozenset[str]:
    return frozenset(names)


READ = _scopes("read", "ops")
ROUTES = [
    Route("POST", "/v1/teams", _scopes("ops"), lambda ids: {"name": "another team"}),
    Route("GET", "/v1/teams/{team}", READ),
    Route("GET", "/v1/teams/{team}/accounts", READ),
    Route(
        "POST",
        "/v1/teams/{team}/accounts",
        _scopes("ingest", "ops"),
        lambda ids: {"method": "role", "role_arn": "arn:aws:iam::210987654321:role/audit"},
    ),
    Route("DELETE", "/v1/accounts/{account}", _scopes("ingest", "ops")),
    Route(
        "POST",
        "/v1/plans",
        _scopes("ingest"),
        lambda ids: {"team_id": ids["team"], "account_id": ids["account"], "name": "cis"},
    ),
    Route("GET", "/v1/teams/{team}/plans", READ),
    Route("GET", "/v1/plans/{plan}", READ),
    Route("POST", "/v1/plans/{plan}/runs", _scopes("ingest")),
    Route("GET", "/v1/plans/{plan}/runs", READ),
    Route("POST", "/v1/runs/{run}/results", _scopes("ingest"), lambda ids: {"results": BATCH}),
    Route("GET", "/v1/runs/{run}/results", READ),
    Route("POST", "/v1/runs/{run}/complete", _scopes("ingest"), lambda ids: {"status": "failed"}),
    Route("GET", "/v1/runs/{run}", READ),
    Route(
        "POST",
        "/v1/plans/{plan}/backup-exclusion",
        _scopes("compliance"),
        lambda ids: {"reason": "customer asked", "ticket": "GDPR-1"},
    ),
    Route("GET", "/v1/backup-exclusions", _scopes("compliance", "ops")),
    Route("GET", "/v1/backups", _scopes("ops")),
    Route("POST", "/v1/backups", _scopes("ops"), lambda ids: {"full": False}),
    Route("GET", "/v1/restore-drills", _scopes("ops")),
    Route("POST", "/v1/restore-drills", _scopes("ops"), lambda ids: {}),
    Route(
        "POST",
        "/v1/display-purges",
        _scopes("ops", "compliance"),
        lambda ids: {"plan_id": ids["plan"]},
    ),
]
PUBLIC = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")]
BY_LABEL = {route.label: route for route in ROUTES}
ALL_SCOPES = ("ingest", "read", "compliance", "ops")

# ------------------------------------------------------------------ the world


@dataclass
class Side:
    """One team's resources and tokens."""

    ids: Ids
    excluded_plan: str
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    ops: str
    a: Side
    b: Side

    def head(self) -> int:
        return self.runtime.app.head_position()

    def fresh(self, side: Side) -> Ids:
        """New resources of a team (so a write that succeeds spoils nothing shared)."""
        return _populate(self.runtime, uuid.UUID(side.ids["team"]))


def _populate(runtime: Runtime, team: uuid.UUID) -> Ids:
    app = runtime.app
    account, _ = app.link_account_role(
        team, "arn:aws:iam::123456789012:role/scanner", verified=False, actor="test"
    )
    plan, _ = app.create_plan(team, account.id, "weekly")
    run, _ = app.start_run(team, plan.id)
    app.record_results(team, run.id, BATCH)
    runtime.projector.catch_up()
    return {"team": str(team), "account": str(account.id), "plan": str(plan.id), "run": str(run.id)}


def _side(runtime: Runtime, name: str) -> Side:
    team, _ = runtime.app.create_team(name)
    ids = _populate(runtime, team.id)
    excluded = _populate(runtime, team.id)["plan"]
    runtime.app.request_backup_exclusion(
        team.id, uuid.UUID(excluded), reason="asked", ticket=None, actor="test"
    )
    side = Side(ids, excluded)
    for scopes in (
        ("ingest", "read"),
        ("compliance",),
        ("ingest",),
        ("read",),
        ("compliance", "read"),
    ):
        side.tokens["+".join(scopes)] = runtime.tokens.create(str(team.id), frozenset(scopes))
    return side


class CatchingUpClient(TestClient):
    """Like the ``api`` fixture: the views catch up before every GET."""

    runtime: Runtime

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if method.upper() == "GET":
            self.runtime.projector.catch_up()
        return super().request(method, url, *args, **kwargs)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def store_url(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[str]:
    """One store per module and parameter (the world is read-mostly: cheaper than per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('isolation-db')}/resultsvc.db"
        return
    database: str = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    parts = urlsplit(database)
    yield urlunsplit((parts.scheme, parts.netloc, parts.path, f"schema={schema}", ""))
    config = parse_database_url(database)
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def settings_for(url: str, folder: Path) -> Settings:
    """The store under test; backups and the master key in a folder of the test's own."""
    return Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": url,
            "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{folder}/master.key",
        }
    )


@pytest.fixture(scope="module")
def world(store_url: str, tmp_path_factory: Any) -> Iterator[World]:
    runtime = Runtime.open(settings_for(store_url, tmp_path_factory.mktemp("isolation")))
    try:
        a = _side(runtime, "Team A")
        b = _side(runtime, "Team B")
        ops = runtime.tokens.create(None, frozenset({"ops"}))
        CatchingUpClient.runtime = runtime
        with CatchingUpClient(create_app(runtime), raise_server_exceptions=False) as client:
            yield World(runtime, client, ops, a, b)
    finally:
        runtime.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _call(world: World, route: Route, ids: Ids, token: str | None, **extra: Any) -> Any:
    headers = _auth(token) if token is not None else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if route.body is not None:
        kwargs["json"] = route.body(ids)
    return world.client.request(route.method, route.url(ids), **kwargs, **extra)


def _assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status
    return body


def test_the_matrix_covers_every_route_of_the_api(world: World) -> None:
    served = {
        (method, route.path)
        for route in world.client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    covered = {(route.method, route.path) for route in ROUTES} | set(PUBLIC)
    assert served == covered


# ------------------------------------------------------- another team's ids: 404


@dataclass(frozen=True)
class Probe:
    """A request of team A naming team B's resources in ``foreign`` (path or body)."""

    route: str
    foreign: tuple[str, ...]
    token: str
    body: Callable[[Ids], Any] | None = None
    query: str = ""
    # Send it again on A's own (fresh) ids, to prove the 404 came from isolation;
    # off where that would wipe A's shared display data.
    check_own: bool = True

    def replaced(self, own: Ids, with_ids: dict[str, str]) -> Ids:
        return {**own, **{kind: with_ids[kind] for kind in self.foreign}}


PROBES = [
    Probe("GET /v1/teams/{team}", ("team",), "ingest+read"),
    Probe("GET /v1/teams/{team}/accounts", ("team",), "ingest+read"),
    Probe("GET /v1/teams/{team}/accounts", ("team",), "ingest+read", query="?limit=1&after=1"),
    Probe("GET /v1/teams/{team}/plans", ("team",), "ingest+read"),
    Probe("GET /v1/plans/{plan}", ("plan",), "ingest+read"),
    Probe("GET /v1/plans/{plan}/runs", ("plan",), "ingest+read"),
    Probe("GET /v1/runs/{run}", ("run",), "ingest+read"),
    Probe("GET /v1/runs/{run}/results", ("run",), "ingest+read"),
    Probe("GET /v1/runs/{run}/results", ("run",), "ingest+read", query="?severity=high&limit=2"),
    Probe("GET /v1/runs/{run}", ("run",), "compliance+read"),
    Probe("DELETE /v1/accounts/{account}", ("account",), "ingest+read"),
    Probe("POST /v1/plans", ("team",), "ingest+read"),
    Probe("POST /v1/plans", ("account",), "ingest+read"),
    Probe("POST /v1/plans", ("team", "account"), "ingest+read"),
    Probe("POST /v1/plans/{plan}/runs", ("plan",), "ingest+read"),
    Probe("POST /v1/runs/{run}/results", ("run",), "ingest+read"),
    Probe("POST /v1/runs/{run}/complete", ("run",), "ingest+read"),
    Probe("POST /v1/plans/{plan}/backup-exclusion", ("plan",), "compliance"),
    Probe("POST /v1/display-purges", ("plan",), "compliance"),
    Probe(
        "POST /v1/display-purges",
        ("team",),
        "compliance",
        lambda ids: {"team_id": ids["team"]},
        check_own=False,
    ),
    Probe(
        "POST /v1/display-purges",
        ("team",),
        "compliance",
        lambda ids: {"team_id": ids["team"], "older_than": "1d"},
    ),
]


def _probe_id(probe: Probe) -> str:
    body = "+body" if probe.body else ""
    return f"{probe.route}[{','.join(probe.foreign)}]{probe.query}{body}"


def _send(world: World, probe: Probe, ids: Ids, token: str) -> Any:
    route = BY_LABEL[probe.route]
    make_body = probe.body or route.body
    kwargs: dict[str, Any] = {"headers": _auth(token)}
    if make_body is not None:
        kwargs["json"] = make_body(ids)
    return world.client.request(route.method, route.url(ids) + probe.query, **kwargs)


def _normalised(response: Any, ids: list[str]) -> tuple[int, dict[str, str], str]:
    text = response.text
    headers = dict(response.headers)
    for ident in ids:
        text = text.replace(ident, "<id>")
    return response.status_code, headers, text


@pytest.mark.parametrize("probe", PROBES, ids=_probe_id)
def test_another_teams_id_answers_exactly_like_an_unknown_one(world: World, probe: Probe) -> None:
    token = world.a.tokens[probe.token]
    own = world.fresh(world.a)
    theirs = probe.replaced(own, world.b.ids)
    unknown = probe.replaced(own, {kind: str(uuid.uuid4()) for kind in probe.foreign})
    head = world.head()

    foreign = _send(world, probe, theirs, token)
    missing = _send(world, probe, unknown, token)

    body = _assert_problem(foreign, 404)
    assert "<id>" in _normalised(foreign, [theirs[k] for k in probe.foreign])[2]
    assert _normalised(foreign, [theirs[k] for k in probe.foreign]) == _normalised(
        missing, [unknown[k] for k in probe.foreign]
    )
    assert body["title"] == "Not found"
    assert world.head() == head, "a refused request appended to the log"
    if probe.check_own:
        served = _send(world, probe, own, token)
        assert served.status_code < 300, served.text


def test_team_b_is_left_untouched(world: World) -> None:
    """After every probe (module order), B's resources are as they were."""
    client, b = world.client, world.b
    token = b.tokens["ingest+read"]
    run = client.get(f"/v1/runs/{b.ids['run']}", headers=_auth(token)).json()
    assert run["status"] == "running" and run["total"] == len(BATCH)
    accounts = client.get(f"/v1/teams/{b.ids['team']}/accounts", headers=_auth(token)).json()
    assert all(item["linked"] for item in accounts["items"])
    plan = client.get(f"/v1/plans/{b.ids['plan']}", headers=_auth(token)).json()
    assert plan["backup_excluded"] is False
    results = client.get(f"/v1/runs/{b.ids['run']}/results", headers=_auth(token)).json()
    assert len(results["items"]) == len(BATCH)
    assert world.runtime.queries.list_plans(None, b.ids["team"]).items, "B's plans were purged"


def test_exclusions_list_only_the_callers_team(world: World) -> None:
    a, b = world.a, world.b
    mine = world.client.get("/v1/backup-exclusions", headers=_auth(a.tokens["compliance"]))
    assert mine.status_code == 200, mine.text
    items = mine.json()["items"]
    assert {item["team_id"] for item in items} == {a.ids["team"]}
    assert a.excluded_plan in {item["plan_id"] for item in items}
    assert b.excluded_plan not in mine.text and b.ids["team"] not in mine.text
    # Paging through one item at a time never reaches B's either.
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(50):
        query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = world.client.get(
            "/v1/backup-exclusions" + query, headers=_auth(a.tokens["compliance"])
        ).json()
        seen += [item["plan_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert b.excluded_plan not in seen and a.excluded_plan in seen
    everyone = world.client.get("/v1/backup-exclusions?limit=1000", headers=_auth(world.ops))
    plans = {item["plan_id"] for item in everyone.json()["items"]}
    assert {a.excluded_plan, b.excluded_plan} <= plans


READS = [route for route in ROUTES if route.method == "GET" and "{" in route.path]


@pytest.mark.parametrize("route", READS, ids=lambda r: r.label)
def test_ops_reads_every_team(world: World, route: Route) -> None:
    for side in (world.a, world.b):
        response = _call(world, route, side.ids, world.ops)
        assert response.status_code == 200, response.text
        body = response.json()
        if "items" in body:
            assert body["items"], f"{route.label} of team {side.ids['team']} is empty"
        else:
            assert body["id"] in side.ids.values()
        # The other team's token cannot read it.
        other = world.b if side is world.a else world.a
        denied = _call(world, route, side.ids, other.tokens["ingest+read"])
        _assert_problem(denied, 404)


# ------------------------------------------------------------ 401: who are you


def _bad_tokens(world: World) -> dict[str, str]:
    good = world.a.tokens["ingest+read"]
    token_id = good.split("_")[1]
    revoked = world.runtime.tokens.create(world.a.ids["team"], frozenset(ALL_SCOPES[:3]))
    with world.runtime.views.writing() as cur:
        cur.execute("UPDATE api_tokens SET revoked = 1 WHERE token_id = ?", [revoked.split("_")[1]])
    return {
        "garbage": "garbage",
        "wrong secret": f"rsvc_{token_id}_{'A' * 43}",
        "unknown id": f"rsvc_{'0' * 12}_{good.split('_', 2)[2]}",
        "no secret": f"rsvc_{token_id}_",
        "revoked": revoked,
        "oversize": good + "x" * 300,
    }


PROTECTED = list(ROUTES)  # every route of /v1 takes a token


@pytest.mark.parametrize("route", PROTECTED, ids=lambda r: r.label)
def test_missing_or_bad_token_is_401(world: World, route: Route) -> None:
    ids = world.a.ids
    head = world.head()
    missing = _call(world, route, ids, None)
    body = _assert_problem(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert body["title"] == "Unauthorized"
    basic = world.client.request(
        route.method,
        route.url(ids),
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
        json=route.body(ids) if route.body else None,
    )
    _assert_problem(basic, 401)
    answers = set()
    for kind, token in _bad_tokens(world).items():
        response = _call(world, route, ids, token)
        _assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer", kind
        answers.add(response.text)
    # One answer for every kind of bad token: no oracle for token ids.
    assert len(answers) == 1
    assert world.head() == head


@pytest.mark.parametrize("route", PROTECTED, ids=lambda r: r.label)
def test_token_without_the_scope_is_403(world: World, route: Route) -> None:
    ids = world.fresh(world.a)
    tokens = {
        "ingest": world.a.tokens["ingest"],
        "read": world.a.tokens["read"],
        "compliance": world.a.tokens["compliance"],
        "ops": world.ops,
    }
    head = world.head()
    refused = [scope for scope in ALL_SCOPES if scope not in route.scopes]
    assert refused, route.label
    for scope in refused:
        response = _call(world, route, ids, tokens[scope])
        body = _assert_problem(response, 403)
        assert body["title"] == "Forbidden"
        assert any(allowed in body["detail"] for allowed in route.scopes)
    assert world.head() == head
    # A token with one allowed scope gets past the scope check.
    allowed = sorted(route.scopes)[0]
    served = _call(world, route, ids, tokens[allowed])
    assert served.status_code not in (401, 403), served.text


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_restore_drills_are_for_ops_only(world: World, method: str) -> None:
    """No team token, whatever its scopes, lists or runs drills; ops does both."""
    route = BY_LABEL[f"{method} /v1/restore-drills"]
    head = world.head()
    for side in (world.a, world.b):
        for name, token in side.tokens.items():
            body = _assert_problem(_call(world, route, side.ids, token), 403)
            assert "scope ops" in body["detail"], name
    assert world.head() == head, "a refused drill request appended to the log"
    served = _call(world, route, world.a.ids, world.ops)
    if method == "GET":
        assert served.status_code == 200, served.text
        assert set(served.json()) == {"items", "next_cursor"}
    else:  # a drill ran (201) or there is no backup yet (409); either way an answer for ops
        assert served.status_code in (201, 409), served.text
        assert world.head() == head + (1 if served.status_code == 201 else 0)


@pytest.mark.parametrize(("method", "path"), PUBLIC)
def test_operations_pages_need_no_token(world: World, method: str, path: str) -> None:
    response = world.client.request(method, path)
    assert response.status_code == 200, response.text


# ----------------------------------------------------------- secrets at rest


def test_tokens_are_stored_hashed(world: World) -> None:
    token = world.runtime.tokens.create(world.a.ids["team"], frozenset({"read"}))
    secret = token.split("_", 2)[2]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert world.client.get(f"/v1/teams/{world.a.ids['team']}", headers=_auth(token)).is_success
    needles = [secret, secret.encode().hex(), token]
    with world.runtime.views.reading() as cur:
        rows = cur.fetchall("SELECT * FROM api_tokens")
    cells = [str(cell) for row in rows for cell in row]
    assert digest in cells, "the token's row was not found: the scan below would prove nothing"
    assert not [cell for cell in cells for needle in needles if needle in cell]
    views = world.runtime.views
    if views.dialect == "sqlite":
        assert views.sqlite_path is not None
        files = [p for p in views.sqlite_path.parent.iterdir() if p.is_file()]
        blob = b"".join(p.read_bytes() for p in files)
        assert digest.encode() in blob, "the hash is not in the files: the scan proves nothing"
        for needle in needles:
            assert needle.encode() not in blob
    else:
        with views.reading() as cur:
            tables = [
                r[0]
                for r in cur.fetchall(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            ]
            assert "api_tokens" in tables
            for table in tables:
                for (text,) in cur.fetchall(f'SELECT CAST(t AS TEXT) FROM "{table}" t'):
                    assert not [needle for needle in needles if needle in text], table
