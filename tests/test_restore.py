"""Restoring backups: round trip, point in time, exclusions, refusals, the CLI.

The source is always an embedded (SQLite) store with its backups in a folder of
the test's own; the target of a restore is an empty SQLite file or an empty
PostgreSQL schema. What a restore must give back is checked aggregate by
aggregate with ``aggregate_digests`` (event count and a digest of versions,
topics and states), not just by counting rows, and the display views rebuilt
on the target are compared with the source's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

import retention.restore as restore_module
from domain.application import ResultsApp
from domain.model import ResultBatch
from projections.projector import Projector
from projections.queries import DisplayQueries
from retention.catalog import pack_key
from retention.exclusions import exclude_plan
from retention.reader import BackupUnreadable
from retention.restore import RestoreRefused, RestoreResult, aggregate_digests, restore
from retention.stores import FileStore
from service.backups import Backups
from service.database import open_application, view_database
from service.runtime import Runtime
from service.samples import batches
from service.settings import Settings

ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/Audit"
RESULTSVC = str(Path(sys.executable).parent / "resultsvc")

BATCH_RECORDED = "resultsvc/PlanRun/BatchRecorded"
RESULT_BATCH = "resultsvc/ResultBatch/Recorded"


# --------------------------------------------------------------------- helpers


@dataclass
class Source:
    """The live side: runtime (SQLite), backups in a folder, and the settings' environment."""

    runtime: Runtime
    backups: Backups
    env: dict[str, str]

    @property
    def app(self) -> ResultsApp:
        return self.runtime.app


@dataclass
class PlanData:
    team: UUID
    plan: UUID
    runs: list[UUID] = field(default_factory=list)
    batches: list[UUID] = field(default_factory=list)

    @property
    def ids(self) -> set[UUID]:
        """Every aggregate of the plan: the plan, its runs and their result batches."""
        return {self.plan, *self.runs, *self.batches}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Source]:
    env = {
        "RESULTSVC_DATABASE_URL": f"sqlite:///{tmp_path}/source.db",
        "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
        "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
    }
    runtime = Runtime.open(Settings.from_env(env))
    try:
        yield Source(runtime, Backups.open(runtime), env)
    finally:
        runtime.close()


@pytest.fixture
def open_target(tmp_path: Path) -> Iterator[Callable[[str], ResultsApp]]:
    """Opens target stores by URL; every one is closed at the end of the test."""
    opened: list[ResultsApp] = []

    def open_(url: str) -> ResultsApp:
        app = open_application(url)
        opened.append(app)
        return app

    yield open_
    for app in opened:
        app.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty target store: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/target.db"
    url: str = request.getfixturevalue("pg_url")
    return url


def team_and_account(app: ResultsApp) -> tuple[UUID, UUID]:
    team, _ = app.create_team(f"team-{uuid.uuid4().hex[:6]}")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=True, actor="test")
    return team.id, account.id


def add_run(
    app: ResultsApp,
    data: PlanData,
    *,
    batch_count: int = 3,
    size: int = 4,
    seed: int = 1,
    complete: bool = True,
) -> UUID:
    run, _ = app.start_run(data.team, data.plan)
    data.runs.append(run.id)
    for number, batch in enumerate(batches(batch_count * size, size, seed=seed), start=1):
        app.record_results(data.team, run.id, batch)
        data.batches.append(ResultBatch.create_id(run.id, number))
    if complete:
        app.complete_run(data.team, run.id, "succeeded")
    return run.id


def new_plan(app: ResultsApp, team: UUID, account: UUID, name: str, **run: Any) -> PlanData:
    plan, _ = app.create_plan(team, account, name)
    data = PlanData(team, plan.id)
    add_run(app, data, **run)
    return data


Row = tuple[int, UUID, int, str]


def log(app: ResultsApp, last: int | None = None) -> list[Row]:
    """(position, originator, version, topic) of every notification up to ``last``."""
    rows: list[Row] = []
    start, stop = 0, app.head_position() if last is None else last
    while start < stop:
        page = app.recorder.select_notifications(
            start=start, limit=500, stop=stop, inclusive_of_start=False
        )
        if not page:
            break
        rows.extend((n.id, UUID(str(n.originator_id)), n.originator_version, n.topic) for n in page)
        start = page[-1].id
    return rows


def digests_of_target(target: ResultsApp) -> dict[UUID, tuple[int, str]]:
    return aggregate_digests(target, up_to=target.head_position())


def rebuilt_views(app: ResultsApp, url: str) -> tuple[Projector, DisplayQueries]:
    projector = Projector(app, view_database(url))
    projector.ensure_schema()
    projector.catch_up()
    return projector, DisplayQueries(projector.db)


def all_results(queries: DisplayQueries, run: UUID) -> list[list[dict[str, Any]]]:
    """Every page of a run's results (small pages, so the cursors are exercised too)."""
    pages = []
    cursor = None
    while True:
        page = queries.list_results(None, str(run), cursor=cursor, limit=5)
        pages.append(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return pages


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(env)
    return subprocess.run(
        [RESULTSVC, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


@dataclass
class Chain:
    full: Any
    incremental: Any
    plans: list[PlanData]


def full_then_incremental(source: Source) -> Chain:
    """Two plans with runs, a full backup, more results (one run still open), an incremental."""
    app, writer = source.app, source.backups.writer
    team, account = team_and_account(app)
    nightly = new_plan(app, team, account, "nightly", seed=1)
    weekly = new_plan(app, team, account, "weekly", seed=2, batch_count=2)
    full = writer.run(full=True).info
    add_run(app, nightly, seed=3)
    add_run(app, weekly, seed=4, batch_count=2, complete=False)
    incremental = writer.run(full=False).info
    assert (incremental.kind, incremental.parent) == ("incremental", full.id)
    assert incremental.first_position == full.last_position + 1
    return Chain(full, incremental, [nightly, weekly])


# ----------------------------------------------------------------- 1. round trip


def test_restoring_a_chain_gives_back_the_log_and_the_views(
    source: Source, target_url: str, open_target: Callable[[str], ResultsApp]
) -> None:
    chain = full_then_incremental(source)
    app, backups = source.app, source.backups
    last = chain.incremental.last_position
    target = open_target(target_url)
    assert target.head_position() == 0

    result = restore(backups.reader, chain.incremental.id, target)

    assert isinstance(result, RestoreResult)
    assert result.chain == [chain.full.id, chain.incremental.id]
    assert result.events == len(log(app, last)) == last
    assert result.last_position == last
    assert result.unrecoverable_plans == set()
    assert target.head_position() == last
    expected = aggregate_digests(app, up_to=last)
    assert digests_of_target(target) == expected
    assert {ident for plan in chain.plans for ident in plan.ids} <= set(expected)
    # the log itself, not only per aggregate: same order, same versions and topics
    assert log(target) == log(app, last)

    source.runtime.projector.catch_up()
    projector, restored = rebuilt_views(target, target_url)
    try:
        live = source.runtime.queries
        runs = [run for plan in chain.plans for run in plan.runs]
        assert len(runs) == 4
        for run in runs:
            assert restored.get_run(None, str(run)) == live.get_run(None, str(run))
            pages = all_results(restored, run)
            assert pages == all_results(live, run)
            assert sum(len(page) for page in pages) == restored.get_run(None, str(run))["total"]
        still_open = restored.get_run(None, str(chain.plans[1].runs[-1]))
        assert still_open["finished_at"] is None and still_open["total"] == 2 * 4
        for plan in chain.plans:
            assert restored.get_plan(None, str(plan.plan)) == live.get_plan(None, str(plan.plan))
        assert set(restored.positions().values()) == {last}
    finally:
        projector.close()
        projector.db.close()


# --------------------------------------------------------------- 2. point in time


def test_a_point_in_time_restore_stops_exactly_at_the_position(
    source: Source, tmp_path: Path, open_target: Callable[[str], ResultsApp]
) -> None:
    chain = full_then_incremental(source)
    app, reader = source.app, source.backups.reader
    rows = log(app, chain.incremental.last_position)
    by_position = {row[0]: row for row in rows}
    markers = [row[0] for row in rows if row[3] == BATCH_RECORDED]
    first_run = chain.plans[0].runs[0]
    first_run_rows = [row[0] for row in rows if row[1] == first_run]
    middle_of_run = (first_run_rows[0] + first_run_rows[-1]) // 2
    assert first_run_rows[0] < middle_of_run < first_run_rows[-1]
    positions = {
        "a batch's marker (the batch itself is the next event)": markers[0],
        "a batch's own event": markers[0] + 1,
        "the middle of a run": middle_of_run,
        "the full's last position": chain.full.last_position,
        "the incremental's first position": chain.incremental.first_position,
        "the very first event": 1,
    }
    assert by_position[markers[0] + 1][3] == RESULT_BATCH

    for number, (what, until) in enumerate(positions.items()):
        target = open_target(f"sqlite:///{tmp_path}/pit-{number}.db")
        result = restore(reader, chain.incremental.id, target, until_position=until)
        assert result.last_position == until, what
        assert result.events == until, what
        assert target.head_position() == until, what
        assert log(target) == log(app, until), what
        assert digests_of_target(target) == aggregate_digests(app, up_to=until), what
        assert result.chain == [chain.full.id, chain.incremental.id], what
        if until == middle_of_run:  # the views show the run as it was then: open, partial
            projector, queries = rebuilt_views(target, f"sqlite:///{tmp_path}/pit-{number}.db")
            try:
                run = queries.get_run(None, str(first_run))
                restored_batches = [
                    row for row in log(app, until) if row[1] in chain.plans[0].batches
                ]
                assert run["finished_at"] is None
                assert run["total"] == 4 * len(restored_batches) > 0
            finally:
                projector.close()
                projector.db.close()

    # past the end: everything the chain holds, and no more
    past = open_target(f"sqlite:///{tmp_path}/past.db")
    last = chain.incremental.last_position
    result = restore(reader, chain.incremental.id, past, until_position=last + 1000)
    assert (result.last_position, result.events) == (last, last)
    assert digests_of_target(past) == aggregate_digests(app, up_to=last)

    # restoring the full alone stops at its own last position, whatever comes after it
    only_full = open_target(f"sqlite:///{tmp_path}/full.db")
    result = restore(reader, chain.full.id, only_full, until_position=last)
    assert result.chain == [chain.full.id]
    assert result.last_position == chain.full.last_position
    assert digests_of_target(only_full) == aggregate_digests(app, up_to=chain.full.last_position)


# ------------------------------------------------------------------ 3. exclusions


def test_a_plan_excluded_after_the_full_is_left_out_whole_and_the_rest_is_complete(
    source: Source, target_url: str, tmp_path: Path, open_target: Callable[[str], ResultsApp]
) -> None:
    app, backups = source.app, source.backups
    team, account = team_and_account(app)
    gone = new_plan(app, team, account, "excluded before the full", seed=9)
    exclude_plan(app, backups.keyring, team, gone.plan, reason="r", ticket=None, actor="dpo")
    a = new_plan(app, team, account, "A", seed=1)
    b = new_plan(app, team, account, "B", seed=2)
    full = backups.writer.run(full=True).info
    assert str(gone.plan) not in full.manifest["plans"]
    assert str(a.plan) in full.manifest["plans"]

    exclude_plan(app, backups.keyring, team, a.plan, reason="erase", ticket="T-1", actor="dpo")
    add_run(app, a, seed=3)  # results keep coming for both plans after the request
    add_run(app, b, seed=4)
    incremental = backups.writer.run(full=False).info
    last = incremental.last_position
    assert incremental.parent == full.id

    target = open_target(target_url)
    result = restore(backups.reader, incremental.id, target)

    assert result.unrecoverable_plans == {str(a.plan)}
    restored = digests_of_target(target)
    assert not (set(restored) & a.ids), "an event of the excluded plan A was restored"
    assert not (set(restored) & gone.ids), "a plan excluded before the full was restored"
    assert b.ids <= set(restored)
    # everything but A (and the plan excluded earlier) is there, event for event
    expected = aggregate_digests(app, up_to=last, leave_out=[a.plan, gone.plan])
    assert restored == expected
    assert result.events == sum(count for count, _ in expected.values())
    # nothing of A is left in the target's log either, not even events that name it
    for notification in target.recorder.select_notifications(start=0, limit=10_000):
        event: Any = target.mapper.to_domain_event(notification)
        assert getattr(event, "plan_id", None) not in (a.plan, gone.plan), notification.topic

    # the plan excluded before the full is simply not in the backup: not "unrecoverable"
    full_target = open_target(f"sqlite:///{tmp_path}/full-only.db")
    only_full = restore(backups.reader, full.id, full_target)
    assert only_full.unrecoverable_plans == {str(a.plan)}
    assert not (set(digests_of_target(full_target)) & (a.ids | gone.ids))
    assert digests_of_target(full_target) == aggregate_digests(
        app, up_to=full.last_position, leave_out=[a.plan, gone.plan]
    )


# ------------------------------------------------------------------- 4. refusals


def test_a_non_empty_target_is_refused_and_left_untouched(
    source: Source, target_url: str, open_target: Callable[[str], ResultsApp]
) -> None:
    chain = full_then_incremental(source)
    target = open_target(target_url)
    target.create_team("already here")
    head = target.head_position()
    before = digests_of_target(target)
    with pytest.raises(RestoreRefused, match="not empty"):
        restore(source.backups.reader, chain.incremental.id, target)
    assert target.head_position() == head
    assert digests_of_target(target) == before


def _damage_pack(source: Source, backup: Any) -> str:
    store = source.backups.store
    assert isinstance(store, FileStore)
    where = pack_key(backup.id, backup.manifest["packs"][0]["name"])
    path = store.path(where)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return where


def test_a_damaged_pack_fails_the_restore_naming_it_and_writes_nothing_if_first(
    source: Source, target_url: str, open_target: Callable[[str], ResultsApp]
) -> None:
    """The full's pack is damaged: the restore fails before anything is written.

    Each pack is checked whole (size, SHA-256) before any of its records is
    yielded, and nothing is inserted before ``BATCH`` records are pending, so a
    damaged first pack leaves the target empty (and restorable into later).
    """
    chain = full_then_incremental(source)
    where = _damage_pack(source, chain.full)
    target = open_target(target_url)
    with pytest.raises(BackupUnreadable, match="SHA-256") as raised:
        restore(source.backups.reader, chain.incremental.id, target)
    assert where in str(raised.value)
    assert target.head_position() == 0


def test_a_restore_that_fails_half_way_leaves_the_target_empty(
    source: Source, target_url: str, open_target: Callable[[str], ResultsApp]
) -> None:
    """The incremental's pack is damaged; the full before it holds more than ``BATCH`` records.

    The records of the full were already committed in batches when the damage
    shows: the restore empties the target again, so the operator can restore
    from an intact backup into the same database.
    """
    app, backups = source.app, source.backups
    team, account = team_and_account(app)
    big = new_plan(app, team, account, "big", batch_count=260, size=1)
    full = backups.writer.run(full=True).info
    assert full.last_position > restore_module.BATCH
    add_run(app, big, seed=2)
    incremental = backups.writer.run(full=False).info
    where = _damage_pack(source, incremental)
    target = open_target(target_url)
    with pytest.raises(BackupUnreadable, match="SHA-256") as raised:
        restore(backups.reader, incremental.id, target)
    assert where in str(raised.value)
    assert target.head_position() == 0, (
        f"{target.head_position()} events left in the target after the failed restore"
    )
    again = restore(backups.reader, full.id, target)
    assert again.last_position == full.last_position
    assert target.recorder.max_notification_id() is not None


# ------------------------------------------------------------------------ 5. CLI


def test_cli_restore_prints_counts_refuses_a_non_empty_target_and_stops_at_a_position(
    source: Source, tmp_path: Path
) -> None:
    chain = full_then_incremental(source)
    last = chain.incremental.last_position
    into = f"sqlite:///{tmp_path}/cli-target.db"

    done = run_cli(
        ["restore", "--backup", chain.incremental.id, "--into", into], tmp_path, source.env
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"restored {last} events of 2 backup(s) up to position {last}; views rebuilt;"
        " 0 plan(s) unrecoverable by design"
    ) in done.stdout

    again = run_cli(
        ["restore", "--backup", chain.incremental.id, "--into", into], tmp_path, source.env
    )
    assert again.returncode != 0
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1, again.stderr
    assert "not empty" in lines[0] and "Traceback" not in again.stderr

    at_five = f"sqlite:///{tmp_path}/cli-at-5.db"
    partial = run_cli(
        ["restore", "--backup", chain.incremental.id, "--into", at_five, "--until-position", "5"],
        tmp_path,
        source.env,
    )
    assert partial.returncode == 0, partial.stderr
    assert "restored 5 events of 2 backup(s) up to position 5;" in partial.stdout

    live = open_application(source.env["RESULTSVC_DATABASE_URL"])
    restored = open_application(into)
    five = open_application(at_five)
    try:
        assert digests_of_target(restored) == aggregate_digests(live, up_to=last)
        assert digests_of_target(five) == aggregate_digests(live, up_to=5)
        # the views were rebuilt by the command: every run is there with its totals
        queries = DisplayQueries(view_database(into))
        try:
            assert set(queries.positions().values()) == {last}
            for plan in chain.plans:
                for run in plan.runs:
                    assert queries.get_run(None, str(run))["total"] > 0
        finally:
            queries.db.close()
    finally:
        for app in (live, restored, five):
            app.close()
