"""Restoring a backup chain into an empty event store, and the restore drill.

A restore replays the records of a full backup and its incrementals, in log
order, into an empty store, optionally stopping at a position (point in time,
to the event). Records of plans whose key was shredded cannot be decrypted:
they are left out by design, and so, consistently, is everything of those
plans. The display views are then rebuilt from the restored log.

The drill restores into a scratch store and compares it with the live one up
to the backup's last position, aggregate by aggregate (event count and a
digest of versions, topics and states), leaving out every excluded plan; it
checks that plans excluded before the backup are absent and that plans
excluded after it are present but undecryptable ("unrecoverable by design").
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from domain.application import ResultsApp
from retention.backup import PlanOf
from retention.reader import BackupReader, VerifyReport

BATCH = 500
# Bytes of event state per insert: psycopg 3.3's pipeline mode (used by
# eventsourcing's recorder) stops sending a statement of several MB and waits
# forever; pages are cut well below that.
BATCH_BYTES = 1024 * 1024


class RestoreRefused(Exception):
    """The target is not empty, or the backup cannot be restored; the message says which."""


@dataclass
class RestoreResult:
    backup_id: str
    chain: list[str]
    events: int = 0
    last_position: int = 0
    unrecoverable_plans: set[str] = field(default_factory=set)


def restore(
    reader: BackupReader,
    backup_id: str,
    target: ResultsApp,
    *,
    until_position: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Load a backup chain into ``target``, an empty event store; all of it or nothing.

    A damaged object met half-way (or a target that fails) leaves the target
    empty again, so the operator can fix the cause and run the same command.
    """
    if target.head_position() != 0:
        raise RestoreRefused("the target database is not empty: restore only into an empty one")
    try:
        return _restore(reader, backup_id, target, until_position, progress)
    except BaseException:
        _empty(target)
        raise


def _empty(target: ResultsApp) -> None:
    """Remove every event from a target that was empty when the restore began."""
    recorder: Any = target.recorder
    table = recorder.events_table_name
    if hasattr(recorder.datastore, "schema"):  # PostgreSQL
        table = f'"{recorder.datastore.schema}"."{table}"'
    with recorder.datastore.transaction(commit=True) as cursor:
        cursor.execute(f"DELETE FROM {table}")


def _restore(
    reader: BackupReader,
    backup_id: str,
    target: ResultsApp,
    until_position: int | None,
    progress: Callable[[int], None] | None,
) -> RestoreResult:
    members = reader.chain(backup_id)
    result = RestoreResult(backup_id, [member.id for member in members])
    pending: list[StoredEvent] = []
    pending_bytes = 0
    report = VerifyReport(backup_id)
    for member in members:
        for record in reader.records(member.id, report):
            if until_position is not None and record.position > until_position:
                break
            pending.append(
                StoredEvent(
                    originator_id=record.originator_id,
                    originator_version=record.originator_version,
                    topic=record.topic,
                    state=record.state,
                )
            )
            result.events += 1
            result.last_position = record.position
            pending_bytes += len(record.state)
            if len(pending) >= BATCH or pending_bytes >= BATCH_BYTES:
                target.recorder.insert_events(pending)
                pending, pending_bytes = [], 0
                if progress is not None:
                    progress(record.position)
        else:
            continue
        break  # the until_position was reached inside this member
    if pending:
        target.recorder.insert_events(pending)
    result.unrecoverable_plans = report.unrecoverable_plans
    return result


def aggregate_digests(
    app: ResultsApp, *, up_to: int, leave_out: Iterable[UUID] = ()
) -> dict[UUID, tuple[int, str]]:
    """Per aggregate: how many events up to ``up_to``, and a SHA-256 of them in order.

    Events of the plans in ``leave_out`` (their runs and batches included) are
    not counted; the plan of an event is found as the backup writer finds it.
    """
    skip = set(leave_out)
    plan_of = PlanOf(app)
    digests: dict[UUID, Any] = {}
    counts: dict[UUID, int] = {}
    start = 0
    while start < up_to:
        page = app.recorder.select_notifications(
            start=start, limit=BATCH, stop=up_to, inclusive_of_start=False
        )
        if not page:
            break
        for notification in page:
            if plan_of(notification) in skip:
                continue
            ident = UUID(str(notification.originator_id))
            digest = digests.setdefault(ident, hashlib.sha256())
            digest.update(notification.originator_version.to_bytes(8, "big"))
            digest.update(notification.topic.encode() + b"\0")
            digest.update(len(notification.state).to_bytes(4, "big") + notification.state)
            counts[ident] = counts.get(ident, 0) + 1
        start = page[-1].id
    return {ident: (counts[ident], digest.hexdigest()) for ident, digest in digests.items()}


@dataclass
class Step:
    name: str
    seconds: float


class Timer:
    """Times the steps of a drill, for the report's RTO."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def step(self, name: str) -> _Timed:
        return _Timed(self, name)


class _Timed:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer = timer
        self.name = name

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *_: object) -> None:
        self.timer.steps.append(Step(self.name, time.monotonic() - self.start))
