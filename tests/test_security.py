"""Security checks: HTTP API, token store, the demo's files, the key file; on both stores.

What this file adds to the suites beside it (``test_api_isolation``,
``test_api_errors``, ``test_secret_scan``, ``test_keys``, ``test_backups``):

1. Isolation of the ops-only routes against *every* team token (combined
   scopes included) with "no data" checks, another team's *already excluded*
   plan (no 409 oracle, no key shredded), and that plan's invisibility in
   every list, found from the OpenAPI document.
2. Tokens: the secret is nowhere in any row of any table (events included,
   inside their zstd frames), ``authenticate`` goes through
   ``hmac.compare_digest`` for valid, wrong, unknown and revoked tokens and
   never uses ``==`` on secrets, malformed tokens get 401.
3. SQL injection in every query parameter the OpenAPI document lists, and
   forged cursors on every list: never a 5xx, never another team's ids,
   every table intact afterwards.
4. Oversized and deeply nested bodies on every route that takes a body.
5. ``resultsvc demo`` as a process, then a byte scan of everything it wrote
   for the master key, the plan keys and the backup data keys, and of the
   backup objects for plaintext findings.
6. ``resultsvc backup run`` refusing a master key file readable by group or
   others, writing nothing.
"""

from __future__ import annotations

import ast
import base64
import hmac
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import zstandard
from fastapi.testclient import TestClient
from psycopg import sql

import service.tokens
from domain import findings as rules
from projections.sqlstore import ViewDatabase
from retention.catalog import Catalog
from retention.format import unb64
from retention.keyring import Keyring, object_key
from retention.keys import open_master_key
from retention.stores import open_store
from service.api import MAX_BODY_BYTES, create_app
from service.backups import Backups
from service.database import parse_database_url, view_database
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings

PROBLEM = "application/problem+json"
RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
BATCH = list(findings(3, seed=23))
COMMAND_SECONDS = 120
SAFE_NAME = re.compile(r"[A-Za-z0-9_]+")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN_SCOPES: dict[str, frozenset[str]] = {
    "ingest": frozenset({"ingest"}),
    "read": frozenset({"read"}),
    "compliance": frozenset({"compliance"}),
    "ingest+read": frozenset({"ingest", "read"}),
    "compliance+read": frozenset({"compliance", "read"}),
    "all": frozenset({"ingest", "read", "compliance"}),
}


# ============================================================== shared helpers


def auth(token: str | bytes) -> dict[str, Any]:
    if isinstance(token, bytes):
        return {"Authorization": b"Bearer " + token}
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: Any, *statuses: int) -> dict[str, Any]:
    """A problem+json answer with one of ``statuses`` (and never a 5xx)."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == PROBLEM, response.headers
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}, body
    assert body["status"] == response.status_code
    return body


def table_names(views: ViewDatabase) -> list[str]:
    with views.reading() as cur:
        if views.dialect == "sqlite":
            rows = cur.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = cur.fetchall(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
    names = sorted(str(row[0]) for row in rows)
    assert names, "the database has no tables"
    assert all(SAFE_NAME.fullmatch(name) for name in names), names
    return names


def row_counts(views: ViewDatabase) -> dict[str, int]:
    """Every table of the store (events, views, tokens, keyring...) and its row count."""
    names = table_names(views)
    counts: dict[str, int] = {}
    with views.reading() as cur:
        for name in names:
            row = cur.fetchone(f'SELECT COUNT(*) FROM "{name}"')
            assert row is not None
            counts[name] = int(row[0])
    return counts


def _cell_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def every_cell(views: ViewDatabase) -> Iterator[tuple[str, bytes]]:
    """Every column of every row of every table, as bytes (BLOB/bytea whole)."""
    for name in table_names(views):
        with views.reading() as cur:
            rows = cur.fetchall(f'SELECT * FROM "{name}"')
            columns = [column[0] for column in cur.raw.description]
        for number, row in enumerate(rows):
            for column, value in zip(columns, row, strict=True):
                yield f"{name}[{number}].{column}", _cell_bytes(value)


def layers(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The bytes themselves, then the content of every zstd frame in them (event states)."""
    yield "", data
    view = memoryview(data)
    start = data.find(ZSTD_MAGIC)
    while start >= 0:
        try:
            plain = zstandard.ZstdDecompressor().decompressobj().decompress(view[start:])
        except zstandard.ZstdError:
            plain = b""
        if plain:
            yield f" > zstd frame at {start}", plain
        start = data.find(ZSTD_MAGIC, start + 1)


def scan(needles: Mapping[str, bytes], where: str, data: bytes) -> list[str]:
    """Where each needle occurs in ``data`` or inside its zstd frames."""
    return [
        f"{name} in {where}{layer}"
        for layer, chunk in layers(data)
        for name, needle in needles.items()
        if needle in chunk
    ]


def key_forms(label: str, key: bytes) -> dict[str, bytes]:
    """A key as it could be written: raw, hex, base64 (standard and URL-safe)."""
    assert len(key) == 32, label
    return {
        f"{label} (raw)": key,
        f"{label} (hex)": key.hex().encode(),
        f"{label} (HEX)": key.hex().upper().encode(),
        f"{label} (base64)": base64.b64encode(key).rstrip(b"="),
        f"{label} (base64url)": base64.urlsafe_b64encode(key).rstrip(b"="),
    }


def files_under(*roots: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = path.read_bytes()
    return found


# ================================================================ the world


@dataclass
class Side:
    """One team: its resources, an excluded plan, and a token of every scope combination."""

    team: str
    accounts: list[str]
    plans: list[str]
    runs: list[str]
    excluded_plan: str
    excluded_runs: list[str]
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> dict[str, str]:
        """Values for the path parameters of every route."""
        return {
            "team": self.team,
            "account": self.accounts[0],
            "plan": self.plans[0],
            "run": self.runs[0],
        }

    def every_id(self) -> set[str]:
        token_ids = {token.split("_")[1] for token in self.tokens.values()}
        return {
            self.team,
            *self.accounts,
            *self.plans,
            *self.runs,
            self.excluded_plan,
            *self.excluded_runs,
            *token_ids,
        }


class CatchingUpClient(TestClient):
    """The views catch up before every GET (as in the other API suites)."""

    runtime: Runtime

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        if method.upper() == "GET":
            self.runtime.projector.catch_up()
        return super().request(method, url, *args, **kwargs)


@dataclass
class World:
    runtime: Runtime
    client: TestClient  # catches the views up before every GET
    plain: TestClient  # does not: for floods of reads on settled views
    ops: str
    a: Side
    b: Side
    openapi: dict[str, Any]

    def head(self) -> int:
        return self.runtime.app.head_position()

    def settle(self) -> dict[str, int]:
        """Views caught up; the row count of every table."""
        self.runtime.projector.catch_up()
        return row_counts(self.runtime.views)

    def backup_ids(self) -> list[str]:
        return Catalog(open_store(self.runtime.settings.backup_url)).ids()

    def routes(self, method: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (path, operations[method.lower()])
            for path, operations in self.openapi["paths"].items()
            if path.startswith("/v1/") and method.lower() in operations
        ]


def _side(runtime: Runtime, client: TestClient, name: str) -> Side:
    app = runtime.app
    team, _ = app.create_team(name)
    accounts = [
        str(
            app.link_account_role(
                team.id, f"arn:aws:iam::12345678901{n}:role/scanner", verified=False, actor="t"
            )[0].id
        )
        for n in range(2)
    ]
    plans: list[str] = []
    runs: list[list[str]] = []
    for n in range(3):
        plan, _ = app.create_plan(team.id, uuid.UUID(accounts[0]), f"plan-{n}")
        plans.append(str(plan.id))
        runs.append([])
        for _ in range(2):
            run, _ = app.start_run(team.id, plan.id)
            app.record_results(team.id, run.id, BATCH)
            runs[-1].append(str(run.id))
    side = Side(str(team.id), accounts, plans[:2], runs[0] + runs[1], plans[2], runs[2])
    for label, scopes in TOKEN_SCOPES.items():
        side.tokens[label] = runtime.tokens.create(str(team.id), scopes)
    return side


def _exclude(world_client: TestClient, side: Side, plan: str) -> None:
    answer = world_client.post(
        f"/v1/plans/{plan}/backup-exclusion",
        json={"reason": "customer asked", "ticket": "SEC-1"},
        headers=auth(side.tokens["compliance"]),
    )
    assert answer.status_code == 201, answer.text


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def store_url(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('security-db')}/resultsvc.db"
        return
    database: str = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    parts = urlsplit(database)
    yield urlunsplit((parts.scheme, parts.netloc, parts.path, f"schema={schema}", ""))
    config = parse_database_url(database)
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def world(store_url: str, tmp_path_factory: Any) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("security")
    runtime = Runtime.open(
        Settings.from_env(
            {
                "RESULTSVC_DATABASE_URL": store_url,
                "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
                "RESULTSVC_MASTER_KEY": f"file://{folder}/keys/master.key",
            }
        )
    )
    try:
        CatchingUpClient.runtime = runtime
        with CatchingUpClient(create_app(runtime), raise_server_exceptions=False) as client:
            a = _side(runtime, client, "Team A")
            b = _side(runtime, client, "Team B")
            ops = runtime.tokens.create(None, frozenset({"ops"}))
            # A full backup (every plan gets a key), the exclusions (keys shredded), an
            # incremental backup and a drill: every ops list has something in it.
            for full in (True,):
                taken = client.post("/v1/backups", json={"full": full}, headers=auth(ops))
                assert taken.status_code == 201, taken.text
            _exclude(client, a, a.excluded_plan)
            _exclude(client, b, b.excluded_plan)
            taken = client.post("/v1/backups", json={}, headers=auth(ops))
            assert taken.status_code == 201, taken.text
            drill = client.post("/v1/restore-drills", json={}, headers=auth(ops))
            assert drill.status_code == 201 and drill.json()["passed"], drill.text
            openapi = client.get("/openapi.json").json()
            runtime.projector.catch_up()
            with TestClient(create_app(runtime), raise_server_exceptions=False) as plain:
                yield World(runtime, client, plain, ops, a, b, openapi)
    finally:
        runtime.close()


def _fill(path: str, ids: Mapping[str, str]) -> str:
    names = re.findall(r"{(\w+)}", path)
    missing = [name for name in names if name not in ids]
    assert not missing, f"{path}: no test id for path parameter(s) {missing}: extend Side.ids"
    return path.format(**ids)


def _normalised(response: Any, ids: list[str]) -> tuple[int, str]:
    text = response.text
    for ident in ids:
        text = text.replace(ident, "<id>")
    return response.status_code, text


# ====================================================== 1. isolation: ops routes


OPS_ONLY: list[tuple[str, str, Any]] = [
    ("GET", "/v1/backups", None),
    ("GET", "/v1/backups?limit=1000", None),
    ("POST", "/v1/backups", {"full": True}),
    ("GET", "/v1/restore-drills", None),
    ("GET", "/v1/restore-drills?limit=1000", None),
    ("POST", "/v1/restore-drills", {}),
    ("POST", "/v1/teams", {"name": "intruders"}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), OPS_ONLY, ids=[f"{m} {p}" for m, p, _ in OPS_ONLY]
)
def test_no_team_token_gets_anything_from_an_ops_only_route(
    world: World, method: str, path: str, body: Any
) -> None:
    """Every token of both teams, whatever its scopes, is refused and learns nothing."""
    backups = world.backup_ids()
    listed = (
        world.client.get(path.split("?")[0], headers=auth(world.ops)) if method == "GET" else None
    )
    secrets_of_ops = set(backups)
    if listed is not None:
        assert listed.status_code == 200 and listed.json()["items"], listed.text
        secrets_of_ops |= {str(item.get("id")) for item in listed.json()["items"]}
    counts, head = world.settle(), world.head()
    for side, other in ((world.a, world.b), (world.b, world.a)):
        for label, token in side.tokens.items():
            answer = world.client.request(method, path, json=body, headers=auth(token))
            problem = assert_problem(answer, 403, 404)
            assert "scope ops" in problem["detail"], (label, problem)
            leaked = [s for s in secrets_of_ops | other.every_id() if s in answer.text]
            assert not leaked, (label, leaked)
    assert world.head() == head, "a refused request appended to the log"
    assert world.backup_ids() == backups, "a refused request took a backup"
    assert world.settle() == counts


def test_compliance_cannot_exclude_another_teams_plan(world: World) -> None:
    """B's plans, excluded or not, answer A's compliance tokens like unknown plans.

    An already excluded plan must not answer 409 (that would tell A it exists),
    and B's plan keys must survive: a refused request shreds nothing.
    """
    b = world.b
    ring = Backups.open(world.runtime).keyring
    store = open_store(world.runtime.settings.backup_url)
    assert ring.key_for_reading(b.plans[0]) is not None
    store.head(object_key(b.plans[0]))
    head = world.head()
    for label in ("compliance", "compliance+read", "all"):
        token = world.a.tokens[label]
        for plan in (b.plans[0], b.excluded_plan):
            unknown = str(uuid.uuid4())
            foreign = world.client.post(
                f"/v1/plans/{plan}/backup-exclusion",
                json={"reason": "not yours", "ticket": "X-1"},
                headers=auth(token),
            )
            missing = world.client.post(
                f"/v1/plans/{unknown}/backup-exclusion",
                json={"reason": "not yours", "ticket": "X-1"},
                headers=auth(token),
            )
            assert assert_problem(foreign, 404)["title"] == "Not found"
            assert _normalised(foreign, [plan]) == _normalised(missing, [unknown]), label
    assert world.head() == head
    fresh = Keyring(store, open_master_key(world.runtime.settings.master_key), world.runtime.views)
    assert fresh.key_for_reading(b.plans[0]) is not None, "B's plan key was shredded"
    store.head(object_key(b.plans[0]))
    plan = world.client.get(f"/v1/plans/{b.plans[0]}", headers=auth(b.tokens["read"])).json()
    assert plan["backup_excluded"] is False


def test_exclusion_lists_never_reach_another_team_whatever_the_cursor(world: World) -> None:
    """A's compliance token, paging with cursors taken from the ops listing (which
    points between B's rows), still sees only A's exclusions."""
    everyone = world.client.get("/v1/backup-exclusions?limit=1", headers=auth(world.ops))
    cursors: list[str] = []
    page = everyone.json()
    while page["next_cursor"] is not None and len(cursors) < 50:
        cursors.append(page["next_cursor"])
        page = world.client.get(
            "/v1/backup-exclusions",
            params={"limit": 1, "cursor": page["next_cursor"]},
            headers=auth(world.ops),
        ).json()
    assert cursors, "the ops listing has a single page: the cursors prove nothing"
    for label in ("compliance", "compliance+read"):
        token = world.a.tokens[label]
        for cursor in [None, *cursors]:
            params: dict[str, Any] = {"limit": 1000}
            if cursor is not None:
                params["cursor"] = cursor
            answer = world.client.get("/v1/backup-exclusions", params=params, headers=auth(token))
            assert answer.status_code == 200, answer.text
            assert {item["team_id"] for item in answer.json()["items"]} <= {world.a.team}
            assert not [i for i in world.b.every_id() if i in answer.text], (label, cursor)


def _page_through(world: World, path: str, token: str) -> list[str]:
    """Every answer of a list read one item at a time (and in one go)."""
    texts: list[str] = []
    whole = world.client.get(path, params={"limit": 1000}, headers=auth(token))
    texts.append(whole.text)
    if whole.status_code != 200 or "next_cursor" not in whole.json():
        return texts
    params: dict[str, Any] = {"limit": 1}
    for _ in range(100):
        page = world.client.get(path, params=params, headers=auth(token))
        assert page.status_code == 200, page.text
        texts.append(page.text)
        if page.json()["next_cursor"] is None:
            break
        params["cursor"] = page.json()["next_cursor"]
    return texts


def test_another_teams_excluded_plan_is_invisible_in_every_list(world: World) -> None:
    """Every GET route of the OpenAPI document, with every token of A, on A's ids (the
    excluded plan and its runs included): no id of B anywhere, B's excluded plan in
    particular; and B's excluded plan and its runs named directly answer 404 like
    unknown ids."""
    a, b = world.a, world.b
    reads = [path for path, _ in world.routes("get")]
    assert {"/v1/teams/{team}/plans", "/v1/backup-exclusions", "/v1/plans/{plan}/runs"} <= set(
        reads
    )
    own_variants = [
        a.ids,
        {**a.ids, "plan": a.excluded_plan, "run": a.excluded_runs[0]},
    ]
    served = 0
    for path in reads:
        for label, token in a.tokens.items():
            for ids in own_variants:
                for text in _page_through(world, _fill(path, ids), token):
                    served += '"items"' in text or '"id"' in text
                    assert b.excluded_plan not in text, (path, label)
                    leaked = [i for i in b.every_id() if i in text]
                    assert not leaked, (path, label, leaked)
    assert served > len(reads), "hardly any read was served: the scan proves nothing"
    # B's excluded plan and its runs, named in A's requests.
    foreign = {"plan": b.excluded_plan, "run": b.excluded_runs[0]}
    for path in reads:
        names = [name for name in re.findall(r"{(\w+)}", path) if name in foreign]
        if not names:
            continue
        unknown = {name: str(uuid.uuid4()) for name in names}
        for label in ("read", "compliance+read", "all"):
            token = a.tokens[label]
            theirs = world.client.get(_fill(path, {**a.ids, **foreign}), headers=auth(token))
            missing = world.client.get(_fill(path, {**a.ids, **unknown}), headers=auth(token))
            assert_problem(theirs, 404)
            assert _normalised(theirs, [foreign[n] for n in names]) == _normalised(
                missing, list(unknown.values())
            ), (path, label)
    for label in ("compliance", "all"):
        purge = world.client.post(
            "/v1/display-purges", json={"plan_id": b.excluded_plan}, headers=auth(a.tokens[label])
        )
        assert_problem(purge, 404)


# ================================================================= 2. tokens


def test_token_secrets_are_in_no_row_of_any_table(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """After creating tokens and using them every way (served, refused, idempotent
    appends, 404s), no column of any row of any table (event states decompressed)
    holds a secret or a whole token; only the SHA-256 of each secret is stored."""
    import hashlib

    caplog.set_level(logging.DEBUG)
    runtime, client = world.runtime, world.client
    team = world.a.team
    made = {
        label: runtime.tokens.create(team if label != "ops" else None, scopes)
        for label, scopes in {**TOKEN_SCOPES, "ops": frozenset({"ops"})}.items()
    }
    for label, token in made.items():
        headers = auth(token)
        client.get(f"/v1/teams/{team}", headers=headers)
        client.get(f"/v1/teams/{world.b.team}", headers=headers)
        client.get("/v1/backup-exclusions", headers=headers)
        client.post(
            f"/v1/plans/{world.a.plans[0]}/runs",
            headers={**headers, "Idempotency-Key": f"sec-{label}"},
        )
        client.post(
            f"/v1/runs/{world.a.runs[0]}/results",
            json={"results": BATCH},
            headers={**headers, "Idempotency-Key": f"sec-results-{label}"},
        )
    served = client.get(f"/v1/teams/{team}", headers=auth(made["read"]))
    assert served.status_code == 200, served.text
    world.runtime.projector.catch_up()

    needles: dict[str, bytes] = {}
    digests: dict[str, bytes] = {}
    for label, token in made.items():
        secret = token.split("_", 2)[2]
        needles[f"{label} token"] = token.encode()
        needles[f"{label} secret"] = secret.encode()
        needles[f"{label} secret hex"] = secret.encode().hex().encode()
        needles[f"{label} secret base64"] = base64.b64encode(secret.encode()).rstrip(b"=")
        digests[label] = hashlib.sha256(secret.encode()).hexdigest().encode()
    hits: list[str] = []
    seen_digests: set[str] = set()
    cells = 0
    for where, data in every_cell(runtime.views):
        cells += 1
        hits += scan(needles, where, data)
        seen_digests |= {label for label, digest in digests.items() if digest == data}
    assert seen_digests == set(made), "a token's hash row was not found: the scan proves nothing"
    assert cells > 100
    views = runtime.views
    if views.dialect == "sqlite":
        assert views.sqlite_path is not None
        for path, data in files_under(views.sqlite_path.parent).items():
            hits += scan(needles, path, data)
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    ).encode()
    hits += scan(needles, "the logs", logged)
    assert not hits, "token secrets stored:\n" + "\n".join(hits)


@dataclass
class Recorder:
    """Stands in for ``hmac.compare_digest``: records who called it with what, then calls it."""

    real: Callable[[Any, Any], bool]
    calls: list[tuple[str, Any, Any, bool]] = field(default_factory=list)

    def __call__(self, left: Any, right: Any) -> bool:
        caller = sys._getframe(1).f_code.co_filename
        result = self.real(left, right)
        self.calls.append((caller, left, right, result))
        return result


def test_authenticate_compares_in_constant_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``hmac.compare_digest`` of two 64-byte digests per check, whatever is wrong."""
    tokens = world.runtime.tokens
    good = tokens.create(world.a.team, frozenset({"read"}))
    revoked = tokens.create(world.a.team, frozenset({"read"}))
    with world.runtime.views.writing() as cur:
        cur.execute("UPDATE api_tokens SET revoked = 1 WHERE token_id = ?", [revoked.split("_")[1]])
    token_id, secret = good.split("_", 2)[1:]
    cases = {
        "valid": (good, True),
        "wrong secret": (f"rsvc_{token_id}_{'A' * len(secret)}", False),
        "wrong last character": (good[:-1] + ("A" if good[-1] != "A" else "B"), False),
        "unknown id": (f"rsvc_{'0' * len(token_id)}_{secret}", False),
        "revoked": (revoked, False),
    }
    recorder = Recorder(hmac.compare_digest)
    monkeypatch.setattr(hmac, "compare_digest", recorder)
    for label, (token, valid) in cases.items():
        recorder.calls.clear()
        principal = tokens.authenticate(token)
        assert (principal is not None) is valid, label
        ours = [call for call in recorder.calls if call[0] == service.tokens.__file__]
        assert len(ours) == 1, (label, recorder.calls)
        _, left, right, result = ours[0]
        assert isinstance(left, bytes) and isinstance(right, bytes), label
        assert len(left) == len(right) == 64, label  # equal lengths: no early exit on length
        assert result is (label in ("valid", "revoked")), label
    # And through the API, on a served request.
    recorder.calls.clear()
    served = world.client.get(f"/v1/teams/{world.a.team}", headers=auth(good))
    assert served.status_code == 200, served.text
    assert [call for call in recorder.calls if call[0] == service.tokens.__file__]


def test_authenticate_never_compares_secrets_with_equality() -> None:
    """service/tokens.py, read as code: the secret and its digest meet only in
    ``hmac.compare_digest``, never in ``==``/``!=``/``in``, nor in SQL."""
    tree = ast.parse(inspect.getsource(service.tokens))
    store = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TokenStore")
    method = next(
        n for n in store.body if isinstance(n, ast.FunctionDef) and n.name == "authenticate"
    )
    secret_names = {"secret", "stored", "matches"}

    def touches_secret(node: ast.AST) -> bool:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and inner.id in secret_names:
                return True
            if isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "_digest":
                return True
            if (
                isinstance(inner, ast.Subscript)
                and isinstance(inner.value, ast.Name)
                and inner.value.id == "row"
                and isinstance(inner.slice, ast.Constant)
                and inner.slice.value == 0  # the stored hash
            ):
                return True
        return False

    equality = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)

    def offending(code: ast.AST) -> list[str]:
        return [
            ast.unparse(node)
            for node in ast.walk(code)
            if isinstance(node, ast.Compare)
            and any(isinstance(op, equality) for op in node.ops)
            and touches_secret(node)
        ]

    # The detector sees what it is meant to see.
    assert offending(ast.parse("ok = row[0] == _digest(secret)"))
    assert offending(ast.parse("ok = stored != x"))
    assert not offending(ast.parse("ok = row is None or row[3] == 1"))
    assert not offending(tree), offending(tree)
    calls = [
        ast.unparse(node.func)
        for node in ast.walk(method)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    assert "hmac.compare_digest" in calls, calls
    queries = [
        node.value
        for node in ast.walk(method)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "SELECT" in node.value
    ]
    assert queries and not [q for q in queries if "secret_sha256 =" in q.split("WHERE", 1)[-1]]


def _malformed(world: World) -> dict[str, str | bytes]:
    good = world.a.tokens["read"]
    token_id, secret = good.split("_", 2)[1:]
    return {
        "empty": "",
        "prefix only": "rsvc_",
        "prefix and separator": "rsvc__",
        "no secret": f"rsvc_{token_id}_",
        "no id": f"rsvc__{secret}",
        "10 KB": "rsvc_" + "a" * 10_240,
        "10 KB secret": f"rsvc_{token_id}_" + "s" * 10_240,
        "non-ASCII (UTF-8)": f"rsvc_{token_id}é€_{secret}".encode(),
        "non-ASCII (Latin-1)": f"rsvc_{token_id}_{secret}é".encode("latin-1"),
        "SQL in id": f"rsvc_' OR '1'='1_{secret}",
        "SQL in id (drop)": f"rsvc_1;DROP TABLE api_tokens;--_{secret}",
        "SQL in id (union)": (
            f"rsvc_x' UNION SELECT secret_sha256,team_id,scopes,0 FROM api_tokens--_{secret}"
        ),
        "SQL wildcard id": f"rsvc_%_{secret}",
        "SQL in secret": f"rsvc_{token_id}_' OR '1'='1",
        "placeholder in id": f"rsvc_?_{secret}",
        "pyformat in id": f"rsvc_%s_{secret}",
        "control character": f"rsvc_{token_id}\x01_{secret}",
        "another prefix": f"RSVC_{token_id}_{secret}",
        "revoked": _revoked(world),
    }


def _revoked(world: World) -> str:
    token = world.runtime.tokens.create(world.a.team, frozenset({"read"}))
    with world.runtime.views.writing() as cur:
        cur.execute("UPDATE api_tokens SET revoked = 1 WHERE token_id = ?", [token.split("_")[1]])
    return token


def test_malformed_tokens_are_401_problems(world: World) -> None:
    path = f"/v1/teams/{world.a.team}"
    assert world.client.get(path, headers=auth(world.a.tokens["read"])).status_code == 200
    malformed = _malformed(world)  # the revoked token is made here, before the count
    counts = world.settle()
    bodies: set[str] = set()
    for label, token in malformed.items():
        for method, url, body in (
            ("GET", path, None),
            ("POST", f"/v1/runs/{world.a.runs[0]}/results", {"results": BATCH}),
        ):
            answer = world.client.request(method, url, json=body, headers=auth(token))
            problem = assert_problem(answer, 401)
            assert answer.headers["www-authenticate"] == "Bearer", label
            assert problem["title"] == "Unauthorized", label
            bodies.add(answer.text)
    # Two answers only: "missing bearer token" (empty) and "invalid or revoked token".
    assert len(bodies) == 2, bodies
    assert world.settle() == counts, "a refused token changed a table"


def test_a_nul_byte_in_the_token_id_is_401(world: World) -> None:
    """uvicorn's h11 refuses NUL in a header (400), so the shipped server never passes
    one on; any other way into the ASGI app (another server, a proxy speaking ASGI, an
    in-process caller) does, and ``authenticate`` promises ``None`` "whatever was
    wrong with it"."""
    secret = world.a.tokens["read"].split("_", 2)[2]
    answer = world.client.get(f"/v1/teams/{world.a.team}", headers=auth(f"rsvc_ab\x00cd_{secret}"))
    assert_problem(answer, 401)
    assert world.runtime.tokens.authenticate(f"rsvc_\x00_{secret}") is None


# ======================================================== 3. SQL injection


INJECTIONS: dict[str, str] = {
    "quote or": "' OR '1'='1",
    "drop": "1; DROP TABLE view_results; --",
    "double quote": '") OR 1=1 --',
    "percent-encoded quote": "%27",
    "percent-encoded quote or": "%27%20OR%20%271%27%3D%271",
    "unicode quotes": "\u2019 OR \u20181\u2019=\u20181\u2019 --",
    "fullwidth quotes": "\uff07 OR \uff11\uff1d\uff11 --",
    "NUL": "\x00",
    "NUL after a value": "high\x00' OR 1=1 --",
    "10 KB": "'" * 10_240,
    "pyformat": "%s%s%(x)s",
    "placeholder": "?",
    "negative": "-1",
    "huge": str(10**400),
    "union": "x' UNION SELECT token_id, secret_sha256 FROM api_tokens --",
}


def _query_parameters(world: World) -> list[tuple[str, str]]:
    """(path, name) of every query parameter of every GET route of /v1."""
    found = [
        (path, parameter["name"])
        for path, operation in world.routes("get")
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    ]
    names = {name for _, name in found}
    assert {"cursor", "limit", "after", "severity", "status"} <= names, names
    return found


def _token_for(world: World, path: str) -> str:
    """A's token with read and compliance, or ops where A is refused (ops-only lists)."""
    token = world.a.tokens["compliance+read"]
    answer = world.client.get(path, headers=auth(token))
    if answer.status_code == 403:
        return world.ops
    assert answer.status_code == 200, (path, answer.text)
    return token


@dataclass
class Verdicts:
    """Checks answers against the rules; collects what broke them."""

    world: World
    failures: list[str] = field(default_factory=list)
    answered: dict[int, int] = field(default_factory=dict)

    def check(self, what: str, answer: Any, baseline: list[str] | None, cross_team: bool) -> None:
        self.answered[answer.status_code] = self.answered.get(answer.status_code, 0) + 1
        if answer.status_code >= 500:
            self.failures.append(f"{what}: {answer.status_code} {answer.text[:200]}")
            return
        if answer.status_code >= 400:
            if answer.headers.get("content-type") != PROBLEM:
                self.failures.append(f"{what}: {answer.status_code} not problem+json")
            return
        if answer.status_code != 200:
            self.failures.append(f"{what}: unexpected {answer.status_code}")
            return
        if cross_team:
            leaked = [i for i in self.world.b.every_id() if i in answer.text]
            if leaked:
                self.failures.append(f"{what}: another team's ids {leaked}")
        if baseline is not None and "items" in answer.json():
            extra = [
                item for item in map(_canonical, answer.json()["items"]) if item not in baseline
            ]
            if extra:
                self.failures.append(f"{what}: rows beyond the unfiltered list: {extra[:2]}")


def _canonical(item: Any) -> str:
    return json.dumps(item, sort_keys=True)


def _baseline(world: World, path: str, token: str) -> list[str] | None:
    whole = world.client.get(path, params={"limit": 1000}, headers=auth(token))
    assert whole.status_code == 200, whole.text
    body = whole.json()
    return [_canonical(item) for item in body["items"]] if "items" in body else None


def test_sql_injection_in_every_query_parameter(world: World) -> None:
    """Every payload in every query parameter of the OpenAPI document (sent encoded, and
    raw in the URL): 4xx problem or a 200 that holds no more than the plain list and no
    id of B; afterwards every table is there with the same number of rows."""
    counts, head = world.settle(), world.head()
    verdicts = Verdicts(world)
    parameters = _query_parameters(world)
    for path, name in parameters:
        url = _fill(path, world.a.ids)
        token = _token_for(world, url)
        baseline = _baseline(world, url, token)
        cross_team = token != world.ops
        for label, payload in INJECTIONS.items():
            what = f"GET {path}?{name}= {label}"
            encoded = world.plain.get(url, params={name: payload}, headers=auth(token))
            verdicts.check(what, encoded, baseline, cross_team)
            answers = [encoded]
            if "'" in payload or "%" in payload:
                # unencoded in the URL: the server decodes %27 itself
                raw = world.plain.get(
                    f"{url}?{name}={quote(payload, safe=chr(39) + '%=;()')}", headers=auth(token)
                )
                verdicts.check(what + " (raw)", raw, baseline, cross_team)
                answers.append(raw)
            if name in ("severity", "status", "limit", "after"):
                # typed parameters: every payload is refused, naming the parameter
                for answer in answers:
                    if answer.status_code != 422 or name not in answer.text:
                        verdicts.failures.append(f"{what}: {answer.status_code}, not 422")
    assert not verdicts.failures, "\n".join(verdicts.failures)
    assert verdicts.answered.get(422, 0) > len(parameters), verdicts.answered
    assert world.head() == head
    assert world.settle() == counts, "a table changed or vanished"


def test_sql_injection_in_path_ids(world: World) -> None:
    """Path ids are the other values a client puts into a read's SQL."""
    counts, head = world.settle(), world.head()
    reads = [path for path, _ in world.routes("get") if "{" in path]
    assert len(reads) >= 6, reads
    for label, payload in INJECTIONS.items():
        ids = {name: quote(payload, safe="") for name in ("team", "account", "plan", "run")}
        for path in reads:
            answer = world.plain.get(_fill(path, ids), headers=auth(world.a.tokens["all"]))
            assert_problem(answer, 404, 422)
            assert answer.status_code == 422 or "/" in payload or "%2F" in ids["team"], label
    assert world.head() == head
    assert world.settle() == counts, "a table changed or vanished"


HEADER_INJECTIONS = {
    **{label: value for label, value in INJECTIONS.items() if "\x00" not in value},
    "quote or, no spaces": "'OR'1'='1",
    "drop, no spaces": "1;DROP/**/TABLE/**/idempotency_keys;--",
    "wildcard": "%",
}


def test_sql_injection_in_the_idempotency_key(world: World) -> None:
    """A key that looks like SQL is refused (400) or is stored and matched literally:
    its replay is the first answer, and a key differing by one character is not a replay."""
    path = f"/v1/plans/{world.a.plans[0]}/runs"
    token = auth(world.a.tokens["all"])
    tables = table_names(world.runtime.views)
    stored = 0
    for label, key in HEADER_INJECTIONS.items():
        if not key.isascii():
            continue  # not a header value an HTTP client sends
        head = world.head()
        first = world.client.post(path, headers={**token, "Idempotency-Key": key})
        after_first = world.head()
        again = world.client.post(path, headers={**token, "Idempotency-Key": key})
        if first.status_code != 201:
            assert_problem(first, 400, 422)
            assert world.head() == head, label
            continue
        stored += 1
        assert (again.status_code, again.text) == (first.status_code, first.text), label
        assert after_first > head and world.head() == after_first, f"{label}: replay appended"
        other = world.client.post(path, headers={**token, "Idempotency-Key": key + "x"})
        assert other.status_code == 201 and other.json()["id"] != first.json()["id"], label
    assert stored >= 4, "no SQL-looking key was a valid key: the replay checks proved nothing"
    assert table_names(world.runtime.views) == tables


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


KINDS = ("accounts", "plans", "runs", "results", "exclusions", "drills", "backups")


def _real_cursors(world: World, side: Side, token: str) -> dict[str, str]:
    """A genuine next_cursor of every list that can page (on ``side``'s ids)."""
    found: dict[str, str] = {}
    for path, operation in world.routes("get"):
        names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if "cursor" not in names:
            continue
        url = _fill(path, side.ids)
        use = token
        if world.client.get(url, headers=auth(use)).status_code == 403:
            use = world.ops
        page = world.client.get(url, params={"limit": 1}, headers=auth(use)).json()
        if page.get("next_cursor"):
            found[path] = page["next_cursor"]
    return found


def _forged(world: World, kind: str) -> dict[str, str]:
    """Cursors of list ``kind`` whose keys are SQL or of the wrong shape, and malformed ones."""
    forged: dict[str, str] = {}
    for n, text in enumerate(
        [INJECTIONS["quote or"], INJECTIONS["drop"], INJECTIONS["double quote"]]
    ):
        forged[f"{kind}: SQL keys {n}"] = _cursor(kind, text, text)
        forged[f"{kind}: SQL key {n}"] = _cursor(kind, text)
    forged[f"{kind}: unicode quotes"] = _cursor(kind, INJECTIONS["unicode quotes"], "\u2019")
    forged[f"{kind}: SQL kind"] = _cursor(f"{kind}' OR '1'='1", "a", "b")
    forged[f"{kind}: number"] = _cursor(kind, 1)
    forged[f"{kind}: numbers"] = _cursor(kind, 0, 0)
    forged[f"{kind}: bool"] = _cursor(kind, True)
    forged[f"{kind}: float"] = _cursor(kind, 1e308)
    forged[f"{kind}: nested"] = _cursor(kind, ["' OR 1=1"], {"a": 1})
    forged[f"{kind}: null"] = _cursor(kind, None, None)
    forged[f"{kind}: too many"] = _cursor(kind, "a", "b", "c")
    forged[f"{kind}: 64 quotes"] = _cursor(kind, "'" * 64, "'" * 64)
    forged[f"{kind}: negative"] = _cursor(kind, -1)
    forged[f"{kind}: B's ids"] = _cursor(kind, world.b.team, world.b.plans[0])
    forged["json object"] = base64.urlsafe_b64encode(
        json.dumps({"kind": kind, "q": "' OR 1=1"}).encode()
    ).decode()
    forged["json string"] = base64.urlsafe_b64encode(b'"\' OR 1=1 --"').decode()
    forged["not base64: SQL"] = INJECTIONS["quote or"]
    forged["not base64: drop"] = INJECTIONS["drop"]
    forged["invalid UTF-8"] = base64.b64encode(b'["plans","\xff\xfe","x"]').decode()
    forged["non-ASCII"] = "eyJ\u00e9\u20ac"
    forged["whitespace"] = " " + _cursor(kind, "a", "b") + "\n"
    forged["512 chars"] = "A" * 512
    forged["513 chars"] = "A" * 513
    forged["deep list"] = base64.urlsafe_b64encode(b"[" * 150 + b"]" * 150).decode()
    return forged


def _kind_of(world: World, url: str, token: str) -> str:
    """Which list a route is, found by the only harmless cursor it accepts."""
    accepted = {
        kind
        for kind in KINDS
        for probe in (_cursor(kind, "", ""), _cursor(kind, 0), _cursor(kind, ""))
        if world.plain.get(url, params={"cursor": probe}, headers=auth(token)).status_code == 200
    }
    assert len(accepted) == 1, (url, accepted)
    return accepted.pop()


def _mangled(name: str, cursor: str) -> dict[str, str]:
    return {
        f"{name} truncated by 1": cursor[:-1],
        f"{name} truncated by 2": cursor[:-2],
        f"{name} cut in half": cursor[: len(cursor) // 2],
        f"{name} padded =": cursor + "=",
        f"{name} padded ==": cursor + "==",
        f"{name} padded ===": cursor + "===",
        f"{name} padded ====": cursor + "====",
        f"{name} leading =": "=" + cursor,
        f"{name} extra character": cursor + "A",
        f"{name} extra block": cursor + "AAAA",
        f"{name} doubled": cursor + cursor,
    }


def test_forged_cursors_on_every_list(world: World) -> None:
    """Cursors built from SQL, other lists' cursors, B's cursors, truncated and padded
    ones, on every list of the OpenAPI document: 422 naming the cursor or a page of
    the caller's own rows; never a 5xx; every table intact afterwards."""
    counts, head = world.settle(), world.head()
    a_cursors = _real_cursors(world, world.a, world.a.tokens["compliance+read"])
    b_cursors = _real_cursors(world, world.b, world.b.tokens["compliance+read"])
    ops_cursors = _real_cursors(world, world.b, world.ops)
    assert len(a_cursors) >= 5 and len(b_cursors) >= 5, (a_cursors, b_cursors)
    assert "/v1/backup-exclusions" in ops_cursors, ops_cursors
    genuine: dict[str, str] = {}
    for owner, found in (("A", a_cursors), ("B", b_cursors), ("ops", ops_cursors)):
        genuine |= {f"{owner}'s cursor of {path}": cursor for path, cursor in found.items()}
    lists = [
        path
        for path, operation in world.routes("get")
        if "cursor" in {p["name"] for p in operation.get("parameters", [])}
    ]
    assert len(lists) >= 7, lists
    verdicts = Verdicts(world)
    kinds: set[str] = set()
    for path in lists:
        url = _fill(path, world.a.ids)
        token = _token_for(world, url)
        baseline = _baseline(world, url, token)
        kind = _kind_of(world, url, token)
        kinds.add(kind)
        cursors = {**_forged(world, kind), **genuine}
        if path in a_cursors:
            cursors |= _mangled(f"A's cursor of {path}", a_cursors[path])
        for label, cursor in cursors.items():
            answer = world.plain.get(url, params={"cursor": cursor}, headers=auth(token))
            verdicts.check(f"GET {path} cursor={label}", answer, baseline, token != world.ops)
            if answer.status_code == 422 and '"cursor"' not in answer.text:
                verdicts.failures.append(f"GET {path} cursor={label}: 422 not naming cursor")
        # The list's own cursor is served (the checks above would pass on a broken list).
        if path in a_cursors:
            own = world.plain.get(url, params={"cursor": a_cursors[path]}, headers=auth(token))
            assert own.status_code == 200 and own.json()["items"], (path, own.text)
    assert kinds == set(KINDS), kinds
    assert not verdicts.failures, "\n".join(verdicts.failures[:40])
    assert verdicts.answered.get(422, 0) > len(lists) * 10, verdicts.answered
    assert world.head() == head
    assert world.settle() == counts, "a table changed or vanished"


# ============================================== 4. oversized and nested bodies


NINE_MIB = 9 * 1024 * 1024


def _appending_routes(world: World) -> list[tuple[str, str]]:
    found = [
        (method.upper(), path)
        for method in ("post", "delete", "put", "patch")
        for path, _ in world.routes(method)
    ]
    assert len(found) >= 10, found
    return found


def _token_for_append(world: World, path: str) -> str:
    ops_only = {"/v1/teams", "/v1/backups", "/v1/restore-drills"}
    return world.ops if path in ops_only else world.a.tokens["all"]


@pytest.mark.parametrize("declared", [True, False], ids=["Content-Length", "chunked"])
def test_nine_mib_is_413_before_parsing_on_every_appending_route(
    world: World, declared: bool
) -> None:
    """9 MiB of malformed JSON: 413 (not 400), so it was refused before any parser ran."""
    garbage = b"[" * NINE_MIB
    assert len(garbage) > MAX_BODY_BYTES
    head = world.head()
    for method, path in _appending_routes(world):
        token = _token_for_append(world, path)
        content: Any = garbage
        if not declared:

            def chunks() -> Iterator[bytes]:
                for start in range(0, NINE_MIB, 1 << 20):
                    yield garbage[start : start + (1 << 20)]

            content = chunks()
        answer = world.client.request(
            method,
            _fill(path, world.a.ids),
            content=content,
            headers={**auth(token), "Content-Type": "application/json"},
        )
        sent = {k.lower() for k in answer.request.headers}
        assert ("content-length" in sent) is declared
        body = assert_problem(answer, 413)
        assert str(MAX_BODY_BYTES) in body["detail"], (path, body)
    assert world.head() == head


def _nested(depth: int, opening: bytes, closing: bytes, leaf: bytes) -> bytes:
    return opening * depth + leaf + closing * depth


NESTED = {
    "objects": _nested(100_000, b'{"a":', b"}", b"1"),
    "arrays": _nested(100_000, b"[", b"]", b""),
    "arrays in a field": b'{"name":' + _nested(100_000, b"[", b"]", b"") + b"}",
    "objects in results": b'{"results":[' + _nested(100_000, b'{"a":', b"}", b"1") + b"]}",
}


def test_json_nested_100000_deep_on_every_body_route(world: World) -> None:
    head = world.head()
    with_body = [
        (method.upper(), path)
        for method in ("post", "put", "patch", "delete")
        for path, operation in world.routes(method)
        if "requestBody" in operation
    ]
    assert len(with_body) >= 8, with_body
    for method, path in with_body:
        token = _token_for_append(world, path)
        for label, body in NESTED.items():
            answer = world.client.request(
                method,
                _fill(path, world.a.ids),
                content=body,
                headers={**auth(token), "Content-Type": "application/json"},
            )
            assert_problem(answer, 400, 422)
            assert world.client.get("/healthz").status_code == 200, (path, label)
    assert world.head() == head
    # Still serving real work afterwards.
    served = world.client.get(f"/v1/runs/{world.a.runs[0]}", headers=auth(world.a.tokens["read"]))
    assert served.status_code == 200, served.text


def _fresh_run(world: World) -> str:
    started = world.client.post(
        f"/v1/plans/{world.a.plans[1]}/runs", headers=auth(world.a.tokens["all"])
    )
    assert started.status_code == 201, started.text
    return str(started.json()["id"])


def test_batch_and_details_limits(world: World) -> None:
    run = _fresh_run(world)
    path = f"/v1/runs/{run}/results"
    token = auth(world.a.tokens["all"])
    head = world.head()
    over = world.client.post(path, json={"results": list(findings(1001))}, headers=token)
    assert "results" in {e["field"] for e in assert_problem(over, 422)["errors"]}
    filler = rules.MAX_DETAILS_BYTES - len(b'{"blob":""}')
    at_limit = {"blob": "x" * filler}
    beyond = {"blob": "x" * (filler + 1)}
    assert len(json.dumps(at_limit, separators=(",", ":"))) == rules.MAX_DETAILS_BYTES
    refused = world.client.post(
        path, json={"results": [{**BATCH[0], "details": beyond}]}, headers=token
    )
    assert "results[0].details" in {e["field"] for e in assert_problem(refused, 422)["errors"]}
    assert world.head() == head
    taken = world.client.post(
        path, json={"results": [{**BATCH[0], "details": at_limit}]}, headers=token
    )
    assert taken.status_code == 201, taken.text
    thousand = world.client.post(path, json={"results": list(findings(1000))}, headers=token)
    assert thousand.status_code == 201 and thousand.json()["accepted"] == 1000


HUGE = "1" + "0" * 400  # 10**400
HUGE_FLOAT = "1e400"


def _with(value: dict[str, Any], name: str, raw: str) -> str:
    """``value`` as JSON with ``name`` set to the raw JSON text ``raw`` (a huge number)."""
    marker = "__HUGE__"
    return json.dumps({**value, name: marker}).replace(f'"{marker}"', raw)


def _huge_bodies(world: World) -> list[tuple[str, str, str, bool]]:
    """(what, path, raw body, as ops) with 10**400 (or 1e400) where a value goes."""
    a = world.a
    results = f"/v1/runs/{a.runs[0]}/results"

    def batch(name: str, raw: str) -> str:
        return '{"results":[' + _with(BATCH[0], name, raw) + "]}"

    def details(raw: str) -> str:
        return batch("details", '{"n":' + raw + "}")

    plan = {"team_id": a.team, "account_id": a.accounts[0]}
    return [
        ("details integer", results, details(HUGE), False),
        ("details float", results, details(HUGE_FLOAT), False),
        ("details negative", results, details("-" + HUGE), False),
        ("severity", results, batch("severity", HUGE), False),
        ("observed_at", results, batch("observed_at", HUGE), False),
        ("results", results, _with({}, "results", HUGE), False),
        ("team name", "/v1/teams", _with({}, "name", HUGE), True),
        ("backup full", "/v1/backups", _with({}, "full", HUGE), True),
        ("backup full float", "/v1/backups", _with({}, "full", HUGE_FLOAT), True),
        ("drill backup", "/v1/restore-drills", _with({}, "backup_id", HUGE), True),
        ("plan name", "/v1/plans", _with(plan, "name", HUGE), False),
        (
            "complete error",
            f"/v1/runs/{a.runs[0]}/complete",
            _with({"status": "failed"}, "error", HUGE),
            False,
        ),
        (
            "exclusion reason",
            f"/v1/plans/{a.plans[0]}/backup-exclusion",
            _with({}, "reason", HUGE),
            False,
        ),
        ("purge older_than", "/v1/display-purges", _with({}, "older_than", HUGE), False),
        ("purge plan", "/v1/display-purges", _with({}, "plan_id", HUGE), False),
        (
            "link role_arn",
            f"/v1/teams/{a.team}/accounts",
            _with({"method": "role"}, "role_arn", HUGE),
            False,
        ),
    ]


def test_huge_numbers_are_422(world: World) -> None:
    head = world.head()
    for label, path, raw, as_ops in _huge_bodies(world):
        assert HUGE in raw or HUGE_FLOAT in raw, label
        token = world.ops if as_ops else world.a.tokens["all"]
        answer = world.client.post(
            path, content=raw.encode(), headers={**auth(token), "Content-Type": "application/json"}
        )
        assert answer.status_code == 422, (label, answer.text[:300])
        assert_problem(answer, 422)
    for name in ("limit", "after"):
        answer = world.client.get(
            f"/v1/runs/{world.a.runs[0]}/results",
            params={name: HUGE},
            headers=auth(world.a.tokens["read"]),
        )
        assert name in {e["field"] for e in assert_problem(answer, 422)["errors"]}
    assert world.head() == head


# =========================================================== 5 and 6: processes


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def process_store(request: pytest.FixtureRequest) -> str | None:
    """``None``: the embedded default (SQLite under ./var); else a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@dataclass
class Sandbox:
    """A working folder, TMPDIR and HOME of the test's own; output of every command kept."""

    root: Path
    database_url: str | None

    def __post_init__(self) -> None:
        for folder in (self.cwd, self.tmp, self.home, self.logs):
            folder.mkdir(parents=True)

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def var(self) -> Path:
        return self.cwd / "var"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.var / 'resultsvc.db'}"

    def env(self) -> dict[str, str]:
        kept = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
        env = kept | {"TMPDIR": str(self.tmp), "HOME": str(self.home)}
        if self.database_url is not None:
            env["RESULTSVC_DATABASE_URL"] = self.database_url
        return env

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            [RESULTSVC, *args],
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            timeout=COMMAND_SECONDS,
            check=False,
        )
        (self.logs / f"{name}.stdout").write_bytes(done.stdout)
        (self.logs / f"{name}.stderr").write_bytes(done.stderr)
        return done

    def ok(self, name: str, *args: str) -> str:
        done = self.run(name, *args)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()


def test_demo_leaves_no_key_and_no_plaintext_finding_anywhere(
    tmp_path: Path, process_store: str | None
) -> None:
    box = Sandbox(tmp_path, process_store)
    out = box.ok("demo", "demo")
    assert "plan runs, as the display views show them" in out
    master_path = box.var / "master.key"
    master = master_path.read_bytes()
    assert len(master) == 32  # docs/backup-format.md 3.1: exactly 32 raw bytes

    # The keys, unwrapped by the service's own code.
    store = open_store(f"file://{box.var / 'backups'}")
    master_key = open_master_key(f"file://{master_path}")
    views = view_database(box.url)
    try:
        with views.reading() as cur:
            plans = {
                str(r[0]): bool(r[1])
                for r in cur.fetchall("SELECT plan_id, backup_excluded FROM view_plans")
            }
            rule_ids = [
                str(r[0]) for r in cur.fetchall("SELECT DISTINCT rule_id FROM view_results")
            ]
            arns = [
                str(r[0])
                for r in cur.fetchall(
                    "SELECT DISTINCT resource_arn FROM view_results ORDER BY resource_arn LIMIT 40"
                )
            ]
            texts = [
                str(r[0])
                for r in cur.fetchall("SELECT DISTINCT message FROM view_results LIMIT 20")
            ]
            team_names = [str(r[0]) for r in cur.fetchall("SELECT name FROM view_teams")]
        ring = Keyring(store, master_key, views)
        plan_keys = {plan: ring.key_for_reading(plan) for plan in plans}
        database_cells = list(every_cell(views)) if process_store is not None else []
    finally:
        views.close()
    assert sorted(plans.values()) == [False, True], plans
    for plan, excluded in plans.items():
        assert (plan_keys[plan] is None) is excluded, "only the excluded plan's key is gone"
    catalog = Catalog(store)
    data_keys = {
        backup_id: master_key.unwrap(
            unb64(catalog.get(backup_id).manifest["wrapped_data_key"]), {"backup": backup_id}
        )
        for backup_id in catalog.ids()
    }
    assert len(data_keys) == 2, data_keys

    secrets_: dict[str, bytes] = {}
    for plan, key in plan_keys.items():
        if key is not None:
            secrets_ |= key_forms(f"plan key {plan}", key)
    for backup_id, key in data_keys.items():
        secrets_ |= key_forms(f"data key {backup_id}", key)
    master_forms = key_forms("master key", master)
    plaintext = {f"rule id {r}": r.encode() for r in rule_ids}
    plaintext |= {f"resource arn {a}": a.encode() for a in arns}
    plaintext |= {f"message {t[:30]}": t.encode() for t in texts if len(t) >= 12}
    plaintext |= {f"team name {n}": n.encode() for n in team_names}
    assert len(rule_ids) >= 5 and len(arns) >= 20, (rule_ids, arns)

    written = files_under(box.cwd, box.tmp, box.home, box.logs)
    backup_objects = {p: d for p, d in written.items() if p.startswith(str(box.var / "backups"))}
    assert any(p.endswith(".rbp") for p in backup_objects), sorted(written)
    assert any(p.endswith("manifest.json") for p in backup_objects)
    assert str(box.logs / "demo.stdout") in written

    key_hits: list[str] = []
    master_hits: list[str] = []
    for path, data in written.items():
        key_hits += scan(secrets_, path, data)
        master_hits += [hit for hit in scan(master_forms, path, data) if path != str(master_path)]
    for where, data in database_cells:
        key_hits += scan(secrets_, f"database {where}", data)
        master_hits += scan(master_forms, f"database {where}", data)
    assert scan(master_forms, str(master_path), master), "the scan cannot see the master key"
    assert not master_hits, "the master key is outside its file:\n" + "\n".join(master_hits)
    assert not key_hits, "plaintext data or plan keys written:\n" + "\n".join(key_hits)

    plain_hits = [hit for p, d in backup_objects.items() for hit in scan(plaintext, p, d)]
    assert not plain_hits, "plaintext findings in backup objects:\n" + "\n".join(plain_hits[:20])
    # Not vacuous: the same needles are found where they are stored in clear (the views).
    if process_store is None:
        database = written[str(box.var / "resultsvc.db")] + written.get(
            str(box.var / "resultsvc.db-wal"), b""
        )
        seen = {name for name, needle in plaintext.items() if needle in database}
    else:
        seen = {
            name
            for _, data in database_cells
            for name, needle in plaintext.items()
            if needle in data
        }
    assert seen == set(plaintext), set(plaintext) - seen


def _snapshot(box: Sandbox) -> tuple[dict[str, bytes], dict[str, int], int]:
    """The backup store's objects, every table's row count, the master key file's mode."""
    views = view_database(box.url)
    try:
        counts = row_counts(views)
    finally:
        views.close()
    mode = (box.var / "master.key").stat().st_mode & 0o777
    return files_under(box.var / "backups"), counts, mode


def test_backup_run_refuses_a_key_file_readable_by_group_or_others(
    tmp_path: Path, process_store: str | None
) -> None:
    """``resultsvc backup run`` (the embedded defaults under ./var, or PostgreSQL):
    0640 and 0604 are refused with one line naming the file and its mode, non-zero,
    nothing written; 0600 works."""
    box = Sandbox(tmp_path, process_store)
    box.var.mkdir()
    settings = Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": box.url,
            "RESULTSVC_BACKUP_URL": f"file://{box.var / 'backups'}",
            "RESULTSVC_MASTER_KEY": f"file://{box.var / 'master.key'}",
        }
    )
    # A first backup made by the service itself (it creates the key file), then news.
    with Runtime.open(settings) as runtime:
        runtime.app.create_team("Key modes")
        first = Backups.open(runtime).writer.run(full=True).info.id
        runtime.app.create_team("Something new to back up")
    key = box.var / "master.key"
    assert key.stat().st_mode & 0o777 == 0o600

    for mode in (0o640, 0o604):
        key.chmod(mode)
        before = _snapshot(box)
        refused = box.run(f"backup-{mode:04o}", "backup", "run")
        stderr = refused.stderr.decode()
        assert refused.returncode != 0, (mode, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert str(key) in lines[0] and f"{mode:04o}" in lines[0], lines[0]
        assert "Traceback" not in stderr and refused.stdout == b""
        assert _snapshot(box) == before, f"a refused backup ({mode:04o}) wrote something"

    key.chmod(0o600)
    second = json.loads(box.ok("backup-0600", "backup", "run", "--json"))
    assert second["id"] != first and second["parent"] == first and second["events"] >= 1
    assert (box.var / "backups" / "backups" / second["id"] / "manifest.json").is_file()
