"""The application: commands and queries on the event store.

This is the service layer of the domain. Every command takes the acting team
and refuses a reference to another team's resource exactly as it refuses an
unknown id (``NotFound`` with the same message), so the HTTP API and the CLI
inherit tenant isolation instead of having to re-implement it.

Commands return the log position they reached, so callers can wait for the
display views to catch up with their own writes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, Recording

from domain.arn import parse_role_arn
from domain.errors import Conflict, InvalidInput, NotFound
from domain.findings import Finding, validate_batch
from domain.model import (
    RUN_END_STATES,
    Backup,
    CloudAccount,
    DisplayPurge,
    ExternalIdClaim,
    Plan,
    PlanRun,
    Receipt,
    RestoreDrill,
    ResultBatch,
    RetentionSweep,
    Team,
)
from domain.transcoding import OrjsonTranscoder

A = TypeVar("A", bound=Aggregate)

MAX_NAME = 200
MAX_REASON = 2000
MAX_TICKET = 200
MAX_ERROR = 4096
_CONCURRENT_RETRIES = 8


@dataclass(frozen=True)
class Appended:
    """What a command appended: the aggregate it concerns and the log position reached."""

    id: UUID
    position: int


@dataclass(frozen=True)
class ResultsAccepted:
    """Answer of ``record_results``: how many results, in which batch, at which position."""

    run_id: UUID
    batch_no: int
    accepted: int
    position: int


@dataclass(frozen=True)
class ReceiptSpec:
    scope: str
    key: str
    request_sha256: str
    command: str


class AlreadyApplied(Exception):
    """This idempotency key was applied before; ``same_request`` says whether with this body."""

    def __init__(self, scope: str, key: str, same_request: bool) -> None:
        super().__init__(
            f"idempotency key {key!r} was applied before"
            + ("" if same_request else " to another request")
        )
        self.scope = scope
        self.key = key
        self.same_request = same_request


# The receipt the next save of this thread (or task) must carry; see ``receipted``.
_pending_receipt: ContextVar[ReceiptSpec | None] = ContextVar("pending_receipt", default=None)


class ResultsApp(Application[UUID]):
    """Teams, linked accounts, plans and their runs, on one event store."""

    name = "resultsvc"
    # A run gets one small marker per batch; snapshots bound a cold load to
    # at most this many events, the cache makes a warm load O(new events).
    snapshotting_intervals: ClassVar = {PlanRun: 100}
    env: ClassVar = {"AGGREGATE_CACHE_MAXSIZE": "10000", "DEEPCOPY_FROM_AGGREGATE_CACHE": "y"}

    def construct_transcoder(self) -> OrjsonTranscoder:
        """The stored format of events: eventsourcing's JSON, written by orjson."""
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

    # ----------------------------------------------------------------- teams

    def create_team(self, name: str) -> tuple[Team, int]:
        """Create a team with a fresh External ID (256 random bits, 43 characters).

        The External ID is claimed by an aggregate whose id derives from it,
        saved in the same transaction: uniqueness is enforced by the store.
        """
        name = _text(name, "name", MAX_NAME)
        external_id = secrets.token_urlsafe(32)
        team = Team(name=name, external_id=external_id)
        claim = ExternalIdClaim(external_id=external_id, team_id=team.id)
        return team, self._save(team, claim)

    def get_team(self, team_id: UUID) -> Team:
        return self._get(Team, team_id, team_id, "team")

    # -------------------------------------------------------------- accounts

    def link_account_role(
        self,
        team_id: UUID,
        role_arn: str,
        *,
        verified: bool,
        actor: str,
        method: str = "role",
        profile: str | None = None,
    ) -> tuple[CloudAccount, int]:
        """Record a link to a customer account through a role the customer controls.

        ``verified`` says whether the role was actually assumed; the AWS side
        lives in the service layer, the domain only records the outcome.
        """
        actor = _text(actor, "actor", MAX_NAME)
        self.get_team(team_id)
        arn = parse_role_arn(role_arn)
        if method not in ("role", "access_keys"):
            raise InvalidInput("method", "must be 'role' or 'access_keys'")
        if profile not in (None, "full", "audit"):
            raise InvalidInput("profile", "must be 'full' or 'audit'")
        account = CloudAccount(
            team_id=team_id,
            role_arn=arn.arn,
            aws_account_id=arn.aws_account_id,
            method=method,
            verified=verified,
            linked_by=actor,
            profile=profile,
        )
        return account, self._save(account)

    def get_account(self, team_id: UUID, account_id: UUID) -> CloudAccount:
        return self._get(CloudAccount, account_id, team_id, "account")

    def team_of_account(self, account_id: UUID) -> UUID:
        """The team that owns an account, for operators who name only the account.

        Read from the log, not the views: an account linked a moment ago is
        found even before the projector caught up.
        """
        try:
            account: Any = self.repository.get(account_id)
        except AggregateNotFoundError:
            raise NotFound("account", account_id) from None
        if not isinstance(account, CloudAccount):
            raise NotFound("account", account_id)
        return UUID(str(account.team_id))

    def unlink_account(self, team_id: UUID, account_id: UUID, *, actor: str) -> Appended:
        actor = _text(actor, "actor", MAX_NAME)
        account = self.get_account(team_id, account_id)
        account.unlink(unlinked_by=actor)
        return Appended(account.id, self._save(account))

    def record_account_access(
        self, team_id: UUID, account_id: UUID, *, ok: bool, reason: str, actor: str
    ) -> Appended | None:
        """Record the outcome of a role check when it changes the account's access.

        None when nothing changed (still fine, or still lost), so a daily job
        appends events only on the days something happened.
        """
        reason = _text(reason, "reason", MAX_REASON) if reason else ""
        account = self.get_account(team_id, account_id)
        if not account.record_access_check(ok=ok, reason=reason, checked_by=actor):
            return None
        return Appended(account.id, self._save(account))

    # ----------------------------------------------------------------- plans

    def create_plan(self, team_id: UUID, account_id: UUID, name: str) -> tuple[Plan, int]:
        name = _text(name, "name", MAX_NAME)
        account = self.get_account(team_id, account_id)
        if not account.linked:
            raise Conflict(f"account {account_id} is unlinked; link it again to plan against it")
        plan = Plan(team_id=team_id, account_id=account_id, name=name)
        return plan, self._save(plan)

    def get_plan(self, team_id: UUID, plan_id: UUID) -> Plan:
        return self._get(Plan, plan_id, team_id, "plan")

    def request_backup_exclusion(
        self, team_id: UUID, plan_id: UUID, *, reason: str, ticket: str | None, actor: str
    ) -> Appended:
        """Record a compliance request to keep a plan's results out of backups."""
        reason = _text(reason, "reason", MAX_REASON)
        actor = _text(actor, "actor", MAX_NAME)
        if ticket is not None:
            ticket = _text(ticket, "ticket", MAX_TICKET)
        plan = self.get_plan(team_id, plan_id)
        plan.request_backup_exclusion(reason=reason, ticket=ticket, requested_by=actor)
        return Appended(plan.id, self._save(plan))

    # ------------------------------------------------------------------ runs

    def start_run(
        self, team_id: UUID, plan_id: UUID, run_id: UUID | None = None
    ) -> tuple[PlanRun, int]:
        """Start a run; refused when the plan's account has been unlinked.

        ``run_id`` is chosen by senders that cannot read an answer (the queue);
        an id already in use is refused.
        """
        plan = self.get_plan(team_id, plan_id)
        account = self.get_account(team_id, plan.account_id)
        if not account.linked:
            raise Conflict(
                f"account {account.id} of plan {plan_id} is unlinked; runs against it are refused"
            )
        run = PlanRun(team_id=team_id, plan_id=plan_id, account_id=account.id, run_id=run_id)
        try:
            return run, self._save(run)
        except IntegrityError:
            if run_id is None:
                raise
            raise Conflict(f"run id {run_id} is already in use; choose another") from None

    def get_run(self, team_id: UUID, run_id: UUID) -> PlanRun:
        return self._get(PlanRun, run_id, team_id, "run")

    def record_results(self, team_id: UUID, run_id: UUID, results: object) -> ResultsAccepted:
        """Validate a batch and append it whole, or refuse it whole.

        The run's version guards against a batch racing the run's end: two
        writers on one run conflict in the store and the loser retries on the
        fresh state (where an ended run refuses the batch).
        """
        findings = validate_batch(results)
        for attempt in range(_CONCURRENT_RETRIES):
            run = self.get_run(team_id, run_id)
            batch = run.record_batch(findings)
            try:
                position = self._save(run, batch)
            except IntegrityError:
                if attempt == _CONCURRENT_RETRIES - 1:
                    raise
                continue
            return ResultsAccepted(run.id, batch.batch_no, batch.count, position)
        raise AssertionError("unreachable")  # pragma: no cover

    def complete_run(
        self, team_id: UUID, run_id: UUID, status: str, error: str | None = None
    ) -> Appended:
        """End a run as succeeded or failed; afterwards it refuses results."""
        if status not in RUN_END_STATES:
            raise InvalidInput("status", f"must be one of {', '.join(RUN_END_STATES)}")
        if error is not None:
            error = _text(error, "error", MAX_ERROR)
        for attempt in range(_CONCURRENT_RETRIES):
            run = self.get_run(team_id, run_id)
            run.finish(status=status, error=error)
            try:
                return Appended(run.id, self._save(run))
            except IntegrityError:
                if attempt == _CONCURRENT_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def run_results(self, team_id: UUID, run_id: UUID) -> Iterator[Finding]:
        """The results of a run straight from the event store, in append order.

        The display views are the fast way to read results; this is the ground
        truth they are checked against.
        """
        run = self.get_run(team_id, run_id)
        for batch_no in range(1, run.batches + 1):
            batch_id = ResultBatch.create_id(run.id, batch_no)
            for stored in self.events.get(batch_id):
                yield from getattr(stored, "results", [])

    # ---------------------------------------------------------------- backups

    def team_of_plan(self, plan_id: UUID) -> UUID:
        """The team that owns a plan, for operators who name only the plan."""
        return self._plan_any_team(plan_id).team_id

    def _plan_any_team(self, plan_id: UUID) -> Plan:
        try:
            plan: Any = self.repository.get(plan_id)
        except AggregateNotFoundError:
            raise NotFound("plan", plan_id) from None
        if not isinstance(plan, Plan):
            raise NotFound("plan", plan_id)
        return plan

    def record_key_shredded(self, plan_id: UUID, *, actor: str, copies_destroyed: int) -> int:
        """Record the crypto-shredding of an excluded plan's key (an operator action)."""
        plan = self._plan_any_team(plan_id)
        plan.record_key_shredded(shredded_by=actor, copies_destroyed=copies_destroyed)
        return self._save(plan)

    def record_backup(self, **details: Any) -> int:
        """Record a completed backup (id, kind, positions, sizes, duration)."""
        return self._save(Backup(**details))

    def record_sweep(self, deleted: list[str], kept: int, *, actor: str) -> int:
        """Record a retention sweep and mark each deleted backup."""
        aggregates: list[Aggregate] = [RetentionSweep(deleted=deleted, kept=kept, swept_by=actor)]
        for backup_id in deleted:
            try:
                backup: Any = self.repository.get(Backup.create_id(backup_id))
            except AggregateNotFoundError:
                continue  # a backup whose completion was never recorded (older data)
            backup.delete(reason="retention expired")
            aggregates.append(backup)
        return self._save(*aggregates)

    def record_drill(
        self, backup_id: str, passed: bool, reason: str, report: dict[str, Any]
    ) -> int:
        """Record a restore drill and its report (pass or fail, with the reason)."""
        drill = RestoreDrill(backup_id=backup_id, passed=passed, reason=reason, report=report)
        return self._save(drill)

    def excluded_plans(self) -> dict[UUID, int]:
        """Every plan excluded from backups, with the position of its request.

        Read from the log itself, not from a view that may lag: a backup must
        never contain a plan excluded before it started.
        """
        found: dict[UUID, int] = {}
        start = 0
        topic = "resultsvc/Plan/BackupExclusionRequested"
        while True:
            page = self.recorder.select_notifications(
                start=start, limit=1000, topics=[topic], inclusive_of_start=False
            )
            if not page:
                return found
            for notification in page:
                found.setdefault(notification.originator_id, notification.id)  # type: ignore[arg-type]
            start = page[-1].id

    # ---------------------------------------------------------- display purge

    def purge_display(
        self,
        team_id: UUID,
        *,
        plan_id: UUID | None = None,
        started_before: datetime | None = None,
        actor: str,
        reason: str,
    ) -> Appended:
        """Record a purge of a team's display data: all of it, one plan's, or older runs.

        Only the display views act on it; backups keep what they hold (their
        own retention and exclusions govern them).
        """
        reason = _text(reason, "reason", MAX_REASON)
        actor = _text(actor, "actor", MAX_NAME)
        self.get_team(team_id)
        if plan_id is not None:
            self.get_plan(team_id, plan_id)
        if started_before is not None and started_before.tzinfo is None:
            raise InvalidInput("started_before", "must carry a time zone")
        purge = DisplayPurge(
            team_id=team_id,
            plan_id=plan_id,
            started_before=started_before,
            requested_by=actor,
            reason=reason,
        )
        return Appended(purge.id, self._save(purge))

    # --------------------------------------------------------------- helpers

    def head_position(self) -> int:
        """The last position in the log (0 when empty)."""
        return self.recorder.max_notification_id() or 0

    # -------------------------------------------------------------- receipts

    @contextmanager
    def receipted(self, scope: str, key: str, request_sha256: str, command: str) -> Iterator[None]:
        """Apply the command run inside at most once for this scope and key.

        The command's save carries a ``Receipt`` in the same transaction; a
        key applied before raises ``AlreadyApplied`` (at once when the
        receipt is already there, or from the save when a racing or earlier,
        interrupted attempt committed first) and nothing is appended.
        """
        spec = ReceiptSpec(scope, key, request_sha256, command)
        self._raise_if_applied(spec)
        token = _pending_receipt.set(spec)
        try:
            yield
        finally:
            _pending_receipt.reset(token)

    def raise_if_applied(self, scope: str, key: str, request_sha256: str) -> None:
        """``AlreadyApplied`` if this key was applied in this scope (with any request)."""
        self._raise_if_applied(ReceiptSpec(scope, key, request_sha256, ""))

    def _raise_if_applied(self, spec: ReceiptSpec) -> None:
        try:
            receipt: Any = self.repository.get(Receipt.create_id(spec.scope, spec.key))
        except AggregateNotFoundError:
            return
        raise AlreadyApplied(spec.scope, spec.key, receipt.request_sha256 == spec.request_sha256)

    def _save(self, *aggregates: Aggregate) -> int:
        spec = _pending_receipt.get()
        if spec is None:
            recordings: list[Recording[UUID]] = self.save(*aggregates)
            return recordings[-1].notification.id
        receipt = Receipt(
            scope=spec.scope,
            key=spec.key,
            request_sha256=spec.request_sha256,
            command=spec.command,
        )
        try:
            recordings = self.save(*aggregates, receipt)
        except IntegrityError:
            self._raise_if_applied(spec)  # the receipt won: applied before
            raise  # another conflict (a concurrent writer on the run): the caller retries
        _pending_receipt.set(None)  # one receipt per command
        return recordings[-1].notification.id

    def _get(self, cls: type[A], ident: UUID, team_id: UUID, kind: str) -> A:
        """Load an aggregate of the acting team, or raise ``NotFound`` uniformly."""
        try:
            aggregate: Any = self.repository.get(ident)
        except AggregateNotFoundError:
            raise NotFound(kind, ident) from None
        if not isinstance(aggregate, cls):
            raise NotFound(kind, ident)
        owner = aggregate.id if isinstance(aggregate, Team) else getattr(aggregate, "team_id", None)
        if owner != team_id:
            raise NotFound(kind, ident)
        return aggregate


def _text(value: object, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    stripped = value.strip()
    if not stripped:
        raise InvalidInput(field, "must not be empty")
    if len(stripped) > max_len:
        raise InvalidInput(field, f"must be at most {max_len} characters")
    if "\x00" in stripped:
        raise InvalidInput(field, "must not contain NUL characters")
    return stripped
