"""Aggregates: teams, linked cloud accounts, plans, plan runs and result batches.

Every event class carries an explicit, stable ``TOPIC`` (``resultsvc/<Aggregate>/<Event>``)
so that stored events keep resolving when classes move or are renamed. Never
change a topic string once data exists; add a new event class instead.
With explicit topics, eventsourcing wants one on every nested event class,
including the ``Snapshot`` class and the inherited ``Created`` base, even when
the creation event has another name (``Linked``, ``Started``...).

Results are not events of the run itself: each batch is a small aggregate of
its own (one event, id derived from the run and the batch number), and the
run only records a short ``BatchRecorded`` marker. Appending the 2,000th batch
therefore loads a run of a few small markers (bounded further by snapshots and
the aggregate cache), never the results of the 1,999 batches before it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.domain import Snapshot as BaseSnapshot
from eventsourcing.utils import TopicError, register_topic, resolve_topic

from domain.errors import Conflict

RUN_RUNNING = "running"
RUN_SUCCEEDED = "succeeded"
RUN_FAILED = "failed"
RUN_END_STATES = (RUN_SUCCEEDED, RUN_FAILED)

_BATCH_NAMESPACE = uuid5(NAMESPACE_URL, "resultsvc:result-batch")
_EXTERNAL_ID_NAMESPACE = uuid5(NAMESPACE_URL, "resultsvc:external-id")


class Team(Aggregate):
    """A customer team: the unit of isolation for everything else."""

    TOPIC = "resultsvc/Team"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/Team/Snapshot"

    @event("Created", topic="resultsvc/Team/Created")
    def __init__(self, name: str, external_id: str) -> None:
        self.name = name
        self.external_id = external_id


class ExternalIdClaim(Aggregate):
    """Makes a team's External ID unique: its id is derived from the External ID.

    Saved together with the team, so a (vanishingly unlikely) collision fails
    the save on the event store's own uniqueness constraint instead of
    silently sharing an External ID between two teams.
    """

    TOPIC = "resultsvc/ExternalIdClaim"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/ExternalIdClaim/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/ExternalIdClaim/Created"

    @staticmethod
    def create_id(external_id: str) -> UUID:
        return uuid5(_EXTERNAL_ID_NAMESPACE, external_id)

    @event("Claimed", topic="resultsvc/ExternalIdClaim/Claimed")
    def __init__(self, external_id: str, team_id: UUID) -> None:
        self.team_id = team_id


ACCESS_OK = "ok"
ACCESS_LOST = "lost"
ACCESS_UNVERIFIED = "unverified"


class CloudAccount(Aggregate):
    """A customer's AWS account, reachable only through a role the customer controls."""

    TOPIC = "resultsvc/CloudAccount"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/CloudAccount/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/CloudAccount/Created"

    @event("Linked", topic="resultsvc/CloudAccount/Linked")
    def __init__(
        self,
        team_id: UUID,
        role_arn: str,
        aws_account_id: str,
        method: str,
        verified: bool,
        linked_by: str,
        profile: str | None = None,
    ) -> None:
        self.team_id = team_id
        self.role_arn = role_arn
        self.aws_account_id = aws_account_id
        self.method = method
        self.verified = verified
        self.linked_by = linked_by
        self.profile = profile
        self.linked = True
        self.access = ACCESS_OK if verified else ACCESS_UNVERIFIED

    def unlink(self, unlinked_by: str) -> None:
        """Record that the service must no longer use this account."""
        if not self.linked:
            raise Conflict(f"account {self.id} is already unlinked")
        self._unlink(unlinked_by=unlinked_by)

    @event("Unlinked", topic="resultsvc/CloudAccount/Unlinked")
    def _unlink(self, unlinked_by: str) -> None:
        self.linked = False

    def record_access_check(self, ok: bool, reason: str, checked_by: str) -> bool:
        """Record a change in whether the role can be assumed; False when nothing changed.

        Only changes are events: a daily check of a hundred healthy accounts
        appends nothing, a lost role appends one ``AccessLost`` however many
        days it stays lost, and the first success after it one ``AccessRestored``.
        """
        if not self.linked:
            raise Conflict(f"account {self.id} is unlinked; its access is no longer checked")
        if ok and self.access == ACCESS_LOST:
            self._access_restored(team_id=self.team_id, checked_by=checked_by)
        elif ok and self.access == ACCESS_UNVERIFIED:
            self._access_verified(team_id=self.team_id, checked_by=checked_by)
        elif not ok and self.access != ACCESS_LOST:
            self._access_lost(team_id=self.team_id, reason=reason, checked_by=checked_by)
        else:
            return False
        return True

    @event("AccessLost", topic="resultsvc/CloudAccount/AccessLost")
    def _access_lost(self, team_id: UUID, reason: str, checked_by: str) -> None:
        self.access = ACCESS_LOST

    @event("AccessRestored", topic="resultsvc/CloudAccount/AccessRestored")
    def _access_restored(self, team_id: UUID, checked_by: str) -> None:
        self.access = ACCESS_OK

    @event("AccessVerified", topic="resultsvc/CloudAccount/AccessVerified")
    def _access_verified(self, team_id: UUID, checked_by: str) -> None:
        self.access = ACCESS_OK
        self.verified = True


class Plan(Aggregate):
    """An audit or deployment plan a team runs against one of its accounts."""

    TOPIC = "resultsvc/Plan"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/Plan/Snapshot"

    @event("Created", topic="resultsvc/Plan/Created")
    def __init__(self, team_id: UUID, account_id: UUID, name: str) -> None:
        self.team_id = team_id
        self.account_id = account_id
        self.name = name
        self.backup_excluded = False
        self.backup_key_shredded = False

    def request_backup_exclusion(self, reason: str, ticket: str | None, requested_by: str) -> None:
        """Record a compliance request to keep this plan's results out of backups."""
        if self.backup_excluded:
            raise Conflict(f"plan {self.id} is already excluded from backups")
        self._request_backup_exclusion(
            team_id=self.team_id, reason=reason, ticket=ticket, requested_by=requested_by
        )

    @event("BackupExclusionRequested", topic="resultsvc/Plan/BackupExclusionRequested")
    def _request_backup_exclusion(
        self, team_id: UUID, reason: str, ticket: str | None, requested_by: str
    ) -> None:
        self.backup_excluded = True

    def record_key_shredded(self, shredded_by: str, copies_destroyed: int) -> None:
        """Record that the plan's backup key is gone everywhere (crypto-shredding done)."""
        if not self.backup_excluded:
            raise Conflict(f"plan {self.id} is not excluded from backups")
        self._key_shredded(
            team_id=self.team_id, shredded_by=shredded_by, copies_destroyed=copies_destroyed
        )

    @event("BackupKeyShredded", topic="resultsvc/Plan/BackupKeyShredded")
    def _key_shredded(self, team_id: UUID, shredded_by: str, copies_destroyed: int) -> None:
        self.backup_key_shredded = True


class PlanRun(Aggregate):
    """One run of a plan: started, results recorded in batches, then ended.

    The run keeps only counters; results live in ``ResultBatch`` aggregates.
    Every event names the plan so that readers (projections, backups keyed per
    plan) never need to look the run up to know which plan an event is about.
    """

    TOPIC = "resultsvc/PlanRun"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/PlanRun/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/PlanRun/Created"

    @staticmethod
    def create_id(run_id: UUID | None = None) -> UUID:
        """A random id, or the one a queue sender chose (it cannot read an answer)."""
        return run_id if run_id is not None else uuid4()

    @event("Started", topic="resultsvc/PlanRun/Started")
    def __init__(
        self, team_id: UUID, plan_id: UUID, account_id: UUID, run_id: UUID | None = None
    ) -> None:
        self.team_id = team_id
        self.plan_id = plan_id
        self.account_id = account_id
        self.status = RUN_RUNNING
        self.error: str | None = None
        self.batches = 0
        self.total = 0

    @property
    def ended(self) -> bool:
        return self.status in RUN_END_STATES

    def record_batch(self, results: list[dict[str, Any]]) -> ResultBatch:
        """Accept an already validated batch; return the aggregate holding it."""
        if self.ended:
            raise Conflict(f"run {self.id} has ended ({self.status}); it takes no more results")
        batch_no = self.batches + 1
        self._batch_recorded(plan_id=self.plan_id, batch_no=batch_no, count=len(results))
        return ResultBatch(
            team_id=self.team_id,
            plan_id=self.plan_id,
            run_id=self.id,
            batch_no=batch_no,
            results=results,
        )

    @event("BatchRecorded", topic="resultsvc/PlanRun/BatchRecorded")
    def _batch_recorded(self, plan_id: UUID, batch_no: int, count: int) -> None:
        self.batches = batch_no
        self.total += count

    def finish(self, status: str, error: str | None) -> None:
        """End the run as succeeded or failed; a run ends once."""
        if self.ended:
            raise Conflict(f"run {self.id} has already ended ({self.status})")
        self._ended(plan_id=self.plan_id, status=status, error=error)

    @event("Ended", topic="resultsvc/PlanRun/Ended")
    def _ended(self, plan_id: UUID, status: str, error: str | None) -> None:
        self.status = status
        self.error = error


class ResultBatch(Aggregate):
    """One batch of results of a run: a single event, never changed afterwards."""

    TOPIC = "resultsvc/ResultBatch"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/ResultBatch/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/ResultBatch/Created"

    @staticmethod
    def create_id(run_id: UUID, batch_no: int) -> UUID:
        return uuid5(_BATCH_NAMESPACE, f"{run_id}/{batch_no}")

    @event("Recorded", topic="resultsvc/ResultBatch/Recorded")
    def __init__(
        self,
        team_id: UUID,
        plan_id: UUID,
        run_id: UUID,
        batch_no: int,
        results: list[dict[str, Any]],
    ) -> None:
        self.team_id = team_id
        self.plan_id = plan_id
        self.run_id = run_id
        self.batch_no = batch_no
        self.count = len(results)


class DisplayPurge(Aggregate):
    """A request to remove results from the display views (never from backups).

    Recorded as an event so that a projection rebuild or a restore replays it
    and never shows the purged results again. A purge always names its team:
    the projector's delete statements always carry it, so one team's purge
    can never reach another team's rows.
    """

    TOPIC = "resultsvc/DisplayPurge"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/DisplayPurge/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/DisplayPurge/Created"

    @event("Requested", topic="resultsvc/DisplayPurge/Requested")
    def __init__(
        self,
        team_id: UUID,
        plan_id: UUID | None,
        started_before: datetime | None,
        requested_by: str,
        reason: str,
    ) -> None:
        self.team_id = team_id
        self.plan_id = plan_id
        self.started_before = started_before


_RECEIPT_NAMESPACE = uuid5(NAMESPACE_URL, "resultsvc:receipt")


class Receipt(Aggregate):
    """An idempotency key, applied: saved in the same transaction as the command's events.

    Its id is derived from the scope (the team) and the key, so a second
    attempt to apply the same key fails on the event store's own uniqueness
    constraint, whatever happened in between: a consumer killed after the
    commit, a message delivered twice. Holds no command data, only a digest.
    """

    TOPIC = "resultsvc/Receipt"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/Receipt/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/Receipt/Created"

    @staticmethod
    def create_id(scope: str, key: str) -> UUID:
        return uuid5(_RECEIPT_NAMESPACE, f"{scope}\n{key}")

    @event("Recorded", topic="resultsvc/Receipt/Recorded")
    def __init__(self, scope: str, key: str, request_sha256: str, command: str) -> None:
        self.scope = scope
        self.key = key
        self.request_sha256 = request_sha256
        self.command = command


_BACKUP_NAMESPACE = uuid5(NAMESPACE_URL, "resultsvc:backup")


class Backup(Aggregate):
    """A completed backup, as recorded in the log (the manifest in the store is the original)."""

    TOPIC = "resultsvc/Backup"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/Backup/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/Backup/Created"

    @staticmethod
    def create_id(backup_id: str) -> UUID:
        return uuid5(_BACKUP_NAMESPACE, backup_id)

    @event("Completed", topic="resultsvc/Backup/Completed")
    def __init__(
        self,
        backup_id: str,
        kind: str,
        parent: str | None,
        first_position: int,
        last_position: int,
        events: int,
        bytes_stored: int,
        duration_seconds: float,
        expires_at: str,
        excluded_plans: list[str],
    ) -> None:
        self.backup_id = backup_id
        self.kind = kind
        self.expires_at = expires_at
        self.deleted = False

    def delete(self, reason: str) -> None:
        """Record that the retention sweep removed this backup's objects."""
        if not self.deleted:
            self._deleted(reason=reason)

    @event("Deleted", topic="resultsvc/Backup/Deleted")
    def _deleted(self, reason: str) -> None:
        self.deleted = True


class RetentionSweep(Aggregate):
    """One run of the retention sweeper: what expired and was deleted."""

    TOPIC = "resultsvc/RetentionSweep"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/RetentionSweep/Snapshot"

    @event("Created", topic="resultsvc/RetentionSweep/Created")
    def __init__(self, deleted: list[str], kept: int, swept_by: str) -> None:
        self.deleted = deleted


class RestoreDrill(Aggregate):
    """One restore drill and its verdict, kept for compliance and for /metrics."""

    TOPIC = "resultsvc/RestoreDrill"

    class Snapshot(BaseSnapshot):
        TOPIC = "resultsvc/RestoreDrill/Snapshot"

    class Created(Aggregate.Created):
        TOPIC = "resultsvc/RestoreDrill/Created"

    @event("Recorded", topic="resultsvc/RestoreDrill/Recorded")
    def __init__(self, backup_id: str, passed: bool, reason: str, report: dict[str, Any]) -> None:
        self.backup_id = backup_id
        self.passed = passed


def _register_snapshot_topics() -> None:
    """Make every aggregate's snapshot topic resolvable as soon as this module is imported.

    eventsourcing registers explicit topics of event classes when the
    aggregate class is made, but a ``Snapshot`` class's topic only when a
    snapshot is first *written* in the process. A process that only reads (a
    restarted API, a CLI) then cannot load an aggregate that has a snapshot.
    """
    for aggregate in list(globals().values()):
        if isinstance(aggregate, type) and issubclass(aggregate, Aggregate):
            snapshot = aggregate.__dict__.get("Snapshot")
            if snapshot is not None and "TOPIC" in snapshot.__dict__:
                try:
                    resolved = resolve_topic(snapshot.TOPIC)
                except TopicError:
                    register_topic(snapshot.TOPIC, snapshot)
                    continue
                if resolved is not snapshot:
                    raise TopicError(f"snapshot topic {snapshot.TOPIC} is taken by {resolved}")


_register_snapshot_topics()
