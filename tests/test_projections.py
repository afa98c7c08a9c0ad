"""The display views against the event log, on SQLite and on PostgreSQL.

The application (``run_results``, ``get_run``...) is the ground truth; every
view is compared with it. Then the promises of the projector: keyset pages
walk a list exactly once, one team never sees another's rows, purges remove
exactly their scope and stay removed through rebuilds, every event is applied
exactly once whatever the page size or the number of projectors, a view that
cannot apply an event stops loudly, and clients can wait for their own writes.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.application import ResultsApp
from domain.errors import InvalidInput, NotFound
from domain.findings import SEVERITIES, STATUSES
from domain.model import RUN_FAILED, RUN_RUNNING, RUN_SUCCEEDED
from projections.projector import STATE_FAILED, STATE_RUNNING, Projector, ViewStatus
from projections.purge import apply_display_retention, purge_older_than
from projections.queries import (
    MAX_LIMIT,
    DisplayQueries,
    Page,
    ViewsBehind,
    decode_cursor,
    encode_cursor,
)
from projections.schema import DISPLAY_TABLES, EXCLUSION_TABLES, Table
from projections.sqlstore import Cursor
from projections.views import EventNotProjectable, View, iso
from service.runtime import Runtime
from service.samples import batches
from service.settings import Settings

NIGHTLY = "nightly audit"
DEPLOY = "deploy check"
ALL_TABLES = DISPLAY_TABLES + EXCLUSION_TABLES


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def runtime(database_url: str) -> Iterator[Runtime]:
    """The composition root on the store of ``database_url``, views created, nothing projected."""
    opened = Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url}))
    try:
        yield opened
    finally:
        opened.close()


# ------------------------------------------------------------------- the world


@dataclass
class Tenant:
    """A team with a linked and an unlinked account, two plans and their runs in start order."""

    team: UUID
    accounts: list[UUID]
    plans: dict[str, UUID]
    runs: dict[str, list[UUID]] = field(default_factory=dict)

    @property
    def tid(self) -> str:
        return str(self.team)

    def run_ids(self, plan: str) -> list[str]:
        return [str(run) for run in self.runs[plan]]


def record_run(
    app: ResultsApp,
    team: UUID,
    plan: UUID,
    *,
    total: int,
    size: int,
    seed: int,
    end: str | None = RUN_SUCCEEDED,
    error: str | None = None,
) -> UUID:
    run, _ = app.start_run(team, plan)
    for batch in batches(total, size, seed=seed):
        app.record_results(team, run.id, batch)
    if end is not None:
        app.complete_run(team, run.id, end, error)
    return run.id


def make_tenant(app: ResultsApp, name: str, *, seed: int, digits: str) -> Tenant:
    """Same plan names in every tenant, so a purge keyed by name would show."""
    team, _ = app.create_team(name)
    kept, _ = app.link_account_role(
        team.id, f"arn:aws:iam::{digits}:role/Audit", verified=True, actor="alice"
    )
    old, _ = app.link_account_role(
        team.id,
        f"arn:aws:iam::{digits}:role/Old",
        verified=False,
        actor="alice",
        method="access_keys",
    )
    nightly, _ = app.create_plan(team.id, kept.id, NIGHTLY)
    deploy, _ = app.create_plan(team.id, old.id, DEPLOY)
    tenant = Tenant(team.id, [kept.id, old.id], {NIGHTLY: nightly.id, DEPLOY: deploy.id})
    tenant.runs[DEPLOY] = [
        record_run(app, team.id, deploy.id, total=12, size=5, seed=seed),
        record_run(
            app,
            team.id,
            deploy.id,
            total=4,
            size=4,
            seed=seed + 1,
            end=RUN_FAILED,
            error="AccessDenied: sts:AssumeRole",
        ),
    ]
    app.unlink_account(team.id, old.id, actor="bob")
    tenant.runs[NIGHTLY] = [
        record_run(app, team.id, nightly.id, total=30, size=8, seed=seed + 2),
        record_run(
            app,
            team.id,
            nightly.id,
            total=7,
            size=7,
            seed=seed + 3,
            end=RUN_FAILED,
            error="scanner crashed",
        ),
        record_run(app, team.id, nightly.id, total=9, size=4, seed=seed + 4, end=None),
    ]
    return tenant


def all_pages(fetch: Callable[[str | None], Page], limit: int | None = None) -> list[Any]:
    """Follow the cursors to the end; with ``limit``, check every page but the last is full."""
    items: list[Any] = []
    cursor: str | None = None
    for _ in range(10_000):
        page = fetch(cursor)
        items.extend(page.items)
        if page.next_cursor is None:
            if limit is not None:
                assert 1 <= len(page.items) <= limit or not items
            return items
        if limit is not None:
            assert len(page.items) == limit
        cursor = page.next_cursor
    raise AssertionError("cursors never ended")


# ---------------------------------------------------------------- ground truth


def expected_run(app: ResultsApp, team: UUID, run_id: UUID) -> dict[str, Any]:
    run = app.get_run(team, run_id)
    results = list(app.run_results(team, run_id))
    assert run.total == len(results)
    severity = Counter(r["severity"] for r in results)
    status = Counter(r["status"] for r in results)
    return {
        "id": str(run.id),
        "plan_id": str(run.plan_id),
        "team_id": str(team),
        "status": run.status,
        "started_at": iso(run.created_on),
        "finished_at": iso(run.modified_on) if run.ended else None,
        "error": run.error,
        "total": run.total,
        "counts": {
            "by_severity": {s: severity[s] for s in SEVERITIES},
            "by_status": {s: status[s] for s in STATUSES},
        },
    }


def expected_account(app: ResultsApp, team: UUID, account_id: UUID) -> dict[str, Any]:
    account = app.get_account(team, account_id)
    return {
        "id": str(account.id),
        "team_id": str(team),
        "role_arn": account.role_arn,
        "aws_account_id": account.aws_account_id,
        "method": account.method,
        "verified": account.verified,
        "linked": account.linked,
        "linked_at": iso(account.created_on),
        "unlinked_at": None if account.linked else iso(account.modified_on),
        "linked_by": account.linked_by,
        "profile": account.profile,
        "access": account.access,
        "access_reason": None,
        "access_changed_at": None,
    }


def expected_plan(app: ResultsApp, tenant: Tenant, name: str) -> dict[str, Any]:
    plan = app.get_plan(tenant.team, tenant.plans[name])
    runs = tenant.runs.get(name, [])
    return {
        "id": str(plan.id),
        "team_id": tenant.tid,
        "account_id": str(plan.account_id),
        "name": plan.name,
        "created_at": iso(plan.created_on),
        "backup_excluded": plan.backup_excluded,
        "latest_run_id": str(runs[-1]) if runs else None,
    }


def view_state(q: DisplayQueries, tenant: Tenant) -> dict[str, Any]:
    """Everything the queries show of a tenant, walking every list to its end."""
    tid = tenant.tid
    plans = all_pages(lambda c: q.list_plans(tid, tid, cursor=c))
    state: dict[str, Any] = {
        "team": q.get_team(tid, tid),
        "accounts": all_pages(lambda c: q.list_accounts(tid, tid, cursor=c)),
        "plans": {p["id"]: p for p in plans},
        "runs": {},
        "results": {},
    }
    for plan in plans:
        runs = all_pages(lambda c, p=plan["id"]: q.list_runs(tid, p, cursor=c))
        state["runs"][plan["id"]] = runs
        for run in runs:
            state["results"][run["id"]] = all_pages(
                lambda c, r=run["id"]: q.list_results(tid, r, cursor=c)
            )
    return state


def dump_tables(runtime: Runtime) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table, in a stable order."""
    with runtime.views.reading() as cur:
        return {
            t.name: sorted(cur.fetchall(f"SELECT * FROM {t.name}"), key=repr) for t in ALL_TABLES
        }


def count_results(runtime: Runtime, run_ids: list[str] | None = None) -> int:
    with runtime.views.reading() as cur:
        if run_ids is None:
            row = cur.fetchone("SELECT count(*) FROM view_results")
        else:
            marks = ", ".join("?" for _ in run_ids)
            row = cur.fetchone(
                f"SELECT count(*) FROM view_results WHERE run_id IN ({marks})", run_ids
            )
    assert row is not None
    return int(row[0])


def results_in_log(app: ResultsApp, up_to: int | None = None) -> int:
    """How many results the batches in the log hold, up to a position."""
    total = 0
    for notification in app.recorder.select_notifications(start=1, limit=1_000_000):
        if up_to is not None and notification.id > up_to:
            break
        if notification.topic == "resultsvc/ResultBatch/Recorded":
            total += len(app.mapper.to_domain_event(notification).results)
    return total


def views_by_name(runtime: Runtime) -> dict[str, View]:
    return {view.name: view for view in runtime.projector.views}


def status_of(projector: Projector) -> dict[str, ViewStatus]:
    return {s.view: s for s in projector.status()}


# ------------------------------------------------------- 1. views equal events


def test_every_view_equals_what_the_application_says(runtime: Runtime) -> None:
    """Teams, accounts (linked and unlinked), plans with their latest run, runs with their
    counts, results in order with every field, and exclusions: all exactly as recorded."""
    app, q = runtime.app, runtime.queries
    a = make_tenant(app, "Platform", seed=1, digits="111111111111")
    b = make_tenant(app, "Payments", seed=20, digits="222222222222")
    excluded_a = app.request_backup_exclusion(
        a.team, a.plans[DEPLOY], reason="GDPR erasure request", ticket="LEGAL-42", actor="carol"
    )
    excluded_b = app.request_backup_exclusion(
        b.team, b.plans[NIGHTLY], reason="contract end", ticket=None, actor="dave"
    )
    assert runtime.projector.catch_up() > 0

    for tenant in (a, b):
        tid = tenant.tid
        team = app.get_team(tenant.team)
        assert q.get_team(tid, tid) == {
            "id": tid,
            "name": team.name,
            "external_id": team.external_id,
            "created_at": iso(team.created_on),
        }
        accounts = all_pages(lambda c, t=tid: q.list_accounts(t, t, cursor=c, limit=1), 1)
        assert accounts == [expected_account(app, tenant.team, acc) for acc in tenant.accounts]
        assert [acc["linked"] for acc in accounts] == [True, False]
        assert accounts[1]["unlinked_at"] is not None
        plans = all_pages(lambda c, t=tid: q.list_plans(t, t, cursor=c, limit=1), 1)
        assert plans == [expected_plan(app, tenant, NIGHTLY), expected_plan(app, tenant, DEPLOY)]
        for name in (NIGHTLY, DEPLOY):
            assert q.get_plan(tid, str(tenant.plans[name])) == expected_plan(app, tenant, name)
            runs = all_pages(lambda c, t=tid, p=str(tenant.plans[name]): q.list_runs(t, p, c))
            assert runs == [expected_run(app, tenant.team, r) for r in reversed(tenant.runs[name])]
            for run_id in tenant.runs[name]:
                assert q.get_run(tid, str(run_id)) == expected_run(app, tenant.team, run_id)
                shown = all_pages(lambda c, t=tid, r=str(run_id): q.list_results(t, r, cursor=c))
                assert shown == list(app.run_results(tenant.team, run_id))
        statuses = [q.get_run(tid, r)["status"] for r in tenant.run_ids(NIGHTLY)]
        assert statuses == [RUN_SUCCEEDED, RUN_FAILED, RUN_RUNNING]

    # Details round-trip as JSON objects, not text.
    with_details = [r for r in q.list_results(a.tid, a.run_ids(NIGHTLY)[0]).items if "details" in r]
    assert with_details and all(isinstance(r["details"], dict) for r in with_details)
    assert q.get_plan(a.tid, str(a.plans[DEPLOY]))["backup_excluded"] is True
    assert q.get_plan(a.tid, str(a.plans[NIGHTLY]))["backup_excluded"] is False

    def exclusion(tenant: Tenant, name: str, position: int, reason: str, ticket: Any, by: str):
        plan = app.get_plan(tenant.team, tenant.plans[name])
        return {
            "plan_id": str(plan.id),
            "team_id": tenant.tid,
            "reason": reason,
            "ticket": ticket,
            "requested_by": by,
            "requested_at": iso(plan.modified_on),
            "position": position,
        }

    expected_a = exclusion(
        a, DEPLOY, excluded_a.position, "GDPR erasure request", "LEGAL-42", "carol"
    )
    expected_b = exclusion(b, NIGHTLY, excluded_b.position, "contract end", None, "dave")
    assert q.list_exclusions(a.tid).items == [expected_a]
    assert q.list_exclusions(b.tid).items == [expected_b]
    assert all_pages(lambda c: q.list_exclusions(None, cursor=c, limit=1), 1) == [
        expected_a,
        expected_b,
    ]
    assert count_results(runtime) == results_in_log(app)


# ------------------------------------------------------------- 2. pagination


@pytest.fixture
def hundred(runtime: Runtime) -> tuple[Tenant, UUID]:
    """A tenant whose nightly plan has one more run with 100 results in 8 batches."""
    app = runtime.app
    tenant = make_tenant(app, "Paged", seed=3, digits="333333333333")
    run = record_run(app, tenant.team, tenant.plans[NIGHTLY], total=100, size=13, seed=99)
    tenant.runs[NIGHTLY].append(run)
    runtime.projector.catch_up()
    return tenant, run


def test_results_walk_page_by_page_exactly_once_in_order(
    runtime: Runtime, hundred: tuple[Tenant, UUID]
) -> None:
    tenant, run = hundred
    q, truth = runtime.queries, list(runtime.app.run_results(tenant.team, run))
    assert len(truth) == 100
    pages: list[Page] = []
    cursor: str | None = None
    while True:
        page = q.list_results(tenant.tid, str(run), cursor=cursor, limit=7)
        pages.append(page)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(pages) == math.ceil(100 / 7)
    assert [len(p.items) for p in pages] == [7] * 14 + [2]
    assert [r for p in pages for r in p.items] == truth
    # The same cursor gives the same page again: pages are stable.
    again = q.list_results(tenant.tid, str(run), cursor=pages[3].next_cursor, limit=7)
    assert again == pages[4]
    # An exact multiple of the limit ends without an empty trailing page.
    assert [len(p.items) for p in _walk(q, tenant.tid, str(run), limit=25)] == [25] * 4


def _walk(q: DisplayQueries, team: str, run: str, **filters: Any) -> list[Page]:
    pages, cursor = [], None
    while True:
        page = q.list_results(team, run, cursor=cursor, **filters)
        pages.append(page)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


@pytest.mark.parametrize(
    ("severity", "status"),
    [("high", None), (None, "PASS"), ("critical", "FAIL"), ("informational", "ERROR")],
)
def test_filters_combine_with_cursors(
    runtime: Runtime, hundred: tuple[Tenant, UUID], severity: str | None, status: str | None
) -> None:
    tenant, run = hundred
    truth = [
        r
        for r in runtime.app.run_results(tenant.team, run)
        if severity in (None, r["severity"]) and status in (None, r["status"])
    ]
    pages = _walk(runtime.queries, tenant.tid, str(run), severity=severity, status=status, limit=2)
    assert [r for p in pages for r in p.items] == truth
    assert len(pages) == max(1, math.ceil(len(truth) / 2))


def test_bad_cursors_limits_and_filters_are_invalid_input(
    runtime: Runtime, hundred: tuple[Tenant, UUID]
) -> None:
    tenant, run = hundred
    q, tid, rid, plan = runtime.queries, tenant.tid, str(run), str(tenant.plans[NIGHTLY])
    results_cursor = q.list_results(tid, rid, limit=7).next_cursor
    runs_cursor = q.list_runs(tid, plan, limit=1).next_cursor
    plans_cursor = q.list_plans(tid, tid, limit=1).next_cursor
    accounts_cursor = q.list_accounts(tid, tid, limit=1).next_cursor
    assert results_cursor and runs_cursor and plans_cursor and accounts_cursor
    raw = base64.urlsafe_b64decode(results_cursor + "=" * (-len(results_cursor) % 4))
    tampered = [
        "garbage!",
        "%%%%",
        "x",
        "é",
        "A" * 513,
        results_cursor[:-2],
        base64.urlsafe_b64encode(raw.replace(b"results", b"resulta")).decode(),
        base64.urlsafe_b64encode(raw[:-1]).decode(),
        encode_cursor("results", ["7007"]),
        encode_cursor("results", [True]),
        encode_cursor("results", [1.5]),
        encode_cursor("results", [7, 8]),
        encode_cursor("results", []),
        base64.urlsafe_b64encode(b'{"results": 7}').decode(),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    ]
    attempts: list[Callable[[], Page]] = [
        lambda: q.list_results(tid, rid, cursor=runs_cursor),
        lambda: q.list_runs(tid, plan, cursor=results_cursor),
        lambda: q.list_plans(tid, tid, cursor=accounts_cursor),
        lambda: q.list_accounts(tid, tid, cursor=plans_cursor),
        lambda: q.list_exclusions(tid, cursor=plans_cursor),
        *[lambda c=c: q.list_results(tid, rid, cursor=c) for c in tampered],
        *[lambda c=c: q.list_runs(tid, plan, cursor=c) for c in tampered],
    ]
    for attempt in attempts:
        with pytest.raises(InvalidInput) as caught:
            attempt()
        assert caught.value.field == "cursor"

    for limit in (0, -1, MAX_LIMIT + 1, True, "7", 7.0, None):
        for call in (
            lambda n: q.list_results(tid, rid, limit=n),
            lambda n: q.list_runs(tid, plan, limit=n),
            lambda n: q.list_plans(tid, tid, limit=n),
            lambda n: q.list_accounts(tid, tid, limit=n),
            lambda n: q.list_exclusions(tid, limit=n),
        ):
            with pytest.raises(InvalidInput) as caught:
                call(limit)
            assert caught.value.field == "limit"
    assert len(q.list_results(tid, rid, limit=MAX_LIMIT).items) == 100
    assert len(q.list_results(tid, rid, limit=1).items) == 1

    for field_name, kwargs in (
        ("severity", {"severity": "CRITICAL"}),
        ("severity", {"severity": ""}),
        ("status", {"status": "fail"}),
        ("status", {"status": "PASSED"}),
    ):
        with pytest.raises(InvalidInput) as caught:
            q.list_results(tid, rid, **kwargs)
        assert caught.value.field == field_name


@pytest.mark.parametrize(
    "case",
    ["integer beyond 64 bits", "negative integer beyond 64 bits", "NUL in a text key", "surrogate"],
)
def test_a_well_formed_cursor_with_impossible_values_is_invalid_input(
    runtime: Runtime, hundred: tuple[Tenant, UUID], case: str, request: pytest.FixtureRequest
) -> None:
    """Cursors are opaque but clients can forge them: whatever the key holds, the answer is
    ``InvalidInput("cursor")`` (a 400), never a driver error (a 500)."""
    tenant, run = hundred
    q, tid = runtime.queries, tenant.tid
    forged = {
        "integer beyond 64 bits": ("results", [10**30]),
        "negative integer beyond 64 bits": ("results", [-(10**30)]),
        "NUL in a text key": ("runs", ["2026-01-01T00:00:00.000000Z\x00", str(run)]),
        "surrogate": ("runs", ["\ud800", str(run)]),
    }[case]
    kind, key = forged
    plan = str(tenant.plans[NIGHTLY])
    cursor = encode_cursor(kind, key)
    try:
        if kind == "results":
            page = q.list_results(tid, str(run), cursor=cursor)
        else:
            page = q.list_runs(tid, plan, cursor=cursor)
    except InvalidInput as refusal:
        assert refusal.field == "cursor"
        return
    # Answering with a page is acceptable only if it is the page the key asks for.
    if kind == "results":
        results = q.list_results(tid, str(run), limit=MAX_LIMIT).items
        assert page.items == (results if key[0] < 0 else [])
    else:
        runs = q.list_runs(tid, plan, limit=MAX_LIMIT).items
        assert page.items == [r for r in runs if (r["started_at"], r["id"]) < tuple(key)]


def test_runs_plans_and_accounts_page_with_cursors(runtime: Runtime) -> None:
    """Runs newest first, plans and accounts oldest first, each walked with limit 2."""
    app, q = runtime.app, runtime.queries
    team, _ = app.create_team("Many")
    accounts = [
        app.link_account_role(
            team.id, f"arn:aws:iam::{i:012d}:role/Audit", verified=bool(i % 2), actor="a"
        )[0].id
        for i in range(1, 6)
    ]
    plans = [app.create_plan(team.id, accounts[i % 5], f"plan {i}")[0].id for i in range(7)]
    runs = [record_run(app, team.id, plans[0], total=2, size=2, seed=i) for i in range(5)]
    other, _ = app.create_team("Other")
    other_account, _ = app.link_account_role(other.id, ROLE, verified=True, actor="a")
    app.create_plan(other.id, other_account.id, "plan 0")
    runtime.projector.catch_up()
    tid = str(team.id)
    tenant = Tenant(team.id, accounts, {}, {})

    shown_runs = all_pages(lambda c: q.list_runs(tid, str(plans[0]), cursor=c, limit=2), 2)
    assert [r["id"] for r in shown_runs] == [str(r) for r in reversed(runs)]
    assert shown_runs == [expected_run(app, team.id, r) for r in reversed(runs)]
    started = [r["started_at"] for r in shown_runs]
    assert started == sorted(started, reverse=True)
    assert q.get_plan(tid, str(plans[0]))["latest_run_id"] == str(runs[-1])
    assert q.get_plan(tid, str(plans[1]))["latest_run_id"] is None
    assert q.list_runs(tid, str(plans[1])) == Page([], None)

    shown_plans = all_pages(lambda c: q.list_plans(tid, tid, cursor=c, limit=2), 2)
    assert [p["id"] for p in shown_plans] == [str(p) for p in plans]
    assert [p["name"] for p in shown_plans] == [f"plan {i}" for i in range(7)]

    shown_accounts = all_pages(lambda c: q.list_accounts(tid, tid, cursor=c, limit=2), 2)
    assert shown_accounts == [expected_account(app, tenant.team, acc) for acc in accounts]
    assert [acc["verified"] for acc in shown_accounts] == [True, False, True, False, True]


ROLE = "arn:aws:iam::123456789012:role/resultsvc/Audit"

# What the views put in cursors: short text keys (ids, timestamps) and sequence numbers.
KEY_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
)
KEYS = st.lists(st.one_of(KEY_TEXT, st.integers(min_value=0, max_value=2**62)), max_size=4)


@settings(max_examples=300, deadline=None)
@given(kind=st.text(max_size=20), key=KEYS)
def test_cursors_round_trip(kind: str, key: list[Any]) -> None:
    cursor = encode_cursor(kind, key)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", cursor)
    if len(cursor) <= 512:
        assert decode_cursor(cursor, kind, [type(v) for v in key]) == key
    else:
        with pytest.raises(InvalidInput):
            decode_cursor(cursor, kind, [type(v) for v in key])


def _decodes_or_refuses(cursor: Any, kind: str, types: tuple[type, ...]) -> None:
    try:
        key = decode_cursor(cursor, kind, types)
    except InvalidInput as refusal:
        assert refusal.field == "cursor"
        assert str(refusal) == "cursor: is not a cursor this list issued"
        return
    assert len(key) == len(types)
    assert all(type(v) is t for v, t in zip(key, types, strict=True))


@settings(max_examples=500, deadline=None)
@given(
    cursor=st.one_of(
        st.text(max_size=600),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="),
        st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=12,
        ).map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
        st.lists(st.one_of(st.just("results"), st.integers(), st.text(max_size=8)), max_size=3).map(
            lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=")
        ),
        st.none(),
        st.integers(),
        st.binary(max_size=20),
    ),
    which=st.sampled_from([("results", (int,)), ("runs", (str, str)), ("plans", (str, str))]),
)
def test_arbitrary_strings_decode_or_are_refused_as_cursor(
    cursor: Any, which: tuple[str, tuple[type, ...]]
) -> None:
    """Whatever a client sends, decoding gives a key of the right types or ``InvalidInput``."""
    _decodes_or_refuses(cursor, *which)


# --------------------------------------------------------------- 3. isolation


def test_another_teams_rows_look_exactly_like_unknown_ones(runtime: Runtime) -> None:
    app, q = runtime.app, runtime.queries
    a = make_tenant(app, "Alpha", seed=4, digits="444444444444")
    b = make_tenant(app, "Beta", seed=5, digits="555555555555")
    app.request_backup_exclusion(a.team, a.plans[NIGHTLY], reason="r", ticket="T-1", actor="x")
    app.request_backup_exclusion(b.team, b.plans[NIGHTLY], reason="r", ticket="T-2", actor="y")
    runtime.projector.catch_up()

    def refusal(call: Callable[[], Any]) -> NotFound:
        with pytest.raises(NotFound) as caught:
            call()
        return caught.value

    b_run = b.run_ids(NIGHTLY)[0]
    probes: dict[str, tuple[str, str, Callable[[str], Any]]] = {
        "team": ("team", b.tid, lambda i: q.get_team(a.tid, i)),
        "team accounts": ("team", b.tid, lambda i: q.list_accounts(a.tid, i)),
        "team plans": ("team", b.tid, lambda i: q.list_plans(a.tid, i)),
        "account": ("account", str(b.accounts[0]), lambda i: q.get_account(a.tid, i)),
        "plan": ("plan", str(b.plans[NIGHTLY]), lambda i: q.get_plan(a.tid, i)),
        "plan runs": ("plan", str(b.plans[NIGHTLY]), lambda i: q.list_runs(a.tid, i)),
        "run": ("run", b_run, lambda i: q.get_run(a.tid, i)),
        "run results": ("run", b_run, lambda i: q.list_results(a.tid, i)),
        "filtered results": ("run", b_run, lambda i: q.list_results(a.tid, i, severity="high")),
    }
    for kind, ident, call in probes.values():
        foreign = refusal(lambda call=call, ident=ident: call(ident))
        unknown_id = str(uuid.uuid4())
        unknown = refusal(lambda call=call, unknown_id=unknown_id: call(unknown_id))
        assert (foreign.kind, foreign.ident) == (kind, ident)
        assert str(foreign) == f"{kind} {ident} not found"
        assert str(unknown) == f"{kind} {unknown_id} not found"
        assert type(foreign) is type(unknown)
    # The foreign rows do exist: operators (team None) and their owner see them.
    assert q.get_run(None, b_run)["team_id"] == b.tid
    assert q.get_run(b.tid, b_run)["id"] == b_run
    # A valid cursor of B's results list does not open B's results to A either.
    b_cursor = q.list_results(b.tid, b_run, limit=1).next_cursor
    with pytest.raises(NotFound):
        q.list_results(a.tid, b_run, cursor=b_cursor)

    assert [e["plan_id"] for e in q.list_exclusions(a.tid).items] == [str(a.plans[NIGHTLY])]
    assert [e["plan_id"] for e in q.list_exclusions(b.tid).items] == [str(b.plans[NIGHTLY])]
    assert all(e["team_id"] == a.tid for e in all_pages(lambda c: q.list_exclusions(a.tid, c, 1)))
    assert len(q.list_exclusions(None).items) == 2
    assert q.list_exclusions(str(uuid.uuid4())).items == []


# ------------------------------------------------------------------ 4. purges


def test_purges_by_plan_and_by_start_remove_exactly_their_scope_even_after_rebuilds(
    runtime: Runtime,
) -> None:
    app, q = runtime.app, runtime.queries
    a = make_tenant(app, "Alpha", seed=6, digits="666666666666")
    b = make_tenant(app, "Beta", seed=7, digits="777777777777")
    runtime.projector.catch_up()
    before_a, before_b = view_state(q, a), view_state(q, b)
    nightly_a, deploy_a = str(a.plans[NIGHTLY]), str(a.plans[DEPLOY])
    purged_runs = a.run_ids(NIGHTLY)
    assert count_results(runtime, purged_runs) == 30 + 7 + 9

    # By plan: A's nightly runs go; B's plan of the same name stays.
    app.purge_display(a.team, plan_id=a.plans[NIGHTLY], actor="ops", reason="customer request")
    runtime.projector.catch_up()
    expected_a = json.loads(json.dumps(before_a))
    expected_a["plans"][nightly_a]["latest_run_id"] = None
    expected_a["runs"][nightly_a] = []
    for run in purged_runs:
        del expected_a["results"][run]
    assert view_state(q, a) == expected_a
    assert view_state(q, b) == before_b
    assert count_results(runtime, purged_runs) == 0
    for run in purged_runs:
        with pytest.raises(NotFound):
            q.get_run(a.tid, run)

    # The still-running run gets a batch after the purge, then ends: it stays gone.
    running = a.runs[NIGHTLY][-1]
    app.record_results(a.team, running, next(batches(5, 5, seed=70)))
    app.complete_run(a.team, running, RUN_SUCCEEDED)
    runtime.projector.catch_up()
    assert app.get_run(a.team, running).total == 14
    assert view_state(q, a) == expected_a
    assert count_results(runtime, purged_runs) == 0

    # By start: the deploy run started before the cutoff goes, the one started at it stays.
    first, second = a.run_ids(DEPLOY)
    cutoff = app.get_run(a.team, UUID(second)).created_on
    app.purge_display(a.team, started_before=cutoff, actor="ops", reason="tidy")
    runtime.projector.catch_up()
    expected_a["runs"][deploy_a] = [r for r in expected_a["runs"][deploy_a] if r["id"] != first]
    del expected_a["results"][first]
    assert view_state(q, a) == expected_a
    assert q.get_plan(a.tid, deploy_a)["latest_run_id"] == second
    assert view_state(q, b) == before_b

    # A new run of the purged plan shows again.
    fresh = record_run(app, a.team, a.plans[NIGHTLY], total=3, size=3, seed=71)
    runtime.projector.catch_up()
    assert q.get_plan(a.tid, nightly_a)["latest_run_id"] == str(fresh)
    assert q.get_run(a.tid, str(fresh)) == expected_run(app, a.team, fresh)
    after_a = view_state(q, a)
    assert [r["id"] for r in after_a["runs"][nightly_a]] == [str(fresh)]

    # Rebuilding from the log replays the purges: nothing purged comes back.
    tables = dump_tables(runtime)
    for view in runtime.projector.views:
        assert runtime.projector.rebuild(view) == app.head_position()
        assert dump_tables(runtime) == tables
    assert view_state(q, a) == after_a
    assert view_state(q, b) == before_b
    assert count_results(runtime, [*purged_runs, first]) == 0
    assert count_results(runtime) == results_in_log(app) - (30 + 7 + 9 + 5) - 12


def test_purges_by_team_and_by_age_never_reach_another_team(runtime: Runtime) -> None:
    app, q = runtime.app, runtime.queries
    a = make_tenant(app, "Alpha", seed=8, digits="888888888888")
    b = make_tenant(app, "Beta", seed=9, digits="999999999999")
    c = make_tenant(app, "Gamma", seed=10, digits="101010101010")
    app.request_backup_exclusion(b.team, b.plans[DEPLOY], reason="r", ticket=None, actor="x")
    runtime.projector.catch_up()
    before = {t.tid: view_state(q, t) for t in (a, b, c)}

    def emptied(state: dict[str, Any]) -> dict[str, Any]:
        """A team's display once all its runs are purged: the rest stays."""
        state = json.loads(json.dumps(state))
        for plan_id in state["plans"]:
            state["plans"][plan_id]["latest_run_id"] = None
            state["runs"][plan_id] = []
        state["results"] = {}
        return state

    app.purge_display(b.team, actor="ops", reason="offboarding")
    runtime.projector.catch_up()
    assert view_state(q, b) == emptied(before[b.tid])
    assert view_state(q, a) == before[a.tid]
    assert view_state(q, c) == before[c.tid]
    assert len(q.list_exclusions(b.tid).items) == 1  # exclusions are not display data

    # Nothing is a day old yet: no purge is even recorded.
    head = app.head_position()
    assert purge_older_than(app, q, timedelta(days=1), actor="ops", reason="r") == []
    assert apply_display_retention(app, q, timedelta(days=1)) == []
    assert app.head_position() == head

    future = datetime.now(UTC) + timedelta(days=3)
    positions = purge_older_than(
        app, q, timedelta(days=1), actor="ops", reason="age", team=a.tid, now=future
    )
    assert len(positions) == 1 and positions[0] == app.head_position()
    runtime.projector.catch_up()
    assert view_state(q, a) == emptied(before[a.tid])
    assert view_state(q, c) == before[c.tid]

    # Retention: only C has runs left, so one purge event, for C.
    positions = apply_display_retention(app, q, timedelta(days=1), now=future)
    assert len(positions) == 1
    runtime.projector.catch_up()
    for tenant in (a, b, c):
        assert view_state(q, tenant) == emptied(before[tenant.tid])
    assert count_results(runtime) == 0

    tables = dump_tables(runtime)
    for view in runtime.projector.views:
        runtime.projector.rebuild(view)
    assert dump_tables(runtime) == tables
    assert tables["view_runs"] == [] and tables["view_results"] == []
    assert len(tables["view_teams"]) == 3 and len(tables["view_plans"]) == 6


@pytest.mark.parametrize("hours", [-5, 5])
def test_a_purge_cutoff_in_another_time_zone_means_the_same_instant(
    runtime: Runtime, hours: int, request: pytest.FixtureRequest
) -> None:
    app, q = runtime.app, runtime.queries
    tenant = make_tenant(app, "Zoned", seed=11, digits="121212121212")
    runtime.projector.catch_up()
    first, second = tenant.run_ids(DEPLOY)
    cutoff = app.get_run(tenant.team, UUID(second)).created_on
    zoned = cutoff.astimezone(timezone(timedelta(hours=hours)))
    assert zoned == cutoff
    app.purge_display(tenant.team, started_before=zoned, actor="ops", reason="tidy")
    runtime.projector.catch_up()
    assert q.get_run(tenant.tid, second)["id"] == second
    with pytest.raises(NotFound):
        q.get_run(tenant.tid, first)


def test_retention_with_a_clock_in_another_time_zone_means_the_same_instant(
    runtime: Runtime, request: pytest.FixtureRequest
) -> None:
    app, q = runtime.app, runtime.queries
    make_tenant(app, "Zoned", seed=12, digits="131313131313")
    runtime.projector.catch_up()
    now = (datetime.now(UTC) + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5)))
    assert len(apply_display_retention(app, q, timedelta(hours=1), now=now)) == 1
    runtime.projector.catch_up()
    assert count_results(runtime) == 0


# --------------------------------------------------- 5. exactly once, resumption


def test_small_pages_resume_exactly_where_they_stopped(runtime: Runtime) -> None:
    app = runtime.app
    make_tenant(app, "Alpha", seed=13, digits="141414141414")
    make_tenant(app, "Beta", seed=14, digits="151515151515")
    head = app.head_position()
    display = views_by_name(runtime)["display"]

    small = Projector(app, runtime.views, page_events=3)
    try:
        for steps in range(1, 6):
            assert small.step(display) == 3
            assert status_of(small)["display"].position == 3 * steps
            assert count_results(runtime) == results_in_log(app, up_to=3 * steps)
    finally:
        small.close()
    assert status_of(runtime.projector)["exclusions"].position == 0

    fresh = Projector(app, runtime.views, page_events=7)
    try:
        # display from 15; exclusions and drills from 0
        assert fresh.catch_up() == (head - 15) + head + head
        assert fresh.catch_up() == 0
        assert {s.view: s.position for s in fresh.status()} == {
            "display": head,
            "exclusions": head,
            "drills": head,
        }
    finally:
        fresh.close()
    assert count_results(runtime) == results_in_log(app) == 2 * (12 + 4 + 30 + 7 + 9)
    with runtime.views.reading() as cur:
        assert cur.fetchone("SELECT count(*) FROM view_runs") == (10,)
        row = cur.fetchone("SELECT sum(total) FROM view_runs")
        assert row is not None and int(row[0]) == count_results(runtime)


def test_two_projectors_one_after_the_other_or_interleaved_apply_each_event_once(
    runtime: Runtime,
) -> None:
    app = runtime.app
    tenant = make_tenant(app, "Alpha", seed=15, digits="161616161616")
    first = Projector(app, runtime.views, page_events=5)
    second = Projector(app, runtime.views, page_events=4)
    try:
        assert first.catch_up() == len(first.views) * app.head_position()
        assert second.catch_up() == 0
        assert count_results(runtime) == results_in_log(app)

        for i in range(4):
            record_run(app, tenant.team, tenant.plans[NIGHTLY], total=25, size=3, seed=30 + i)
        app.request_backup_exclusion(
            tenant.team, tenant.plans[NIGHTLY], reason="r", ticket=None, actor="x"
        )
        views = list(runtime.projector.views)
        busy = True
        rounds = 0
        while busy:
            busy = False
            for view in views:
                for projector in (first, second):
                    busy = projector.step(view) > 0 or busy
            rounds += 1
        assert rounds > 3  # they really took turns
        head = app.head_position()
        assert [(s.view, s.position, s.state) for s in first.status()] == [
            ("display", head, STATE_RUNNING),
            ("drills", head, STATE_RUNNING),
            ("exclusions", head, STATE_RUNNING),
        ]
    finally:
        first.close()
        second.close()
    assert count_results(runtime) == results_in_log(app) == 62 + 4 * 25
    with runtime.views.reading() as cur:
        assert cur.fetchone("SELECT count(*) FROM view_exclusions") == (1,)
        row = cur.fetchone("SELECT count(*) FROM (SELECT DISTINCT run_id, seq FROM view_results) d")
        assert row == (62 + 4 * 25,)
    for run in tenant.runs[NIGHTLY]:
        assert runtime.queries.get_run(tenant.tid, str(run)) == expected_run(app, tenant.team, run)


# ---------------------------------------------------------- 6. failure is loud


class Fussy:
    """A test view recording team and plan creations that refuses one topic while told to."""

    name = "fussy"
    tables = (Table("test_fussy", "position BIGINT PRIMARY KEY, topic TEXT NOT NULL"),)
    topics = frozenset({"resultsvc/Team/Created", "resultsvc/Plan/Created"})

    def __init__(self, refuse: str | None = "resultsvc/Plan/Created") -> None:
        self.refuse = refuse

    def apply(self, cur: Cursor, page: Any, suffix: str = "") -> None:
        for position, topic, _event in page:
            if topic == self.refuse:
                raise EventNotProjectable(f"{topic} at position {position}: refused by the test")
            cur.execute(
                f"INSERT INTO test_fussy{suffix} (position, topic) VALUES (?, ?)", [position, topic]
            )


def fussy_rows(runtime: Runtime) -> list[tuple[int, str]]:
    with runtime.views.reading() as cur:
        return [
            (int(p), str(t)) for p, t in cur.fetchall("SELECT * FROM test_fussy ORDER BY position")
        ]


def creations(app: ResultsApp) -> list[tuple[int, str]]:
    return [
        (n.id, n.topic)
        for n in app.recorder.select_notifications(start=1, limit=1_000_000)
        if n.topic in Fussy.topics
    ]


def test_a_view_that_cannot_apply_an_event_stops_there_and_says_why(runtime: Runtime) -> None:
    app = runtime.app
    team, _ = app.create_team("Alpha")
    account, _ = app.link_account_role(team.id, ROLE, verified=True, actor="a")
    _, plan_position = app.create_plan(team.id, account.id, NIGHTLY)
    make_tenant(app, "Beta", seed=16, digits="171717171717")
    fussy = Fussy()
    projector = Projector(app, runtime.views, [*runtime.projector.views, fussy], page_events=2)
    try:
        projector.ensure_schema()
        projector.catch_up()
        head = app.head_position()
        status = status_of(projector)
        failed = status["fussy"]
        assert failed.state == STATE_FAILED
        assert failed.error_position == plan_position
        assert failed.last_error is not None
        assert "resultsvc/Plan/Created" in failed.last_error
        assert f"at position {plan_position}" in failed.last_error
        assert plan_position - 2 <= failed.position < plan_position  # the page before it
        assert failed.lag == head - failed.position > 0
        assert fussy_rows(runtime) == [(p, t) for p, t in creations(app) if p <= failed.position]
        for name in ("display", "exclusions", "drills"):
            assert status[name].state == STATE_RUNNING
            assert status[name].position == head and status[name].lag == 0
            assert status[name].last_error is None and status[name].error_position is None
        # The other views keep going; the failed one stays put.
        _, gamma = app.create_team("Gamma")  # the team and its External ID claim
        assert status_of(projector)["display"].lag == gamma - head == 2
        projector.catch_up()
        status = status_of(projector)
        assert status["display"].position == app.head_position()
        assert status["fussy"].position == failed.position
        assert status["fussy"].lag == app.head_position() - failed.position
        with pytest.raises(ViewsBehind, match="fussy at"):
            runtime.queries.wait_for(app.head_position(), timeout=0.05)

        # Restarting while the cause persists fails again, at the same event.
        assert projector.restart_failed() == ["fussy"]
        restarted = status_of(projector)["fussy"]
        assert (restarted.state, restarted.last_error, restarted.error_position) == (
            STATE_RUNNING,
            None,
            None,
        )
        assert projector.restart_failed() == []
        projector.catch_up()
        again = status_of(projector)["fussy"]
        assert (again.state, again.error_position) == (STATE_FAILED, plan_position)
        assert again.position == failed.position

        # Once fixed, a restart takes it to the head, every event applied once.
        fussy.refuse = None
        assert projector.restart_failed() == ["fussy"]
        projector.catch_up()
        fixed = status_of(projector)["fussy"]
        assert (fixed.state, fixed.position, fixed.lag) == (STATE_RUNNING, app.head_position(), 0)
        assert fussy_rows(runtime) == creations(app)
        runtime.queries.wait_for(app.head_position(), timeout=1)
    finally:
        projector.close()


def test_connection_trouble_inside_a_view_is_retried_not_a_failure(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The projector promises that connection trouble is retried, not recorded as a failure."""
    app = runtime.app
    make_tenant(app, "Alpha", seed=17, digits="181818181818")
    transient: Exception = (
        sqlite3.OperationalError("disk I/O error")
        if runtime.views.dialect == "sqlite"
        else psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    )
    real_execute = Cursor.execute
    raised: list[str] = []

    def flaky(self: Cursor, statement: str, params: Any = ()) -> int:
        if statement.startswith("UPDATE view_runs") and not raised:
            raised.append(statement)
            raise transient
        return real_execute(self, statement, params)

    monkeypatch.setattr(Cursor, "execute", flaky)
    display = views_by_name(runtime)["display"]
    try:
        runtime.projector.step(display)
    except type(transient):
        pass  # a transient error may surface: the projector's run loop retries it
    assert raised
    assert status_of(runtime.projector)["display"].state == STATE_RUNNING
    runtime.projector.catch_up()
    assert count_results(runtime) == results_in_log(app)


def test_an_exclusion_the_view_cannot_store_stops_the_view_loudly(
    runtime: Runtime, request: pytest.FixtureRequest
) -> None:
    """Any event a view cannot apply marks that view failed; the projector itself goes on."""
    postgres = runtime.views.dialect == "postgresql"
    app = runtime.app
    tenant = make_tenant(app, "Alpha", seed=18, digits="191919191919")
    # The domain refuses such an actor outright...
    before = app.head_position()
    with pytest.raises(InvalidInput) as refused:
        app.request_backup_exclusion(
            tenant.team, tenant.plans[NIGHTLY], reason="r", ticket=None, actor="ops\x00bot"
        )
    assert refused.value.field == "actor" and app.head_position() == before
    # ...so the event is forged below the command layer, as old data or a bug might have it.
    plan = app.get_plan(tenant.team, tenant.plans[NIGHTLY])
    plan._request_backup_exclusion(
        team_id=tenant.team, reason="r", ticket=None, requested_by="ops\x00bot"
    )
    appended = app.save(plan)[-1].notification
    runtime.projector.catch_up()  # must not raise
    status = status_of(runtime.projector)
    assert status["display"].position == app.head_position()
    exclusions = status["exclusions"]
    # PostgreSQL text cannot hold NUL, SQLite's can: only there does the view stop.
    assert (exclusions.state == STATE_FAILED) == postgres
    if postgres:
        assert exclusions.error_position == appended.id
        assert "resultsvc/Plan/BackupExclusionRequested" in (exclusions.last_error or "")
    else:
        assert exclusions.position == app.head_position()
        assert runtime.queries.list_exclusions(tenant.tid).items[0]["requested_by"] == "ops\x00bot"


# ---------------------------------------------------------- 7. read your writes


def test_wait_for_reports_views_behind_then_returns_once_projected(runtime: Runtime) -> None:
    app, q = runtime.app, runtime.queries
    team, position = app.create_team("Alpha")
    started = time.monotonic()
    with pytest.raises(ViewsBehind) as behind:
        q.wait_for(position, timeout=0.2)
    assert time.monotonic() - started < 2
    assert str(behind.value) == (
        f"views behind position {position}: display at 0, drills at 0, exclusions at 0"
    )
    q.wait_for(None, timeout=0)
    q.wait_for(0, timeout=0)
    runtime.projector.catch_up()
    q.wait_for(position, timeout=0.2)
    assert q.get_team(str(team.id), str(team.id))["name"] == "Alpha"
    assert q.positions() == {"display": position, "exclusions": position, "drills": position}
    with pytest.raises(ViewsBehind):
        q.wait_for(position + 1, timeout=0.05)
    status = status_of(runtime.projector)
    assert all(s.lag == s.head - s.position == 0 for s in status.values())
    _, beta = app.create_team("Beta")
    lags = [(s.lag, s.head - s.position) for s in runtime.projector.status()]
    assert lags == [(beta - position, beta - position)] * 3 and beta - position == 2


def test_a_background_projector_lets_writers_read_their_own_writes(runtime: Runtime) -> None:
    app, q = runtime.app, runtime.queries
    stop = threading.Event()
    worker = threading.Thread(target=runtime.projector.run, args=(stop,), daemon=True)
    worker.start()
    try:
        team, position = app.create_team("Alpha")
        runtime.projector.wake()
        q.wait_for(position, timeout=20)
        assert q.get_team(str(team.id), str(team.id))["name"] == "Alpha"

        account, _ = app.link_account_role(team.id, ROLE, verified=True, actor="a")
        plan, _ = app.create_plan(team.id, account.id, NIGHTLY)
        run, _ = app.start_run(team.id, plan.id)
        for batch in batches(40, 9, seed=5):
            accepted = app.record_results(team.id, run.id, batch)
            runtime.projector.wake()
            q.wait_for(accepted.position, timeout=20)
            shown = q.get_run(str(team.id), str(run.id))
            assert shown["total"] == app.get_run(team.id, run.id).total
        ended = app.complete_run(team.id, run.id, RUN_SUCCEEDED)
        q.wait_for(ended.position, timeout=20)
        assert q.get_run(str(team.id), str(run.id)) == expected_run(app, team.id, run.id)
    finally:
        stop.set()
        runtime.projector.wake()
        worker.join(timeout=15)
    assert not worker.is_alive()
    assert count_results(runtime) == 40


# ------------------------------------------------------------------ 8. rebuild


def live_indexes(runtime: Runtime) -> dict[str, list[str]]:
    """Index names per live view table (explicit indexes only), and that they are usable."""
    names = [t.name for t in ALL_TABLES]
    found: dict[str, list[str]] = {name: [] for name in names}
    with runtime.views.reading() as cur:
        if runtime.views.dialect == "sqlite":
            rows = cur.fetchall(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
            tables = [
                r[0] for r in cur.fetchall("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            assert cur.fetchone("PRAGMA integrity_check") == ("ok",)
        else:
            rows = cur.fetchall(
                "SELECT c.relname, t.relname FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
                " JOIN pg_namespace n ON n.oid = t.relnamespace"
                " WHERE n.nspname = current_schema() AND NOT i.indisprimary"
                " AND i.indisvalid AND i.indisready AND i.indislive"
            )
            invalid = cur.fetchall(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND NOT (i.indisvalid AND i.indisready)"
            )
            assert invalid == []
            tables = [
                r[0]
                for r in cur.fetchall(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            ]
    assert not [t for t in tables if "_rb" in t], tables  # no leftover rebuild tables
    for index, table in rows:
        if table in found:
            found[str(table)].append(str(index))
    return {name: sorted(found[name]) for name in names}


def assert_index_names_valid(indexes: dict[str, list[str]]) -> None:
    for table in ALL_TABLES:
        names = indexes[table.name]
        assert len(names) == len(table.indexes), (table.name, names)
        numbers = sorted(
            int(m.group(1))
            for n in names
            if (m := re.fullmatch(rf"ix_{table.name}_(\d+)_[0-9a-f]{{6}}", n))
        )
        assert numbers == list(range(len(table.indexes))), (table.name, names)


def test_rebuilds_swap_in_fresh_tables_with_valid_indexes_and_reset_failures(
    runtime: Runtime,
) -> None:
    app, q = runtime.app, runtime.queries
    tenant = make_tenant(app, "Alpha", seed=19, digits="202020202020")
    app.request_backup_exclusion(
        tenant.team, tenant.plans[DEPLOY], reason="r", ticket="T", actor="x"
    )
    runtime.projector.catch_up()
    state, tables = view_state(q, tenant), dump_tables(runtime)
    initial = live_indexes(runtime)
    assert_index_names_valid(initial)

    generations = [initial]
    for _ in range(2):  # the second rebuild must not clash with the first one's names
        for view in runtime.projector.views:
            assert runtime.projector.rebuild(view) == app.head_position()
        current = live_indexes(runtime)
        assert_index_names_valid(current)
        for table in ALL_TABLES:
            assert set(current[table.name]).isdisjoint(generations[-1][table.name])
        generations.append(current)
        assert dump_tables(runtime) == tables
        assert view_state(q, tenant) == state

    # The live projector carries on on the swapped tables.
    extra = record_run(app, tenant.team, tenant.plans[NIGHTLY], total=6, size=6, seed=40)
    runtime.projector.catch_up()
    assert q.get_run(tenant.tid, str(extra)) == expected_run(app, tenant.team, extra)
    assert count_results(runtime) == results_in_log(app)

    # Rebuilding a failed view (after fixing the cause) resets its state.
    fussy = Fussy()
    projector = Projector(app, runtime.views, [fussy])
    try:
        projector.ensure_schema()
        projector.catch_up()
        assert status_of(projector)["fussy"].state == STATE_FAILED
        with pytest.raises(EventNotProjectable):
            projector.rebuild(fussy)  # still broken: the live tables stay as they were
        assert status_of(projector)["fussy"].state == STATE_FAILED
        assert live_indexes(runtime) == generations[-1]
        fussy.refuse = None
        assert projector.rebuild(fussy) == app.head_position()
        rebuilt = status_of(projector)["fussy"]
        assert (rebuilt.state, rebuilt.position, rebuilt.last_error, rebuilt.error_position) == (
            STATE_RUNNING,
            app.head_position(),
            None,
            None,
        )
        assert fussy_rows(runtime) == creations(app)
        assert projector.rebuild(fussy) == app.head_position()  # and again, no clash
        assert fussy_rows(runtime) == creations(app)
    finally:
        projector.close()
