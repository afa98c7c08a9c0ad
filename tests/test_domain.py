"""The application's commands and queries, on SQLite and on PostgreSQL.

These are the promises the HTTP API and the CLI inherit: refusals append
nothing, results read back exactly as normalised, one team can never learn
that another team's resources exist, positions let callers wait for their
own writes, and a long run stays cheap to load.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.application import ResultsApp
from domain.errors import Conflict, InvalidInput, NotFound
from domain.findings import validate_batch
from domain.model import RUN_FAILED, RUN_RUNNING, RUN_SUCCEEDED, ExternalIdClaim, ResultBatch
from service.database import open_application
from service.samples import batches
from tests.test_findings import findings, valid_finding

ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/Audit"


@dataclass(frozen=True)
class Tenant:
    """A team with one linked account, one plan and one running run holding one batch."""

    team: UUID
    account: UUID
    plan: UUID
    run: UUID


def make_tenant(app: ResultsApp, name: str, account_digits: str = "123456789012") -> Tenant:
    team, _ = app.create_team(name)
    account, _ = app.link_account_role(
        team.id, f"arn:aws:iam::{account_digits}:role/Audit", verified=True, actor="alice"
    )
    plan, _ = app.create_plan(team.id, account.id, f"{name} audit")
    run, _ = app.start_run(team.id, plan.id)
    app.record_results(team.id, run.id, [valid_finding(rule_id=f"{name}-rule")])
    return Tenant(team.id, account.id, plan.id, run.id)


def batch_of(size: int, tag: str = "r") -> list[dict[str, Any]]:
    """``size`` distinct valid findings, so order mistakes cannot go unnoticed."""
    return [
        valid_finding(rule_id=f"{tag}-{i}", observed_at=f"2024-05-01T12:00:{i % 60:02d}+02:00")
        for i in range(size)
    ]


def stored_notifications(app: ResultsApp) -> list[Any]:
    return list(app.recorder.select_notifications(start=0, limit=1000))


# ---------------------------------------------------------------------- teams


def test_external_ids_are_long_url_safe_and_unique_across_fifty_teams(app: ResultsApp) -> None:
    """The External ID protects customers from the confused deputy: it must be unguessable."""
    teams = [app.create_team(f"team {i}")[0] for i in range(50)]
    external_ids = [team.external_id for team in teams]
    assert len(set(external_ids)) == 50
    for team, external_id in zip(teams, external_ids, strict=True):
        assert len(external_id) >= 32
        assert re.fullmatch(r"[A-Za-z0-9_-]+", external_id), external_id
        assert app.get_team(team.id).external_id == external_id
        claim: ExternalIdClaim = app.repository.get(ExternalIdClaim.create_id(external_id))
        assert claim.team_id == team.id


def test_an_external_id_collision_fails_the_save_and_appends_nothing(
    app: ResultsApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uniqueness rests on the store's constraint: a repeated External ID stores no second team."""
    monkeypatch.setattr("domain.application.secrets.token_urlsafe", lambda _: "x" * 43)
    first, _ = app.create_team("first")
    head = app.head_position()
    with pytest.raises(IntegrityError):
        app.create_team("second")
    assert app.head_position() == head
    assert app.repository.get(ExternalIdClaim.create_id("x" * 43)).team_id == first.id


@pytest.mark.parametrize("name", ["", "   ", "n" * 201, None, 7])
def test_bad_team_names_are_refused_and_nothing_appended(app: ResultsApp, name: object) -> None:
    """A refused team leaves no trace in the log."""
    head = app.head_position()
    with pytest.raises(InvalidInput) as caught:
        app.create_team(name)  # type: ignore[arg-type]
    assert caught.value.field == "name"
    assert app.head_position() == head


def test_team_names_are_stripped(app: ResultsApp) -> None:
    """Surrounding blanks are typing accidents, not part of a name."""
    team, _ = app.create_team("  Platform  ")
    assert app.get_team(team.id).name == "Platform"


# ------------------------------------------------------------------- accounts


def test_linking_takes_the_account_id_from_the_arn(app: ResultsApp) -> None:
    """The AWS account id is never asked for separately, so it cannot disagree with the role."""
    team, _ = app.create_team("A")
    account, position = app.link_account_role(
        team.id, "arn:aws:iam::210987654321:role/a/b/Audit", verified=False, actor="bob"
    )
    assert position == app.head_position()
    loaded = app.get_account(team.id, account.id)
    assert loaded.aws_account_id == "210987654321"
    assert loaded.role_arn == "arn:aws:iam::210987654321:role/a/b/Audit"
    assert (loaded.verified, loaded.linked_by, loaded.method) == (False, "bob", "role")
    assert loaded.linked
    keys, _ = app.link_account_role(
        team.id, ROLE_ARN, verified=True, actor="bob", method="access_keys"
    )
    assert app.get_account(team.id, keys.id).method == "access_keys"


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::12345678901:role/Audit",
        "arn:aws:iam::123456789012:user/Audit",
        "arn:aws:sts::123456789012:role/Audit",
        "",
        None,
    ],
)
def test_a_bad_arn_is_refused_and_nothing_appended(app: ResultsApp, arn: object) -> None:
    """A refused link must not leave a half-linked account behind."""
    team, _ = app.create_team("A")
    head = app.head_position()
    with pytest.raises(InvalidInput) as caught:
        app.link_account_role(team.id, arn, verified=True, actor="bob")  # type: ignore[arg-type]
    assert caught.value.field == "role_arn"
    assert app.head_position() == head


def test_a_bad_link_method_is_refused_and_nothing_appended(app: ResultsApp) -> None:
    """Only the two ways the service knows to reach an account may be recorded."""
    team, _ = app.create_team("A")
    head = app.head_position()
    with pytest.raises(InvalidInput) as caught:
        app.link_account_role(team.id, ROLE_ARN, verified=True, actor="bob", method="password")
    assert caught.value.field == "method"
    assert app.head_position() == head


def test_linking_to_an_unknown_team_is_not_found(app: ResultsApp) -> None:
    """No account can be linked to a team that does not exist."""
    head = app.head_position()
    unknown = uuid.uuid4()
    with pytest.raises(NotFound) as caught:
        app.link_account_role(unknown, ROLE_ARN, verified=True, actor="bob")
    assert str(caught.value) == f"team {unknown} not found"
    assert app.head_position() == head


def test_unlinking_twice_is_a_conflict(app: ResultsApp) -> None:
    """An account is unlinked once; the second request appends nothing."""
    tenant = make_tenant(app, "A")
    app.unlink_account(tenant.team, tenant.account, actor="bob")
    assert not app.get_account(tenant.team, tenant.account).linked
    head = app.head_position()
    with pytest.raises(Conflict):
        app.unlink_account(tenant.team, tenant.account, actor="bob")
    assert app.head_position() == head


# ---------------------------------------------------------------------- plans


def test_plans_are_created_on_the_teams_linked_accounts(app: ResultsApp) -> None:
    """A plan remembers its team and account and starts included in backups."""
    team, _ = app.create_team("A")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=True, actor="bob")
    plan, position = app.create_plan(team.id, account.id, "  Weekly audit ")
    assert position == app.head_position()
    loaded = app.get_plan(team.id, plan.id)
    assert (loaded.team_id, loaded.account_id, loaded.name) == (team.id, account.id, "Weekly audit")
    assert not loaded.backup_excluded


def test_no_plan_on_an_unlinked_account(app: ResultsApp) -> None:
    """Once a customer withdrew access, no new plan may target that account."""
    tenant = make_tenant(app, "A")
    app.unlink_account(tenant.team, tenant.account, actor="bob")
    head = app.head_position()
    with pytest.raises(Conflict):
        app.create_plan(tenant.team, tenant.account, "again")
    assert app.head_position() == head


def test_no_plan_on_another_teams_account(app: ResultsApp) -> None:
    """B's account looks exactly like an unknown account to A, and no plan is created."""
    a = make_tenant(app, "A")
    b = make_tenant(app, "B", account_digits="999999999999")
    head = app.head_position()
    with pytest.raises(NotFound) as caught:
        app.create_plan(a.team, b.account, "steal")
    assert str(caught.value) == f"account {b.account} not found"
    assert app.head_position() == head


def test_backup_exclusion_is_recorded_once(app: ResultsApp) -> None:
    """A compliance request is an audit fact: recorded once, a repeat is a conflict."""
    tenant = make_tenant(app, "A")
    appended = app.request_backup_exclusion(
        tenant.team, tenant.plan, reason=" GDPR erasure ", ticket="LEGAL-1", actor="carol"
    )
    assert appended.id == tenant.plan
    assert appended.position == app.head_position()
    assert app.get_plan(tenant.team, tenant.plan).backup_excluded
    with pytest.raises(Conflict):
        app.request_backup_exclusion(
            tenant.team, tenant.plan, reason="again", ticket=None, actor="carol"
        )
    assert app.head_position() == appended.position
    requests = [
        n for n in stored_notifications(app) if n.topic == "resultsvc/Plan/BackupExclusionRequested"
    ]
    assert len(requests) == 1
    assert requests[0].originator_id == tenant.plan


def test_backup_exclusion_needs_a_reason(app: ResultsApp) -> None:
    """An exclusion without a reason cannot be audited; nothing is recorded."""
    tenant = make_tenant(app, "A")
    head = app.head_position()
    with pytest.raises(InvalidInput) as caught:
        app.request_backup_exclusion(tenant.team, tenant.plan, reason=" ", ticket=None, actor="c")
    assert caught.value.field == "reason"
    assert app.head_position() == head
    assert not app.get_plan(tenant.team, tenant.plan).backup_excluded


# ----------------------------------------------------------------------- runs


def test_a_run_records_batches_and_reads_them_back_exactly(app: ResultsApp) -> None:
    """Results read from the store equal the normalised input, in append order."""
    tenant = make_tenant(app, "A")
    before = list(app.run_results(tenant.team, tenant.run))
    batches = [batch_of(3, "first"), batch_of(1, "second"), batch_of(40, "third")]
    accepted = [app.record_results(tenant.team, tenant.run, batch) for batch in batches]
    assert [a.batch_no for a in accepted] == [2, 3, 4]
    assert [a.accepted for a in accepted] == [3, 1, 40]
    assert all(a.run_id == tenant.run for a in accepted)
    expected = before + [f for batch in batches for f in validate_batch(batch)]
    assert list(app.run_results(tenant.team, tenant.run)) == expected
    run = app.get_run(tenant.team, tenant.run)
    assert (run.status, run.batches, run.total) == (RUN_RUNNING, 4, 45)
    assert (run.plan_id, run.account_id) == (tenant.plan, tenant.account)


def test_a_completed_run_refuses_results_and_appends_nothing(app: ResultsApp) -> None:
    """After a run ends its results are final: late batches are a conflict, not an append."""
    tenant = make_tenant(app, "A")
    ended = app.complete_run(tenant.team, tenant.run, RUN_SUCCEEDED)
    assert ended.position == app.head_position()
    assert app.get_run(tenant.team, tenant.run).status == RUN_SUCCEEDED
    head = app.head_position()
    results = list(app.run_results(tenant.team, tenant.run))
    with pytest.raises(Conflict):
        app.record_results(tenant.team, tenant.run, batch_of(2))
    with pytest.raises(Conflict):
        app.complete_run(tenant.team, tenant.run, RUN_FAILED, "late")
    assert app.head_position() == head
    assert list(app.run_results(tenant.team, tenant.run)) == results
    run = app.get_run(tenant.team, tenant.run)
    assert (run.status, run.batches, run.total) == (RUN_SUCCEEDED, 1, 1)


def test_a_failed_run_keeps_its_error(app: ResultsApp) -> None:
    """A failure reason is shown to the team next to the partial results."""
    tenant = make_tenant(app, "A")
    app.complete_run(tenant.team, tenant.run, RUN_FAILED, "  AccessDenied on s3:ListBuckets ")
    run = app.get_run(tenant.team, tenant.run)
    assert (run.status, run.error) == (RUN_FAILED, "AccessDenied on s3:ListBuckets")


@pytest.mark.parametrize("status", ["running", "done", "", "SUCCEEDED"])
def test_a_run_ends_only_as_succeeded_or_failed(app: ResultsApp, status: str) -> None:
    """Any other end state is refused before anything is appended."""
    tenant = make_tenant(app, "A")
    head = app.head_position()
    with pytest.raises(InvalidInput) as caught:
        app.complete_run(tenant.team, tenant.run, status)
    assert caught.value.field == "status"
    assert app.head_position() == head
    assert app.get_run(tenant.team, tenant.run).status == RUN_RUNNING


def test_no_run_on_an_unlinked_account(app: ResultsApp) -> None:
    """The customer withdrew access: existing plans must not start new runs."""
    tenant = make_tenant(app, "A")
    app.unlink_account(tenant.team, tenant.account, actor="bob")
    head = app.head_position()
    with pytest.raises(Conflict):
        app.start_run(tenant.team, tenant.plan)
    assert app.head_position() == head


def test_a_batch_with_one_bad_finding_stores_nothing(app: ResultsApp) -> None:
    """Batches are all or nothing: 499 good findings do not get in with one bad one."""
    tenant = make_tenant(app, "A")
    head = app.head_position()
    results = list(app.run_results(tenant.team, tenant.run))
    version = app.get_run(tenant.team, tenant.run).version
    batch = batch_of(500)
    batch[317]["severity"] = "catastrophic"
    with pytest.raises(InvalidInput) as caught:
        app.record_results(tenant.team, tenant.run, batch)
    assert caught.value.field == "results[317].severity"
    assert app.head_position() == head
    assert list(app.run_results(tenant.team, tenant.run)) == results
    run = app.get_run(tenant.team, tenant.run)
    assert (run.version, run.batches, run.total) == (version, 1, 1)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(findings(), min_size=1, max_size=5))
def test_any_valid_batch_reads_back_as_normalised(
    app: ResultsApp, batch: list[dict[str, Any]]
) -> None:
    """Whatever validation accepts, the store gives back unchanged (unicode, floats, nesting)."""
    team, _ = app.create_team("A")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=True, actor="bob")
    plan, _ = app.create_plan(team.id, account.id, "p")
    run, _ = app.start_run(team.id, plan.id)
    app.record_results(team.id, run.id, batch)
    assert list(app.run_results(team.id, run.id)) == validate_batch(batch)


@pytest.mark.parametrize(
    "details",
    [
        {"ref": {"_type_": "uuid_hex", "_data_": "0" * 32}},
        {"ref": [{"_type_": "custom", "_data_": 1}]},
        {"_type_": "decimal_str", "_data_": "1.5"},
    ],
)
def test_details_shaped_like_a_transcoder_envelope_are_refused(
    app: ResultsApp, details: dict[str, Any]
) -> None:
    """Details are customer-controlled JSON: nothing accepted may poison the store.

    eventsourcing's JSON transcoder reads an object with exactly the keys
    ``_type_`` and ``_data_`` as its own encoded value, so such details would
    read back changed or not at all: they are refused, and nothing is stored.
    """
    tenant = make_tenant(app, "A")
    before = app.head_position()
    with pytest.raises(InvalidInput) as refused:
        app.record_results(tenant.team, tenant.run, [valid_finding(details=details)])
    assert refused.value.field == "results[0].details"
    assert "_type_" in refused.value.rule
    assert app.head_position() == before
    ok = {"ref": {"_type_": "uuid_hex", "_data_": "x", "extra": 1}}
    app.record_results(tenant.team, tenant.run, [valid_finding(details=ok)])
    assert list(app.run_results(tenant.team, tenant.run))[-1]["details"] == ok


def test_a_batch_racing_another_writer_is_retried_not_lost(
    app: ResultsApp, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers on one run: the loser retries on fresh state, batch numbers stay contiguous."""
    tenant = make_tenant(app, "A")
    other = open_application(database_url)
    try:
        real_save = app._save
        raced: list[int] = []

        def save_after_a_rival(*aggregates: Any) -> int:
            if not raced:  # the rival's batch lands between our load and our save
                raced.append(
                    other.record_results(tenant.team, tenant.run, batch_of(2, "rival")).batch_no
                )
            return real_save(*aggregates)

        monkeypatch.setattr(app, "_save", save_after_a_rival)
        ours = app.record_results(tenant.team, tenant.run, batch_of(3, "ours"))
    finally:
        other.close()
    assert raced == [2]
    assert ours.batch_no == 3
    assert ours.position == app.head_position()
    run = app.get_run(tenant.team, tenant.run)
    assert (run.batches, run.total) == (3, 6)
    rule_ids = [f["rule_id"] for f in app.run_results(tenant.team, tenant.run)]
    assert rule_ids == ["A-rule", "rival-0", "rival-1", "ours-0", "ours-1", "ours-2"]


# -------------------------------------------------------------------- tenancy

Probe = Callable[[ResultsApp, UUID, UUID], object]

PROBES: dict[str, tuple[str, Probe]] = {
    "get_account": ("account", lambda app, team, ident: app.get_account(team, ident)),
    "unlink_account": (
        "account",
        lambda app, team, ident: app.unlink_account(team, ident, actor="mallory"),
    ),
    "create_plan": ("account", lambda app, team, ident: app.create_plan(team, ident, "steal")),
    "get_plan": ("plan", lambda app, team, ident: app.get_plan(team, ident)),
    "request_backup_exclusion": (
        "plan",
        lambda app, team, ident: app.request_backup_exclusion(
            team, ident, reason="r", ticket=None, actor="mallory"
        ),
    ),
    "start_run": ("plan", lambda app, team, ident: app.start_run(team, ident)),
    "get_run": ("run", lambda app, team, ident: app.get_run(team, ident)),
    "record_results": (
        "run",
        lambda app, team, ident: app.record_results(team, ident, [valid_finding()]),
    ),
    "complete_run": (
        "run",
        lambda app, team, ident: app.complete_run(team, ident, RUN_FAILED, "x"),
    ),
    "run_results": ("run", lambda app, team, ident: list(app.run_results(team, ident))),
}


def _not_found(app: ResultsApp, probe: Probe, team: UUID, ident: UUID) -> NotFound:
    with pytest.raises(NotFound) as caught:
        probe(app, team, ident)
    error = caught.value
    assert error.__cause__ is None
    return error


def _shape(error: NotFound, ident: UUID) -> str:
    assert str(ident) in str(error)
    return str(error).replace(str(ident), "<id>")


@pytest.mark.parametrize("name", sorted(PROBES))
def test_another_teams_ids_look_exactly_like_unknown_ids(app: ResultsApp, name: str) -> None:
    """A cannot tell B's resources (or ids of the wrong kind) from ids that do not exist."""
    kind, probe = PROBES[name]
    a = make_tenant(app, "A")
    b = make_tenant(app, "B", account_digits="999999999999")
    foreign = {
        "B team": b.team,
        "B account": b.account,
        "B plan": b.plan,
        "B run": b.run,
        "B batch": ResultBatch.create_id(b.run, 1),
        "B claim": ExternalIdClaim.create_id(app.get_team(b.team).external_id),
        "A team": a.team,
        "A account": a.account,
        "A plan": a.plan,
        "A run": a.run,
    }
    own = {"account": a.account, "plan": a.plan, "run": a.run}[kind]
    del foreign[f"A {kind}"]  # the one id that must work
    head = app.head_position()
    unknown = uuid.uuid4()
    reference = _not_found(app, probe, a.team, unknown)
    assert (reference.kind, reference.ident) == (kind, str(unknown))
    assert str(reference) == f"{kind} {unknown} not found"
    for label, ident in foreign.items():
        error = _not_found(app, probe, a.team, ident)
        assert (error.kind, error.ident) == (kind, str(ident)), label
        assert _shape(error, ident) == _shape(reference, unknown), label
    assert app.head_position() == head
    # B's resources are untouched by A's attempts.
    assert app.get_account(b.team, b.account).linked
    assert not app.get_plan(b.team, b.plan).backup_excluded
    run = app.get_run(b.team, b.run)
    assert (run.status, run.batches) == (RUN_RUNNING, 1)
    # And the probe is a real one: with A's own id it does not raise NotFound.
    try:
        probe(app, a.team, own)
    except NotFound as error:  # pragma: no cover - would be a failure
        pytest.fail(f"{name} refused the team's own {kind}: {error}")
    except (Conflict, InvalidInput):
        pass


def test_get_team_with_other_ids_looks_like_an_unknown_team(app: ResultsApp) -> None:
    """Account, plan or run ids used as team ids are simply unknown teams."""
    b = make_tenant(app, "B")
    unknown = uuid.uuid4()
    reference = _shape(_not_found(app, lambda a, t, i: a.get_team(i), unknown, unknown), unknown)
    for ident in (b.account, b.plan, b.run):
        error = _not_found(app, lambda a, t, i: a.get_team(i), ident, ident)
        assert _shape(error, ident) == reference


# ------------------------------------------------------------------ positions


def test_positions_strictly_increase_and_match_the_head(app: ResultsApp) -> None:
    """Callers wait for views to reach the position a command returned: it must be the head."""
    positions: list[int] = []

    def check(position: int) -> None:
        assert position == app.head_position()
        assert not positions or position > positions[-1]
        positions.append(position)

    assert app.head_position() == 0
    team, position = app.create_team("A")
    check(position)
    account, position = app.link_account_role(team.id, ROLE_ARN, verified=True, actor="b")
    check(position)
    plan, position = app.create_plan(team.id, account.id, "p")
    check(position)
    run, position = app.start_run(team.id, plan.id)
    check(position)
    for size in (1, 7, 3):
        check(app.record_results(team.id, run.id, batch_of(size)).position)
    check(app.complete_run(team.id, run.id, RUN_SUCCEEDED).position)
    check(
        app.request_backup_exclusion(team.id, plan.id, reason="r", ticket="T", actor="b").position
    )
    check(app.unlink_account(team.id, account.id, actor="b").position)
    assert len(positions) == 10


def test_stored_topics_are_all_explicit(app: ResultsApp) -> None:
    """Topics are a storage contract: no Python module path may leak into stored events."""
    tenant = make_tenant(app, "A")
    app.complete_run(tenant.team, tenant.run, RUN_SUCCEEDED)
    app.request_backup_exclusion(tenant.team, tenant.plan, reason="r", ticket=None, actor="b")
    app.unlink_account(tenant.team, tenant.account, actor="b")
    notifications = stored_notifications(app)
    assert len(notifications) == app.head_position()
    topics = {n.topic for n in notifications}
    assert all(topic.startswith("resultsvc/") for topic in topics), topics
    assert topics == {
        "resultsvc/Team/Created",
        "resultsvc/ExternalIdClaim/Claimed",
        "resultsvc/CloudAccount/Linked",
        "resultsvc/CloudAccount/Unlinked",
        "resultsvc/Plan/Created",
        "resultsvc/Plan/BackupExclusionRequested",
        "resultsvc/PlanRun/Started",
        "resultsvc/PlanRun/BatchRecorded",
        "resultsvc/PlanRun/Ended",
        "resultsvc/ResultBatch/Recorded",
    }


# ------------------------------------------------------------- long runs


def test_a_long_run_loads_from_a_snapshot(
    app: ResultsApp, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appending batch 250 must not replay 249 markers: a cold load reads a snapshot and a tail."""
    tenant = make_tenant(app, "A")  # batch 1
    for _ in range(249):
        app.record_results(tenant.team, tenant.run, batch_of(2))
    run = app.get_run(tenant.team, tenant.run)
    assert (run.batches, run.total, run.version) == (250, 499, 251)

    assert app.snapshots is not None, "snapshotting must be enabled"
    snapshots = list(app.snapshots.get(tenant.run, desc=True, limit=1))
    assert snapshots and snapshots[0].originator_version >= 200
    [stored_snapshot] = app.snapshots.recorder.select_events(tenant.run, desc=True, limit=1)
    assert stored_snapshot.topic == "resultsvc/PlanRun/Snapshot"

    fresh = open_application(database_url)
    try:
        read: list[StoredEvent] = []
        select_events = fresh.recorder.select_events

        def counting(originator_id: Any, **kwargs: Any) -> Any:
            events = select_events(originator_id, **kwargs)
            if originator_id == tenant.run:
                read.extend(events)
            return events

        monkeypatch.setattr(fresh.recorder, "select_events", counting)
        loaded = fresh.get_run(tenant.team, tenant.run)
        assert (loaded.batches, loaded.total, loaded.status) == (250, 499, RUN_RUNNING)
        assert 0 < len(read) <= 100
        assert min(event.originator_version for event in read) > 100
        monkeypatch.undo()
        assert sum(1 for _ in fresh.run_results(tenant.team, tenant.run)) == 499
        # The fresh application keeps appending where the first one stopped.
        accepted = fresh.record_results(tenant.team, tenant.run, batch_of(1))
        assert (accepted.batch_no, accepted.position) == (251, fresh.head_position())
    finally:
        fresh.close()


def test_a_fresh_process_loads_an_aggregate_from_its_snapshot(tmp_path: Path) -> None:
    """A restarted service (a process that never wrote a snapshot) must read snapshots.

    eventsourcing registers a ``Snapshot`` class's explicit topic only when one
    is written; ``domain.model`` registers them at import. Found by bench/soak.py.
    """
    url = f"sqlite:///{tmp_path}/resultsvc.db"
    app = open_application(url)
    try:
        team, _ = app.create_team("snapshots")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/x", verified=False, actor="t"
        )
        plan, _ = app.create_plan(team.id, account.id, "p")
        run, _ = app.start_run(team.id, plan.id)
        for batch in batches(150, 1, seed=4):  # 150 run events: a snapshot at 100
            app.record_results(team.id, run.id, batch)
    finally:
        app.close()
    script = (
        "import sys; from uuid import UUID; from service.database import open_application\n"
        "app = open_application(sys.argv[1])\n"
        "print(app.get_run(UUID(sys.argv[2]), UUID(sys.argv[3])).total)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url, str(team.id), str(run.id)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "150"
