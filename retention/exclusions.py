"""Excluding a plan from backups: the request, then crypto-shredding its key.

From the request on, no backup contains the plan (the writer skips every
event of a plan excluded before it started). The plan's key is then
destroyed everywhere it is kept, so backups taken before the request can no
longer decrypt that plan's part; everything else in them still verifies.

The request and the shredding are two events. If shredding fails half-way
(the store is down), the request stands, and ``shred_pending`` (run by the
scheduler, and by every later exclusion) finishes the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from domain.application import ResultsApp
from retention.keyring import Keyring


@dataclass(frozen=True)
class Exclusion:
    plan_id: UUID
    requested_at_position: int
    shredded_at_position: int
    copies_destroyed: int


def exclude_plan(
    app: ResultsApp,
    keyring: Keyring,
    team_id: UUID,
    plan_id: UUID,
    *,
    reason: str,
    ticket: str | None,
    actor: str,
) -> Exclusion:
    """Record the request, destroy the plan's key, record the shredding."""
    requested = app.request_backup_exclusion(
        team_id, plan_id, reason=reason, ticket=ticket, actor=actor
    )
    copies = keyring.shred(plan_id)
    shredded = app.record_key_shredded(plan_id, actor=actor, copies_destroyed=copies)
    return Exclusion(plan_id, requested.position, shredded, copies)


def pending_shreds(app: ResultsApp) -> list[UUID]:
    """Plans excluded on request whose key shredding was never recorded."""
    requested = app.excluded_plans()
    done: set[UUID] = set()
    start = 0
    while True:
        page = app.recorder.select_notifications(
            start=start,
            limit=1000,
            topics=["resultsvc/Plan/BackupKeyShredded"],
            inclusive_of_start=False,
        )
        if not page:
            break
        done.update(UUID(str(n.originator_id)) for n in page)
        start = page[-1].id
    return sorted(set(requested) - done)


def shred_pending(app: ResultsApp, keyring: Keyring, *, actor: str) -> list[UUID]:
    """Finish shredding for every excluded plan still waiting; return those done now."""
    finished = []
    for plan_id in pending_shreds(app):
        copies = keyring.shred(plan_id)
        app.record_key_shredded(plan_id, actor=actor, copies_destroyed=copies)
        finished.append(plan_id)
    return finished
