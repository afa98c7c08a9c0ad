"""Display purges: the display retention job and the operator's ``display purge``.

A purge is an event (``DisplayPurge.Requested``); the projector deletes the
rows. Purges never touch the event log or backups, and each purge names one
team, so an operator's "older than 30 days" becomes one event per team.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from domain.application import ResultsApp
from domain.durations import format_duration
from domain.errors import InvalidInput
from projections.queries import DisplayQueries
from projections.views import iso


def purge_older_than(
    app: ResultsApp,
    queries: DisplayQueries,
    age: timedelta,
    *,
    actor: str,
    reason: str,
    team: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Purge runs started more than ``age`` ago, for one team or every team that has some.

    Returns the log positions of the purge events (empty when nothing is that old).
    """
    try:
        cutoff = (now or datetime.now(UTC)) - age
    except OverflowError:
        raise InvalidInput("older_than", "reaches before year 1; give a shorter age") from None
    teams = queries.teams_with_runs_started_before(iso(cutoff))
    if team is not None:
        teams = [t for t in teams if t == team]
    positions = []
    for team_id in teams:
        appended = app.purge_display(
            UUID(team_id), started_before=cutoff, actor=actor, reason=reason
        )
        positions.append(appended.position)
    return positions


def apply_display_retention(
    app: ResultsApp,
    queries: DisplayQueries,
    retention: timedelta,
    now: datetime | None = None,
) -> list[int]:
    """The daily job: purge from display what is older than ``RESULTSVC_DISPLAY_RETENTION``."""
    return purge_older_than(
        app,
        queries,
        retention,
        actor="scheduler",
        reason=f"display retention {format_duration(retention)}",
        now=now,
    )
