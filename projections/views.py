"""What each display view does with each event.

A view receives a page of ``(position, event)`` pairs inside the projector's
transaction and turns them into SQL on its own tables. It never commits: the
projector commits the view writes and the new tracking position together.

Purges delete with the purge's team in every statement. Results of a run the
view no longer holds (purged while it was still running) are not shown: the
run's ``Started`` always precedes its batches in the log, so a missing run
row means a purge removed it, on the live view and on any replay alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from projections.schema import DISPLAY_TABLES, DRILL_TABLES, EXCLUSION_TABLES, Table
from projections.sqlstore import TRANSIENT_ERRORS, Cursor, Row

SEQ_PER_BATCH = 1000  # at most 1,000 results per batch: (batch_no, index) -> seq
SEVERITY_COLUMNS = {
    "critical": "sev_critical",
    "high": "sev_high",
    "medium": "sev_medium",
    "low": "sev_low",
    "informational": "sev_informational",
}
STATUS_COLUMNS = {
    "FAIL": "st_fail",
    "PASS": "st_pass",
    "ERROR": "st_error",
    "SKIPPED": "st_skipped",
}
RESULT_COLUMNS = (
    "run_id",
    "seq",
    "team_id",
    "plan_id",
    "rule_id",
    "title",
    "severity",
    "status",
    "resource_arn",
    "region",
    "message",
    "observed_at",
    "details",
)

# (log position, event topic, decoded event); views dispatch on the stable topic.
Page = Sequence[tuple[int, str, Any]]


def iso(moment: datetime) -> str:
    """Timestamps as sortable text: the same instant in UTC, always microseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes have no instant; give a time zone")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def result_rows(
    run_id: str, team_id: str, plan_id: str, batch_no: int, results: list[dict[str, Any]]
) -> list[Row]:
    """The ``view_results`` rows of one batch, in ``RESULT_COLUMNS`` order."""
    base = batch_no * SEQ_PER_BATCH
    dumps = orjson.dumps
    return [
        (
            run_id,
            base + index,
            team_id,
            plan_id,
            r["rule_id"],
            r["title"],
            r["severity"],
            r["status"],
            r["resource_arn"],
            r["region"],
            r["message"],
            r["observed_at"],
            None if r.get("details") is None else dumps(r["details"]).decode(),
        )
        for index, r in enumerate(results)
    ]


class View(Protocol):
    """A display view: its name, its tables, and how it applies a page of events."""

    name: str
    tables: tuple[Table, ...]
    # Topics the view acts on; the projector decodes nothing else for it.
    topics: frozenset[str]

    def apply(self, cur: Cursor, page: Page, suffix: str = "") -> None: ...


class EventNotProjectable(Exception):
    """An event the view cannot apply; stops the view with this as its recorded error."""


# Errors a view lets through untouched: its own verdicts, and passing trouble
# (a timeout, a lock, a lost connection) that the projector retries.
PASS_THROUGH: tuple[type[BaseException], ...] = (EventNotProjectable, *TRANSIENT_ERRORS)


_ACCESS_AFTER = {
    "resultsvc/CloudAccount/AccessLost": "lost",
    "resultsvc/CloudAccount/AccessRestored": "ok",
    "resultsvc/CloudAccount/AccessVerified": "ok",
}


class DisplayView:
    """Teams, accounts, plans (with their latest run), runs with counts, results."""

    name = "display"
    tables = DISPLAY_TABLES
    topics = frozenset(
        {
            "resultsvc/Team/Created",
            "resultsvc/CloudAccount/Linked",
            "resultsvc/CloudAccount/Unlinked",
            "resultsvc/CloudAccount/AccessLost",
            "resultsvc/CloudAccount/AccessRestored",
            "resultsvc/CloudAccount/AccessVerified",
            "resultsvc/Plan/Created",
            "resultsvc/Plan/BackupExclusionRequested",
            "resultsvc/PlanRun/Started",
            "resultsvc/PlanRun/Ended",
            "resultsvc/ResultBatch/Recorded",
            "resultsvc/DisplayPurge/Requested",
        }
    )

    def apply(self, cur: Cursor, page: Page, suffix: str = "") -> None:
        pending: list[Row] = []
        s = suffix
        for position, topic, event in page:
            try:
                if topic == "resultsvc/ResultBatch/Recorded":
                    pending.extend(self._batch(cur, event, s))
                elif topic == "resultsvc/DisplayPurge/Requested":
                    cur.insert_many(f"view_results{s}", RESULT_COLUMNS, pending)
                    pending = []
                    self._purge(cur, event, s)
                else:
                    self._other(cur, topic, event, s)
            except PASS_THROUGH:
                raise  # passing trouble (a timeout, a lock) is retried by the projector
            except Exception as error:
                raise EventNotProjectable(
                    f"{topic} at position {position}: {type(error).__name__}: {error}"
                ) from error
        cur.insert_many(f"view_results{s}", RESULT_COLUMNS, pending)

    def _batch(self, cur: Cursor, event: Any, s: str) -> list[Row]:
        results: list[dict[str, Any]] = event.results
        severity = Counter(r["severity"] for r in results)
        status = Counter(r["status"] for r in results)
        assignments = ["total = total + ?"]
        params: list[Any] = [len(results)]
        for value, count in severity.items():
            assignments.append(f"{SEVERITY_COLUMNS[value]} = {SEVERITY_COLUMNS[value]} + ?")
            params.append(count)
        for value, count in status.items():
            assignments.append(f"{STATUS_COLUMNS[value]} = {STATUS_COLUMNS[value]} + ?")
            params.append(count)
        run_id = str(event.run_id)
        changed = cur.execute(
            f"UPDATE view_runs{s} SET {', '.join(assignments)} WHERE run_id = ?",
            [*params, run_id],
        )
        if changed == 0:
            return []  # the run was purged from display while it was running
        return result_rows(run_id, str(event.team_id), str(event.plan_id), event.batch_no, results)

    def _purge(self, cur: Cursor, event: Any, s: str) -> None:
        team = str(event.team_id)
        if event.plan_id is not None:
            scope, params = "team_id = ? AND plan_id = ?", [team, str(event.plan_id)]
        elif event.started_before is not None:
            scope = "team_id = ? AND started_at < ?"
            params = [team, iso(event.started_before)]
        else:
            scope, params = "team_id = ?", [team]
        cur.execute(
            f"DELETE FROM view_results{s} WHERE team_id = ? AND run_id IN"
            f" (SELECT run_id FROM view_runs{s} WHERE {scope})",
            [team, *params],
        )
        cur.execute(f"DELETE FROM view_runs{s} WHERE {scope}", params)
        cur.execute(
            f"UPDATE view_plans{s} SET latest_run_id = NULL WHERE team_id = ?"
            f" AND latest_run_id IS NOT NULL"
            f" AND latest_run_id NOT IN (SELECT run_id FROM view_runs{s} WHERE team_id = ?)",
            [team, team],
        )

    def _other(self, cur: Cursor, topic: str, event: Any, s: str) -> None:
        at = iso(event.timestamp)
        ident = str(event.originator_id)
        if topic == "resultsvc/Team/Created":
            cur.execute(
                f"INSERT INTO view_teams{s} (team_id, name, external_id, created_at)"
                " VALUES (?, ?, ?, ?)",
                [ident, event.name, event.external_id, at],
            )
        elif topic == "resultsvc/CloudAccount/Linked":
            cur.execute(
                f"INSERT INTO view_accounts{s} (account_id, team_id, role_arn, aws_account_id,"
                " method, verified, linked, linked_at, linked_by, profile, access)"
                " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                [
                    ident,
                    str(event.team_id),
                    event.role_arn,
                    event.aws_account_id,
                    event.method,
                    int(bool(event.verified)),
                    at,
                    event.linked_by,
                    getattr(event, "profile", None),
                    "ok" if event.verified else "unverified",
                ],
            )
        elif topic == "resultsvc/CloudAccount/Unlinked":
            cur.execute(
                f"UPDATE view_accounts{s} SET linked = 0, unlinked_at = ? WHERE account_id = ?",
                [at, ident],
            )
        elif topic in _ACCESS_AFTER:
            cur.execute(
                f"UPDATE view_accounts{s} SET access = ?, access_reason = ?,"
                " access_changed_at = ?, verified = CASE WHEN ? = 'ok' THEN 1 ELSE verified END"
                " WHERE account_id = ?",
                [
                    _ACCESS_AFTER[topic],
                    getattr(event, "reason", None),
                    at,
                    _ACCESS_AFTER[topic],
                    ident,
                ],
            )
        elif topic == "resultsvc/Plan/Created":
            cur.execute(
                f"INSERT INTO view_plans{s} (plan_id, team_id, account_id, name, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [ident, str(event.team_id), str(event.account_id), event.name, at],
            )
        elif topic == "resultsvc/Plan/BackupExclusionRequested":
            cur.execute(f"UPDATE view_plans{s} SET backup_excluded = 1 WHERE plan_id = ?", [ident])
        elif topic == "resultsvc/PlanRun/Started":
            cur.execute(
                f"INSERT INTO view_runs{s} (run_id, team_id, plan_id, status, started_at)"
                " VALUES (?, ?, ?, 'running', ?)",
                [ident, str(event.team_id), str(event.plan_id), at],
            )
            cur.execute(
                f"UPDATE view_plans{s} SET latest_run_id = ? WHERE plan_id = ?",
                [ident, str(event.plan_id)],
            )
        elif topic == "resultsvc/PlanRun/Ended":
            cur.execute(
                f"UPDATE view_runs{s} SET status = ?, finished_at = ?, error = ? WHERE run_id = ?",
                [event.status, at, event.error, ident],
            )
        # Other events (batch markers, External ID claims) change nothing on display.


class _OneTopicView:
    """A view fed by one topic: one INSERT per event, each failure naming its event."""

    topic: str

    def insert(self, event: Any, position: int, suffix: str) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def apply(self, cur: Cursor, page: Page, suffix: str = "") -> None:
        for position, topic, event in page:
            if topic != self.topic:
                continue
            try:
                cur.execute(*self.insert(event, position, suffix))
            except TRANSIENT_ERRORS:
                raise
            except Exception as error:
                raise EventNotProjectable(
                    f"{topic} at position {position}: {type(error).__name__}: {error}"
                ) from error


class ExclusionsView(_OneTopicView):
    """The backup exclusions compliance asked for: who, when, why, which ticket."""

    name = "exclusions"
    tables = EXCLUSION_TABLES
    topic = "resultsvc/Plan/BackupExclusionRequested"
    topics = frozenset({topic})

    def insert(self, event: Any, position: int, suffix: str) -> tuple[str, list[Any]]:
        return (
            f"INSERT INTO view_exclusions{suffix} (plan_id, team_id, reason, ticket,"
            " requested_by, requested_at, position) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                str(event.originator_id),
                str(event.team_id),
                event.reason,
                event.ticket,
                event.requested_by,
                iso(event.timestamp),
                position,
            ],
        )


class DrillsView(_OneTopicView):
    """The restore drills: when, which backup, passed or why not, the whole report."""

    name = "drills"
    tables = DRILL_TABLES
    topic = "resultsvc/RestoreDrill/Recorded"
    topics = frozenset({topic})

    def insert(self, event: Any, position: int, suffix: str) -> tuple[str, list[Any]]:
        return (
            f"INSERT INTO view_drills{suffix} (drill_id, backup_id, passed, reason,"
            " recorded_at, position, report) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                str(event.originator_id),
                event.backup_id,
                int(bool(event.passed)),
                event.reason,
                iso(event.timestamp),
                position,
                orjson.dumps(event.report).decode(),
            ],
        )


ALL_VIEWS: tuple[View, ...] = (DisplayView(), ExclusionsView(), DrillsView())
