"""Backups end to end: round trip, encryption, exclusions, Object Lock, retention, tamper, crash.

Every test runs the real writer, reader, keyring, sweeper and stores: a folder
and an S3 bucket with Object Lock on moto (HTTP, ``aws`` fixture). Clocks are
injected, so "a week later" or "31 days later" costs nothing. Where moto is
lax (see ``/work/shared/notes/moto-gaps.md``), what the objects end up with
is read back with ``head_object``, not taken from what was asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

import retention.backup as backup_module
import retention.stores as stores_module
from domain.application import ResultsApp
from domain.model import Backup, ResultBatch
from retention.catalog import manifest_key, pack_key
from retention.exclusions import exclude_plan, pending_shreds, shred_pending
from retention.format import Record, sign_manifest, unb64
from retention.keyring import Keyring, object_key
from retention.reader import BackupUnreadable
from retention.stores import FileStore, S3Store, StoreError
from retention.sweeper import sweep
from service.backups import Backups
from service.database import open_application
from service.runtime import Runtime
from service.samples import batches
from service.settings import Settings

REGION = "eu-west-1"
ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/Audit"
RESULTSVC = str(Path(sys.executable).parent / "resultsvc")


# --------------------------------------------------------------------- helpers


class Clock:
    """An injectable clock; starts at the real now (S3 refuses locks in the past)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Stack:
    runtime: Runtime
    backups: Backups
    clock: Clock
    settings: Settings
    env: dict[str, str]
    master_path: Path
    database_path: Path | None
    s3: Any = None  # a raw boto3 client, on S3 only

    @property
    def app(self) -> ResultsApp:
        return self.runtime.app


@dataclass
class PlanData:
    plan: UUID
    runs: list[UUID] = field(default_factory=list)
    batches: list[UUID] = field(default_factory=list)

    @property
    def ids(self) -> set[UUID]:
        """Every aggregate id that belongs to the plan: the plan, its runs, their batches."""
        return {self.plan, *self.runs, *self.batches}


def make_locked_bucket(client: Any) -> str:
    name = f"rs-backups-{uuid.uuid4().hex[:16]}"
    client.create_bucket(
        Bucket=name,
        CreateBucketConfiguration={"LocationConstraint": REGION},
        ObjectLockEnabledForBucket=True,
    )
    return name


@pytest.fixture
def s3(aws: str) -> Any:
    import boto3

    return boto3.client("s3")


StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Opens (runtime, backups) on a database and a store; everything is closed afterwards."""
    opened: list[Runtime] = []

    def make(
        store_url: str,
        *,
        database_url: str | None = None,
        retention: str = "5y",
        clock: Clock | None = None,
        master_path: Path | None = None,
        s3_client: Any = None,
    ) -> Stack:
        database_path = None
        if database_url is None:
            database_path = tmp_path / "resultsvc.db"
            database_url = f"sqlite:///{database_path}"
        elif database_url.startswith("sqlite:///"):
            database_path = Path(database_url.removeprefix("sqlite:///"))
        master_path = master_path or tmp_path / "master.key"
        env = {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": store_url,
            "RESULTSVC_MASTER_KEY": f"file://{master_path}",
            "RESULTSVC_BACKUP_RETENTION": retention,
        }
        settings = Settings.from_env(env)
        runtime = Runtime.open(settings)
        opened.append(runtime)
        clock = clock or Clock()
        backups = Backups.open(runtime, clock=clock)
        return Stack(runtime, backups, clock, settings, env, master_path, database_path, s3_client)

    yield make
    for runtime in opened:
        runtime.close()


def _store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    if kind == "file":
        return f"file://{tmp_path}/backups", None
    client = request.getfixturevalue("s3")
    return f"s3://{make_locked_bucket(client)}/prefix", client


@pytest.fixture(params=["file", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stack(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path, make_stack: StackFactory
) -> Stack:
    """(runtime, backups) on SQLite, over a folder and over an Object Lock bucket on moto."""
    url, client = _store_url(store_kind, request, tmp_path)
    return make_stack(url, s3_client=client)


@pytest.fixture
def file_stack(tmp_path: Path, make_stack: StackFactory) -> Stack:
    return make_stack(f"file://{tmp_path}/backups")


@pytest.fixture
def s3_stack(request: pytest.FixtureRequest, tmp_path: Path, make_stack: StackFactory) -> Stack:
    url, client = _store_url("s3", request, tmp_path)
    return make_stack(url, s3_client=client)


def team_and_account(app: ResultsApp) -> tuple[UUID, UUID]:
    team, _ = app.create_team(f"team-{uuid.uuid4().hex[:6]}")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=False, actor="test")
    return team.id, account.id


def add_run(
    app: ResultsApp,
    team: UUID,
    data: PlanData,
    *,
    batch_count: int = 2,
    size: int = 5,
    marker: str = "",
    seed: int = 1,
    message: Callable[[], str] | None = None,
) -> None:
    run, _ = app.start_run(team, data.plan)
    for number, batch in enumerate(batches(batch_count * size, size, seed=seed), start=1):
        for finding in batch:
            if message is not None:
                finding["message"] = message()
            elif marker:
                finding["message"] = f"{marker} {finding['message']}"
        app.record_results(team, run.id, batch)
        data.batches.append(ResultBatch.create_id(run.id, number))
    app.complete_run(team, run.id, "succeeded")
    data.runs.append(run.id)


def record_plan(
    app: ResultsApp, team: UUID, account: UUID, name: str, **run_options: Any
) -> PlanData:
    plan, _ = app.create_plan(team, account, name)
    data = PlanData(plan.id)
    add_run(app, team, data, **run_options)
    return data


Row = tuple[int, UUID, int, str, bytes]


def log_rows(
    app: ResultsApp, last: int | None = None, topics: list[str] | None = None
) -> list[Row]:
    """The event log's notifications (up to ``last``) as comparable tuples."""
    rows: list[Row] = []
    start = 0
    stop = app.head_position() if last is None else last
    while start < stop:
        page = app.recorder.select_notifications(
            start=start, limit=500, stop=stop, inclusive_of_start=False, topics=topics or ()
        )
        if not page:
            break
        rows.extend(
            (n.id, UUID(str(n.originator_id)), n.originator_version, n.topic, bytes(n.state))
            for n in page
        )
        start = page[-1].id
    return rows


def as_row(record: Record) -> Row:
    return (
        record.position,
        record.originator_id,
        record.originator_version,
        record.topic,
        bytes(record.state),
    )


def chain_rows(backups: Backups, backup_id: str) -> list[Row]:
    """Every record a restore of ``backup_id`` would replay: its full and whole chain."""
    members = backups.reader.chain(backup_id)
    return [as_row(record) for member in members for record in backups.reader.records(member.id)]


def decode(app: ResultsApp, record: Record) -> Any:
    return app.mapper.to_domain_event(
        StoredEvent(
            originator_id=record.originator_id,
            originator_version=record.originator_version,
            topic=record.topic,
            state=record.state,
        )
    )


def store_objects(stack: Stack) -> dict[str, bytes]:
    """Every byte the store holds: each file (temp files too), each S3 object version."""
    store = stack.backups.store
    found: dict[str, bytes] = {}
    if isinstance(store, FileStore):
        for folder, _dirs, files in os.walk(store.root):
            for name in files:
                path = Path(folder) / name
                found[str(path.relative_to(store.root))] = path.read_bytes()
        return found
    assert isinstance(store, S3Store)
    client = stack.s3
    for page in client.get_paginator("list_object_versions").paginate(Bucket=store.bucket):
        for version in page.get("Versions", []):
            body = client.get_object(
                Bucket=store.bucket, Key=version["Key"], VersionId=version["VersionId"]
            )["Body"].read()
            found[f"{version['Key']}@{version['VersionId']}"] = body
    return found


def key_versions(stack: Stack, key: str) -> list[dict[str, Any]]:
    """Every version and delete marker of exactly ``key`` in the bucket."""
    store = stack.backups.store
    assert isinstance(store, S3Store)
    full = store.full_key(key)
    answer = stack.s3.list_object_versions(Bucket=store.bucket, Prefix=full)
    entries = answer.get("Versions", []) + answer.get("DeleteMarkers", [])
    return [entry for entry in entries if entry["Key"] == full]


def key_gone_from_store(stack: Stack, plan: UUID) -> bool:
    store = stack.backups.store
    if isinstance(store, FileStore):
        return not store.path(object_key(plan)).exists()
    return key_versions(stack, object_key(plan)) == []


def cached_key_rows(stack: Stack) -> dict[str, str]:
    with stack.runtime.views.reading() as cur:
        rows = cur.fetchall("SELECT plan_id, wrapped FROM backup_plan_keys")
    return {str(plan): str(wrapped) for plan, wrapped in rows}


def database_bytes(stack: Stack) -> bytes:
    assert stack.database_path is not None
    parts = []
    for suffix in ("", "-wal", "-journal"):
        path = Path(f"{stack.database_path}{suffix}")
        if path.exists():
            parts.append(path.read_bytes())
    return b"".join(parts)


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(env or {})
    return subprocess.run(
        [RESULTSVC, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------- 1. full + incremental


def test_full_and_incremental_round_trip_reproduce_the_log(
    database_url: str,
    store_kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_stack: StackFactory,
) -> None:
    url, client = _store_url(store_kind, request, tmp_path)
    stack = make_stack(url, database_url=database_url, s3_client=client)
    app, backups = stack.app, stack.backups
    team, account = team_and_account(app)
    first = record_plan(app, team, account, "nightly")
    head_at_full = app.head_position()

    full = backups.writer.run(full=True).info
    assert (full.kind, full.parent, full.chain) == ("full", None, [])
    assert (full.first_position, full.last_position) == (1, head_at_full)
    assert full.events == head_at_full

    stack.clock.advance(hours=1)
    record_plan(app, team, account, "weekly", seed=2)
    add_run(app, team, first, seed=3)
    head_at_incremental = app.head_position()
    incremental = backups.writer.run().info
    assert incremental.kind == "incremental"
    assert incremental.parent == full.id
    assert incremental.chain == [full.id]
    assert incremental.first_position == full.last_position + 1
    assert incremental.last_position == head_at_incremental
    assert incremental.expires_at == full.expires_at

    for backup_id in (full.id, incremental.id):
        report = backups.reader.verify(backup_id)
        assert report.ok, report.problems
        assert report.unrecoverable_plans == set()
    assert backups.reader.verify(incremental.id).chain == [full.id, incremental.id]

    # Everything a restore replays is the log itself, byte for byte, in order.
    expected = log_rows(app, last=incremental.last_position)
    assert chain_rows(backups, incremental.id) == expected
    assert chain_rows(backups, full.id) == [row for row in expected if row[0] <= full.last_position]
    assert [b.id for b in backups.catalog.all()] == [full.id, incremental.id]


def test_an_incremental_with_nothing_new_holds_only_the_last_backups_own_record(
    stack: Stack,
) -> None:
    """Taking a backup appends ``Backup/Completed``; the next incremental holds just that."""
    app, backups = stack.app, stack.backups
    team, account = team_and_account(app)
    record_plan(app, team, account, "p")
    full = backups.writer.run().info
    stack.clock.advance(seconds=5)
    empty = backups.writer.run().info
    assert (empty.kind, empty.parent, empty.events) == ("incremental", full.id, 1)
    assert empty.first_position == empty.last_position == full.last_position + 1
    (record,) = list(backups.reader.records(empty.id))
    assert record.topic == "resultsvc/Backup/Completed"
    assert record.originator_id == Backup.create_id(full.id)
    assert backups.reader.verify(empty.id).ok


def test_full_is_forced_on_request_and_taken_weekly(stack: Stack) -> None:
    app, backups, clock = stack.app, stack.backups, stack.clock
    team, account = team_and_account(app)
    record_plan(app, team, account, "p")
    assert backups.writer.plan() == ("full", None)  # nothing yet
    first = backups.writer.run().info
    assert first.kind == "full"

    clock.advance(days=1)
    kind, parent = backups.writer.plan()
    assert (kind, parent.id if parent else None) == ("incremental", first.id)
    assert backups.writer.plan(full=True) == ("full", None)
    forced = backups.writer.run(full=True).info
    assert (forced.kind, forced.parent, forced.first_position) == ("full", None, 1)
    assert forced.expires_at > first.expires_at  # a chain of its own

    clock.advance(days=6)
    kind, parent = backups.writer.plan()
    assert (kind, parent.id if parent else None) == ("incremental", forced.id)
    clock.advance(days=2)  # the chain's full is 8 days old
    assert backups.writer.plan() == ("full", None)
    kind, parent = backups.writer.plan(full=False)  # an explicit incremental is still possible
    assert (kind, parent.id if parent else None) == ("incremental", forced.id)
    weekly = backups.writer.run().info
    assert (weekly.kind, weekly.parent) == ("full", None)


def test_every_incremental_follows_the_latest_backup_even_within_one_second(
    file_stack: Stack,
) -> None:
    app, backups = file_stack.app, file_stack.backups
    team, account = team_and_account(app)
    record_plan(app, team, account, "p")
    taken = [backups.writer.run(full=True).info]
    for _ in range(9):  # all in the same second; the chance of passing by luck is 1/9!
        taken.append(backups.writer.run().info)
    assert [b.parent for b in taken[1:]] == [b.id for b in taken[:-1]]
    assert backups.catalog.ids() == [b.id for b in taken]


# ---------------------------------------------------------------- 2. encryption


def test_nothing_readable_reaches_the_store_and_no_key_reaches_the_database(
    stack: Stack,
) -> None:
    app, backups = stack.app, stack.backups
    marker = f"needle-{uuid.uuid4().hex}"
    team, account = team_and_account(app)
    plan = record_plan(app, team, account, f"plan {marker}", marker=marker)
    full = backups.writer.run().info
    stack.clock.advance(hours=1)
    add_run(app, team, plan, marker=marker, seed=9)
    incremental = backups.writer.run().info

    # The records do carry the marker once decrypted: the scan below could find it.
    messages = [
        finding["message"]
        for record in backups.reader.records(incremental.id)
        if record.topic == "resultsvc/ResultBatch/Recorded"
        for finding in decode(app, record).results
    ]
    assert messages and all(marker in message for message in messages)

    objects = store_objects(stack)
    assert any(full.id in key for key in objects) and any(incremental.id in key for key in objects)
    assert any("keyring/plans/" in key for key in objects)
    needles: dict[str, bytes] = {"marker": marker.encode()}
    master = stack.master_path.read_bytes()
    assert len(master) == 32
    needles["master key"] = master
    needles["master key (hex)"] = master.hex().encode()
    plan_key = backups.keyring.key_for_reading(plan.plan)
    assert plan_key is not None and len(plan_key) == 32
    needles["plan key"] = plan_key
    for info in (full, incremental):
        data_key = backups.master.unwrap(
            unb64(info.manifest["wrapped_data_key"]), {"backup": info.id}
        )
        needles[f"data key of {info.id}"] = data_key
    # Stored event states are zstd frames: a slice of each must not show up verbatim.
    for row in log_rows(app, last=incremental.last_position):
        state = row[4]
        if len(state) >= 64:
            needles[f"state of position {row[0]}"] = state[len(state) // 2 : len(state) // 2 + 24]
    for key, data in objects.items():
        for name, needle in needles.items():
            assert needle not in data, f"{name} found in {key}"

    # The database holds plan keys only wrapped, and never the master key.
    cached = cached_key_rows(stack)
    assert set(cached) == {str(plan.plan)}
    assert unb64(cached[str(plan.plan)]) != plan_key
    assert (
        backups.master.unwrap(
            unb64(cached[str(plan.plan)]), {"purpose": "plan-key", "plan": str(plan.plan)}
        )
        == plan_key
    )
    database = database_bytes(stack)
    assert len(database) > 0
    for name in ("master key", "master key (hex)", "plan key"):
        assert needles[name] not in database, f"{name} found in the database"


# ----------------------------------------------------------------- 3. exclusion


def _records_of(backups: Backups, backup_id: str) -> list[Record]:
    return list(backups.reader.records(backup_id))


def _assert_holds_nothing_of(app: ResultsApp, records: list[Record], plan: PlanData) -> None:
    for record in records:
        assert record.originator_id not in plan.ids, (record.position, record.topic)
        event = decode(app, record)
        assert getattr(event, "plan_id", None) != plan.plan, (record.position, record.topic)


def test_an_excluded_plan_leaves_every_later_backup_and_becomes_unreadable_in_older_ones(
    stack: Stack,
) -> None:
    app, backups, clock = stack.app, stack.backups, stack.clock
    team, account = team_and_account(app)
    a = record_plan(app, team, account, "plan A", seed=1)
    b = record_plan(app, team, account, "plan B", seed=2)
    first = backups.writer.run().info
    b_at_first = set(b.ids)
    assert first.manifest["plans"] == sorted([str(a.plan), str(b.plan)])
    assert not key_gone_from_store(stack, a.plan)
    assert str(a.plan) in cached_key_rows(stack)

    clock.advance(hours=1)
    done = exclude_plan(
        app, backups.keyring, team, a.plan, reason="customer request", ticket="T-1", actor="dpo"
    )
    assert done.copies_destroyed == 2  # the database cache row and the keyring object
    # results keep coming after the request, for both plans
    add_run(app, team, a, seed=3)
    add_run(app, team, b, seed=4)
    second = backups.writer.run().info
    clock.advance(hours=1)
    third = backups.writer.run(full=True).info
    assert (second.kind, second.parent, third.kind) == ("incremental", first.id, "full")

    for info in (second, third):
        records = _records_of(backups, info.id)
        _assert_holds_nothing_of(app, records, a)
        assert info.excluded_plans == [str(a.plan)]
        assert info.manifest["plans"] == [str(b.plan)]
        assert info.manifest["stats"]["skipped_excluded"] > 0
        assert {r.originator_id for r in records} & set(b.runs), "B's results are kept"
        report = backups.reader.verify(info.id)
        assert report.ok and report.unrecoverable_plans == set(), report.problems
    # the new full holds everything but A: exactly the log without A's events
    full_rows = [as_row(r) for r in _records_of(backups, third.id)]
    log_without_a = [row for row in log_rows(app, last=third.last_position) if row[1] not in a.ids]
    assert full_rows == log_without_a

    # The backup taken before the request still verifies; A's part is gone for good.
    report = backups.reader.verify(first.id)
    assert report.ok, report.problems
    assert report.unrecoverable_plans == {str(a.plan)}
    readable = _records_of(backups, first.id)
    _assert_holds_nothing_of(app, readable, a)
    assert b_at_first <= {r.originator_id for r in readable}
    fresh = Keyring(backups.store, backups.master, stack.runtime.views)
    assert fresh.key_for_reading(a.plan) is None
    assert fresh.key_for_reading(b.plan) is not None

    # A's key is destroyed everywhere, every version of it.
    assert key_gone_from_store(stack, a.plan)
    assert str(a.plan) not in cached_key_rows(stack)
    assert str(b.plan) in cached_key_rows(stack)

    requested = log_rows(app, topics=["resultsvc/Plan/BackupExclusionRequested"])
    shredded = log_rows(app, topics=["resultsvc/Plan/BackupKeyShredded"])
    assert [(row[0], row[1]) for row in requested] == [(done.requested_at_position, a.plan)]
    assert [(row[0], row[1]) for row in shredded] == [(done.shredded_at_position, a.plan)]
    assert pending_shreds(app) == []


def test_a_shred_that_failed_after_the_request_is_pending_and_finished_later(
    stack: Stack,
) -> None:
    app, backups, clock = stack.app, stack.backups, stack.clock
    team, account = team_and_account(app)
    c = record_plan(app, team, account, "plan C")
    d = record_plan(app, team, account, "plan D", seed=2)
    before = backups.writer.run().info
    clock.advance(hours=1)

    # the request is recorded, then the process dies before shredding
    app.request_backup_exclusion(team, c.plan, reason="erase", ticket=None, actor="dpo")
    assert pending_shreds(app) == [c.plan]
    assert not key_gone_from_store(stack, c.plan)
    meanwhile = backups.writer.run().info  # already leaves C out
    assert meanwhile.excluded_plans == [str(c.plan)]
    _assert_holds_nothing_of(app, _records_of(backups, meanwhile.id), c)

    assert shred_pending(app, backups.keyring, actor="scheduler") == [c.plan]
    assert pending_shreds(app) == []
    assert shred_pending(app, backups.keyring, actor="scheduler") == []
    assert key_gone_from_store(stack, c.plan)
    assert set(cached_key_rows(stack)) == {str(d.plan)}
    shredded = log_rows(app, topics=["resultsvc/Plan/BackupKeyShredded"])
    assert [row[1] for row in shredded] == [c.plan]
    report = backups.reader.verify(before.id)
    assert report.ok and report.unrecoverable_plans == {str(c.plan)}, report.problems


def test_an_exclusion_during_a_running_backup_stays_effective(file_stack: Stack) -> None:
    app, backups, clock = file_stack.app, file_stack.backups, file_stack.clock
    team, account = team_and_account(app)
    a = record_plan(app, team, account, "plan A")
    older = backups.writer.run().info
    clock.advance(hours=1)
    add_run(app, team, a, seed=5)
    done: list[Any] = []

    def request_exclusion_meanwhile(position: int) -> None:
        # an API request arrives while the backup streams (before it reached A's events)
        if not done:
            done.append(
                exclude_plan(app, backups.keyring, team, a.plan, reason="r", ticket=None, actor="x")
            )

    racing = backups.writer.run(progress=request_exclusion_meanwhile).info
    assert done and pending_shreds(app) == []
    assert key_gone_from_store(file_stack, a.plan), "the shredded key came back"
    assert str(a.plan) not in cached_key_rows(file_stack)
    report = backups.reader.verify(older.id)
    assert report.ok and report.unrecoverable_plans == {str(a.plan)}, report.problems
    assert str(a.plan) not in racing.manifest["plans"]


def test_a_plan_key_cached_in_the_database_is_always_in_the_store_too(
    file_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, backups, clock = file_stack.app, file_stack.backups, file_stack.clock
    team, account = team_and_account(app)
    plan = record_plan(app, team, account, "p")
    store = backups.store
    real_put = store.put

    def put_failing_for_keys(key: str, data: bytes, **kwargs: Any) -> Any:
        if key.startswith("keyring/"):
            raise StoreError(f"put {key}: ServiceUnavailable")
        return real_put(key, data, **kwargs)

    monkeypatch.setattr(store, "put", put_failing_for_keys)
    with pytest.raises(Exception, match="ServiceUnavailable"):
        backups.writer.run()
    monkeypatch.setattr(store, "put", real_put)
    clock.advance(minutes=5)
    taken = backups.writer.run().info  # the store is back

    assert str(plan.plan) in cached_key_rows(file_stack)
    assert not key_gone_from_store(file_stack, plan.plan), "keyring object never written"
    # what a restore onto a fresh database would see: the keyring in the store only
    fresh = Backups.open(file_stack.runtime, clock=clock)
    with file_stack.runtime.views.writing() as cur:
        cur.execute("DELETE FROM backup_plan_keys")
    report = fresh.reader.verify(taken.id)
    assert report.ok and report.unrecoverable_plans == set(), report


# ---------------------------------------------------------------- 4. Object Lock


def _head(stack: Stack, key: str, version: str) -> dict[str, Any]:
    store = stack.backups.store
    assert isinstance(store, S3Store)
    answer: dict[str, Any] = stack.s3.head_object(Bucket=store.bucket, Key=key, VersionId=version)
    return answer


def test_every_backup_object_is_locked_until_its_chain_expires_and_the_keyring_is_not(
    s3_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = s3_stack
    app, backups, clock = stack.app, stack.backups, stack.clock
    store = backups.store
    assert isinstance(store, S3Store) and store.object_lock
    # Multipart packs: 5 MiB parts (the S3 minimum) and ~13 MB of incompressible findings;
    # a pack closes after 6 MiB, so there is a multipart pack and a smaller one after it.
    monkeypatch.setattr(stores_module, "PART_SIZE", 5 * 1024 * 1024)
    monkeypatch.setattr(backup_module, "PACK_BYTES", 6 * 1024 * 1024)
    team, account = team_and_account(app)
    big = record_plan(
        app,
        team,
        account,
        "big",
        batch_count=8,  # batches of ~1.6 MB: under the 2 MiB batch limit
        size=400,
        message=lambda: secrets.token_urlsafe(3000),
    )
    full = backups.writer.run().info
    clock.advance(hours=2)
    add_run(app, team, big, batch_count=1, size=5, seed=8)
    incremental = backups.writer.run().info
    assert incremental.expires_at == full.expires_at
    assert full.expires_at.microsecond == 0
    assert len(full.manifest["packs"]) >= 2

    prefix = store.full_key("backups") + "/"
    versions: list[dict[str, Any]] = []
    for page in stack.s3.get_paginator("list_object_versions").paginate(
        Bucket=store.bucket, Prefix=prefix
    ):
        versions.extend(page.get("Versions", []))
    expected_keys = {store.full_key(manifest_key(info.id)) for info in (full, incremental)} | {
        store.full_key(pack_key(info.id, pack["name"]))
        for info in (full, incremental)
        for pack in info.manifest["packs"]
    }
    assert {v["Key"] for v in versions} == expected_keys
    multipart = 0
    for version in versions:
        head = _head(stack, version["Key"], version["VersionId"])
        assert head.get("ObjectLockMode") == "COMPLIANCE", version["Key"]
        until = head["ObjectLockRetainUntilDate"].astimezone(UTC)
        assert until == full.expires_at, (version["Key"], until, full.expires_at)
        multipart += "-" in head["ETag"].strip('"')
    assert multipart >= 1, "no pack went up as a multipart upload"
    assert stack.s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []

    keyring_key = store.full_key(object_key(big.plan))
    (entry,) = key_versions(stack, object_key(big.plan))
    head = _head(stack, keyring_key, entry["VersionId"])
    assert "ObjectLockMode" not in head and "ObjectLockRetainUntilDate" not in head

    # Nobody deletes a backup early, not even through the store.
    first_pack = pack_key(full.id, full.manifest["packs"][0]["name"])
    with pytest.raises(StoreError, match="locked"):
        store.delete(first_pack)
    with pytest.raises(StoreError, match="locked"):
        store.delete(manifest_key(full.id))
    assert backups.reader.verify(incremental.id).ok


# ----------------------------------------------------------------- 5. retention


def test_retention_sweep_deletes_expired_chains_as_a_whole(
    tmp_path: Path, make_stack: StackFactory
) -> None:
    clock = Clock(datetime(2026, 1, 5, 2, 0, tzinfo=UTC))
    stack = make_stack(f"file://{tmp_path}/backups", retention="30d", clock=clock)
    app, backups = stack.app, stack.backups
    store = backups.store
    assert isinstance(store, FileStore)
    team, account = team_and_account(app)
    plan = record_plan(app, team, account, "p")
    day0 = clock.now

    taken = []
    for day, seed in ((0, 1), (1, 2), (8, 3), (9, 4)):
        clock.now = day0 + timedelta(days=day)
        add_run(app, team, plan, seed=seed)
        taken.append(backups.writer.run().info)
    full1, incr1, full2, incr2 = taken
    assert [b.kind for b in taken] == ["full", "incremental", "full", "incremental"]
    assert (incr1.parent, incr2.parent) == (full1.id, full2.id)
    assert full1.expires_at == incr1.expires_at == day0 + timedelta(days=30)
    assert full2.expires_at == incr2.expires_at == day0 + timedelta(days=38)

    def folder(info: Any) -> list[str]:
        return store.list(f"backups/{info.id}/")

    before = {info.id: folder(info) for info in taken}
    assert all(before.values())
    head = app.head_position()

    day31 = day0 + timedelta(days=31)
    dry = sweep(app, store, day31, dry_run=True)
    assert (dry.expired, dry.kept, dry.problems) == ([full1.id, incr1.id], [full2.id, incr2.id], [])
    assert {info.id: folder(info) for info in taken} == before
    assert app.head_position() == head, "a dry run records nothing"

    # a sweep before anything expired deletes nothing either
    early = sweep(app, store, day0 + timedelta(days=29))
    assert early.expired == [] and len(early.kept) == 4
    assert {info.id: folder(info) for info in taken} == before

    report = sweep(app, store, day31)
    assert report.expired == [full1.id, incr1.id]
    assert report.kept == [full2.id, incr2.id]
    assert report.problems == []
    assert folder(full1) == [] and folder(incr1) == []
    assert folder(full2) == before[full2.id] and folder(incr2) == before[incr2.id]
    assert backups.catalog.ids() == [full2.id, incr2.id]
    assert backups.reader.verify(incr2.id).ok

    sweeps = log_rows(app, topics=["resultsvc/RetentionSweep/Created"])
    assert len(sweeps) == 2  # the early one and this one; the dry run is not recorded
    event = app.mapper.to_domain_event(StoredEvent(*sweeps[-1][1:]))
    assert event.deleted == [full1.id, incr1.id] and event.kept == 2
    deleted = log_rows(app, topics=["resultsvc/Backup/Deleted"])
    assert {row[1] for row in deleted} == {Backup.create_id(full1.id), Backup.create_id(incr1.id)}

    # the surviving chain's full is 23 days old: the next backup starts a new chain
    clock.now = day31
    assert backups.writer.plan() == ("full", None)  # full2 is 23 days old


def test_a_sweep_cannot_delete_locked_backups_on_s3_and_says_so(
    request: pytest.FixtureRequest, tmp_path: Path, make_stack: StackFactory
) -> None:
    url, client = _store_url("s3", request, tmp_path)
    stack = make_stack(url, retention="1d", s3_client=client)
    app, backups = stack.app, stack.backups
    team, account = team_and_account(app)
    record_plan(app, team, account, "p")
    taken = backups.writer.run().info
    objects = sorted(backups.store.list(f"backups/{taken.id}/"))

    future = datetime.now(UTC) + timedelta(days=400)  # the sweeper's clock is wrong
    report = sweep(app, backups.store, future)
    assert report.expired == [taken.id]
    assert len(report.problems) == 1
    assert report.problems[0].startswith(taken.id) and "locked" in report.problems[0]
    assert sorted(backups.store.list(f"backups/{taken.id}/")) == objects
    assert backups.catalog.ids() == [taken.id]
    assert backups.reader.verify(taken.id).ok
    assert log_rows(app, topics=["resultsvc/Backup/Deleted"]) == []
    (recorded,) = log_rows(app, topics=["resultsvc/RetentionSweep/Created"])
    assert app.mapper.to_domain_event(StoredEvent(*recorded[1:])).deleted == []


def test_a_sweep_during_a_backup_leaves_the_running_backup_alone(
    file_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, backups = file_stack.app, file_stack.backups
    monkeypatch.setattr(backup_module, "PACK_BYTES", 1)  # every blob closes its pack
    team, account = team_and_account(app)
    record_plan(app, team, account, "A")
    record_plan(app, team, account, "B", seed=2)
    swept: list[Any] = []

    def sweep_meanwhile(position: int) -> None:
        if position > 8 and not swept:  # the first packs are closed by now
            swept.append(sweep(app, backups.store, datetime.now(UTC)))

    taken = backups.writer.run(progress=sweep_meanwhile).info
    assert swept
    report = backups.reader.verify(taken.id)
    assert report.ok, report.problems


# --------------------------------------------------------- 6. tamper, wrong key


def _small_backup(stack: Stack) -> Any:
    app = stack.app
    team, account = team_and_account(app)
    record_plan(app, team, account, "A")
    record_plan(app, team, account, "B", seed=2)
    info = stack.backups.writer.run().info
    assert len(info.manifest["blobs"]) >= 3
    assert stack.backups.reader.verify(info.id).ok
    return info


def _pack_path(stack: Stack, info: Any) -> Path:
    store = stack.backups.store
    assert isinstance(store, FileStore)
    return store.path(pack_key(info.id, info.manifest["packs"][0]["name"]))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "master key"])
def test_damage_fails_verification_with_a_precise_reason(
    damage: str, file_stack: Stack, tmp_path: Path, make_stack: StackFactory
) -> None:
    stack = file_stack
    info = _small_backup(stack)
    pack = _pack_path(stack, info)
    pack_name = f"backups/{info.id}/pack-000000.rbp"
    size = pack.stat().st_size
    reader = stack.backups.reader
    if damage == "flip":
        _flip(pack, size // 2)
        expected = [pack_name, "SHA-256 does not match"]
    elif damage == "truncate":
        pack.write_bytes(pack.read_bytes()[:-10])
        expected = [pack_name, f"{size - 10} bytes, the manifest says {size}"]
    elif damage == "delete":
        pack.unlink()
        expected = [pack_name, "is missing"]
    elif damage == "manifest":
        path = stack.backups.store.path(manifest_key(info.id))
        document = json.loads(path.read_bytes())
        document["last_position"] += 1
        path.write_text(json.dumps(document))
        expected = [manifest_key(info.id), "manifest authentication failed"]
    else:
        other = make_stack(
            stack.env["RESULTSVC_BACKUP_URL"], master_path=tmp_path / "other" / "master.key"
        )
        other.backups.master.ref  # noqa: B018 - makes the other key file
        reader = other.backups.reader
        expected = [manifest_key(info.id), "cannot unwrap the data key"]
    report = reader.verify(info.id)  # never raises
    assert not report.ok
    assert len(report.problems) == 1
    for needle in expected:
        assert needle in report.problems[0], report.problems[0]
    with pytest.raises(BackupUnreadable):
        list(reader.records(info.id))


def test_a_blob_altered_behind_a_re_signed_manifest_is_named_by_its_tag(file_stack: Stack) -> None:
    """Even someone holding the master key who re-signs the manifest cannot alter a blob."""
    stack = file_stack
    info = _small_backup(stack)
    backups = stack.backups
    pack = _pack_path(stack, info)
    index = 1
    blob = info.manifest["blobs"][index]
    _flip(pack, blob["offset"] + blob["length"] // 2)

    data_key = backups.master.unwrap(unb64(info.manifest["wrapped_data_key"]), {"backup": info.id})
    document = dict(info.manifest)
    document["packs"] = [
        {**document["packs"][0], "sha256": hashlib.sha256(pack.read_bytes()).hexdigest()}
    ]
    backups.store.put(manifest_key(info.id), json.dumps(sign_manifest(document, data_key)).encode())
    report = backups.reader.verify(info.id)
    assert not report.ok
    (problem,) = report.problems
    assert f"backups/{info.id}/pack-000000.rbp blob {index} " in problem
    assert "authentication failed" in problem


def test_cli_verify_fails_in_one_line(file_stack: Stack, tmp_path: Path) -> None:
    stack = file_stack
    info = _small_backup(stack)
    ok = run_cli(["backup", "verify", info.id], tmp_path, stack.env)
    assert ok.returncode == 0, ok.stderr
    assert f"backup {info.id}: OK" in ok.stdout
    _flip(_pack_path(stack, info), 5)
    result = run_cli(["backup", "verify", info.id], tmp_path, stack.env)
    assert_one_line_failure(result, f"backups/{info.id}/pack-000000.rbp", "SHA-256")
    missing = run_cli(["backup", "verify", "20200101T000000Z-00000000"], tmp_path, stack.env)
    assert_one_line_failure(missing, "no such complete backup")


def test_an_altered_keyring_object_is_a_verification_problem_not_a_crash(
    file_stack: Stack,
) -> None:
    stack = file_stack
    app, backups = stack.app, stack.backups
    team, account = team_and_account(app)
    a = record_plan(app, team, account, "A")
    b = record_plan(app, team, account, "B", seed=2)
    info = backups.writer.run().info
    store = backups.store
    # A's keyring object now holds B's wrapped key; the database is a fresh one (restore)
    store.put(object_key(a.plan), store.get(object_key(b.plan)))
    with stack.runtime.views.writing() as cur:
        cur.execute("DELETE FROM backup_plan_keys")
    reader = Backups.open(stack.runtime, clock=stack.clock).reader
    report = reader.verify(info.id)
    assert not report.ok
    assert str(a.plan) in report.problems[0]


# ------------------------------------------------------------ 7. crash half-way


def test_a_backup_killed_half_way_is_never_listed_and_the_next_one_works(
    tmp_path: Path, make_stack: StackFactory
) -> None:
    stack = make_stack(f"file://{tmp_path}/backups")
    app = stack.app
    team, account = team_and_account(app)
    for number in range(300):  # each new plan key costs fsyncs: the backup takes a while
        plan, _ = app.create_plan(team, account, f"plan-{number}")
        run, _ = app.start_run(team, plan.id)
        app.record_results(team, run.id, next(batches(2, 2, seed=number)))
    store = stack.backups.store
    assert isinstance(store, FileStore)
    folder = store.root / "backups"

    def temp_packs() -> list[Path]:
        return list(folder.glob("*/.tmp-*-pack-*")) if folder.exists() else []

    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(stack.env)
    process = subprocess.Popen(
        [RESULTSVC, "backup", "run", "--full"],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(6000):  # at most ~30 s
            if temp_packs():
                break
            try:
                process.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the backup finished (exit {process.returncode}) before it was killed")
        else:
            pytest.fail("no pack was ever started")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    listed = run_cli(["backup", "list", "--json"], tmp_path, stack.env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["backups"] == []
    assert stack.backups.catalog.ids() == []
    orphans = stack.backups.catalog.prefixes()
    assert len(orphans) <= 1  # the half-written folder, if a pack was complete
    assert temp_packs(), "the killed writer's temp file is still there"
    assert log_rows(app, topics=["resultsvc/Backup/Completed"]) == []

    # The next backup works and verifies, whatever the killed one left behind.
    stack.clock.advance(minutes=1)
    taken = stack.backups.writer.run().info
    assert taken.kind == "full"
    report = stack.backups.reader.verify(taken.id)
    assert report.ok, report.problems
    assert [as_row(r) for r in stack.backups.reader.records(taken.id)] == log_rows(
        app, last=taken.last_position
    )

    # Cleaning up: temp files by abort_incomplete, folders without a manifest by the sweep.
    assert store.abort_incomplete("backups/") >= 1
    assert temp_packs() == []
    report_sweep = sweep(app, store, stack.clock())
    assert set(report_sweep.orphans_removed) == orphans
    assert stack.backups.catalog.prefixes() == {taken.id}
    assert stack.backups.catalog.ids() == [taken.id]


# ------------------------------------------------------ 8. the CLI, embedded


def test_cli_round_trip_on_the_embedded_default(tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        result = run_cli(list(args), tmp_path)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.stdout

    demo = json.loads(ok("demo", "--json"))
    assert (tmp_path / "var" / "resultsvc.db").is_file()
    # two more plans, recorded straight into the embedded store
    app = open_application(f"sqlite:///{tmp_path}/var/resultsvc.db")
    try:
        team, account = UUID(demo["team"]["id"]), UUID(demo["account"]["id"])
        keep = record_plan(app, team, account, "extra-keep").plan
        drop = str(record_plan(app, team, account, "extra-drop", seed=2).plan)
    finally:
        app.close()
    already = {e["plan_id"] for e in json.loads(ok("exclusions", "list", "--json"))}
    assert str(keep) not in already and drop not in already

    first = json.loads(ok("backup", "run", "--full", "--json"))
    assert (first["kind"], first["parent"], first["first_position"]) == ("full", None, 1)
    excluded = ok("exclusions", "request", drop, "--reason", "r", "--ticket", "T")
    assert f"plan {drop} excluded from backups" in excluded
    exclusions = {e["plan_id"]: e for e in json.loads(ok("exclusions", "list", "--json"))}
    assert set(exclusions) == already | {drop}
    assert (exclusions[drop]["ticket"], exclusions[drop]["reason"]) == ("T", "r")
    second = json.loads(ok("backup", "run", "--json"))
    assert (second["kind"], second["parent"]) == ("incremental", first["id"])
    # it holds what came after the first: the first's record, and the drop's request and
    # shredding, which are left out
    assert (second["events"], second["skipped_excluded"]) == (1, 2)

    listed = json.loads(ok("backup", "list", "--json"))
    rows = {row["id"]: row for row in listed["backups"]}
    assert {first["id"], second["id"]} <= set(rows)
    assert rows[first["id"]]["excluded_plans"] == len(already)
    assert rows[second["id"]]["excluded_plans"] == len(already) + 1
    assert rows[second["id"]]["parent"] == first["id"]

    for backup_id in (first["id"], second["id"]):
        report = json.loads(ok("backup", "verify", backup_id, "--json"))
        assert report["ok"] is True and report["problems"] == []
    report = json.loads(ok("backup", "verify", first["id"], "--json"))
    assert report["unrecoverable_by_design"] == [drop]
    assert "would delete 0 backup(s)" in ok("retention", "sweep", "--dry-run")

    rotated = ok("keys", "rotate")
    assert "master key rotated" in rotated
    rewrapped = int(rotated.rsplit(";", 1)[1].split()[0])
    demo_plans = set(demo["plans"].values())
    assert rewrapped == len(demo_plans - already) + 1  # every plan key still kept, keep's too
    assert len(list((tmp_path / "var").glob("master.key.*.retired"))) == 1
    for backup_id in (first["id"], second["id"]):
        assert json.loads(ok("backup", "verify", backup_id, "--json"))["ok"] is True
    third = json.loads(ok("backup", "run", "--full", "--json"))
    assert third["kind"] == "full" and third["skipped_excluded"] > 0
    report = json.loads(ok("backup", "verify", third["id"], "--json"))
    assert report["ok"] is True and report["unrecoverable_by_design"] == []


# ------------------------------------------------- failures the operator meets


@pytest.mark.parametrize("case", ["master key readable by others", "unreadable manifest"])
def test_backup_command_failures_are_one_line(case: str, file_stack: Stack, tmp_path: Path) -> None:
    info = _small_backup(file_stack)
    if case == "master key readable by others":
        file_stack.master_path.chmod(0o644)
        command, needle = ["backup", "run"], "chmod 600"
    else:
        path = file_stack.backups.store.path(manifest_key(info.id))
        path.write_bytes(b"garbage")
        command, needle = ["backup", "list"], "manifest is not JSON"
    assert_one_line_failure(run_cli(command, tmp_path, file_stack.env), needle)


def test_one_damaged_manifest_does_not_stop_the_next_backup(file_stack: Stack) -> None:
    info = _small_backup(file_stack)
    file_stack.backups.store.path(manifest_key(info.id)).write_bytes(b"garbage")
    file_stack.clock.advance(minutes=1)
    taken = file_stack.backups.writer.run().info
    assert taken.kind == "full"
    assert file_stack.backups.reader.verify(taken.id).ok
