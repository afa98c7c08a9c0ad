"""Read queries on the display views, with keyset (cursor) pagination.

Every query takes the acting team; ``None`` means an operator acting across
teams. A row of another team is answered exactly like a missing one
(``NotFound``), so a caller cannot learn that it exists.

Cursors are opaque to clients: base64url of the list name and the sort key
of the last row returned. A page costs one index range scan, however deep.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from domain.errors import InvalidInput, NotFound
from domain.findings import SEVERITIES, STATUSES
from projections.sqlstore import Row, ViewDatabase
from projections.views import SEVERITY_COLUMNS, STATUS_COLUMNS

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_INT = 2**62
_ACCOUNT_COLUMNS = (
    "account_id, team_id, role_arn, aws_account_id, method, verified, linked,"
    " linked_at, unlinked_at, linked_by, profile, access, access_reason, access_changed_at"
)
_PLAN_COLUMNS = "plan_id, team_id, account_id, name, created_at, backup_excluded, latest_run_id"
_RUN_COLUMNS = (
    "run_id, plan_id, team_id, status, started_at, finished_at, error, total, "
    + ", ".join(SEVERITY_COLUMNS.values())
    + ", "
    + ", ".join(STATUS_COLUMNS.values())
)


class ViewsBehind(Exception):
    """The views did not reach a position in time; the caller may retry shortly."""


@dataclass(frozen=True)
class Page:
    """A page of a list: items and the cursor of the next page (``None`` at the end)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(kind: str, key: Sequence[Any]) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, types: Sequence[type]) -> list[Any]:
    """The sort key in a cursor, checked against what this list issues."""
    refusal = InvalidInput("cursor", "is not a cursor this list issued")
    if not isinstance(cursor, str) or len(cursor) > 512:
        raise refusal
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise refusal from None
    if not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != kind:
        raise refusal
    key = decoded[1:]
    for value, expected in zip(key, types, strict=True):
        if type(value) is not expected:
            raise refusal
        if isinstance(value, int) and not 0 <= value <= MAX_CURSOR_INT:
            raise refusal
        if isinstance(value, str) and not _plain_text(value):
            raise refusal
    return key


def _plain_text(value: str) -> bool:
    """Text a database accepts as a key: short, encodable, no NUL."""
    if len(value) > 64 or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return limit


class DisplayQueries:
    """What the web UI reads, straight from the view tables."""

    def __init__(self, db: ViewDatabase) -> None:
        self.db = db

    def _read(self) -> Any:
        return self.db.reading()

    # ------------------------------------------------------------ consistency

    def positions(self) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.fetchall("SELECT view, position FROM projection_tracking")
        return {str(view): int(position) for view, position in rows}

    def wait_for(self, position: int | None, timeout: float = 5.0) -> None:
        """Return once every view has processed ``position``, else raise ``ViewsBehind``.

        This is how a client reads its own writes without sleeping: an append
        answers with a position, the next read names it.
        """
        if position is None or position <= 0:
            return
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            positions = self.positions()
            behind = {view: at for view, at in positions.items() if at < position}
            if positions and not behind:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(f"{view} at {at}" for view, at in sorted(behind.items()))
                raise ViewsBehind(f"views behind position {position}: {names}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # ------------------------------------------------------------------ teams

    def get_team(self, team_id: str | None, ident: str) -> dict[str, Any]:
        with self._read() as cur:
            row = cur.fetchone(
                "SELECT team_id, name, external_id, created_at FROM view_teams WHERE team_id = ?",
                [ident],
            )
        if row is None or (team_id is not None and row[0] != team_id):
            raise NotFound("team", ident)
        return {"id": row[0], "name": row[1], "external_id": row[2], "created_at": row[3]}

    def team_ids(self) -> list[str]:
        with self._read() as cur:
            return [str(r[0]) for r in cur.fetchall("SELECT team_id FROM view_teams")]

    # --------------------------------------------------------------- accounts

    def list_accounts(
        self, team_id: str | None, team: str, cursor: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Page:
        self.get_team(team_id, team)
        limit = check_limit(limit)
        where, params = "team_id = ?", [team]
        if cursor:
            key = decode_cursor(cursor, "accounts", (str, str))
            where += " AND (linked_at, account_id) > (?, ?)"
            params += key
        with self._read() as cur:
            rows = cur.fetchall(
                f"SELECT {_ACCOUNT_COLUMNS} FROM view_accounts WHERE {where}"
                " ORDER BY linked_at, account_id LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _account, "accounts", lambda r: [r[7], r[0]])

    def get_account(self, team_id: str | None, ident: str) -> dict[str, Any]:
        with self._read() as cur:
            row = cur.fetchone(
                f"SELECT {_ACCOUNT_COLUMNS} FROM view_accounts WHERE account_id = ?",
                [ident],
            )
        if row is None or (team_id is not None and row[1] != team_id):
            raise NotFound("account", ident)
        return _account(row)

    def linked_accounts(self) -> list[tuple[str, str, str]]:
        """(team, account, role ARN) of every linked account, for the daily role check."""
        with self._read() as cur:
            rows = cur.fetchall(
                "SELECT team_id, account_id, role_arn FROM view_accounts WHERE linked = 1"
                " ORDER BY team_id, account_id"
            )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def account_access_counts(self) -> dict[str, int]:
        """Linked accounts by access state (ok, lost, unverified), for /metrics."""
        counts = {"ok": 0, "lost": 0, "unverified": 0}
        with self._read() as cur:
            for access, count in cur.fetchall(
                "SELECT access, COUNT(*) FROM view_accounts WHERE linked = 1 GROUP BY access"
            ):
                counts[str(access)] = int(count)
        return counts

    # ------------------------------------------------------------------ plans

    def list_plans(
        self, team_id: str | None, team: str, cursor: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Page:
        self.get_team(team_id, team)
        limit = check_limit(limit)
        where, params = "team_id = ?", [team]
        if cursor:
            where += " AND (created_at, plan_id) > (?, ?)"
            params += decode_cursor(cursor, "plans", (str, str))
        with self._read() as cur:
            rows = cur.fetchall(
                f"SELECT {_PLAN_COLUMNS} FROM view_plans WHERE {where}"
                " ORDER BY created_at, plan_id LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _plan, "plans", lambda r: [r[4], r[0]])

    def get_plan(self, team_id: str | None, ident: str) -> dict[str, Any]:
        with self._read() as cur:
            row = cur.fetchone(
                f"SELECT {_PLAN_COLUMNS} FROM view_plans WHERE plan_id = ?",
                [ident],
            )
        if row is None or (team_id is not None and row[1] != team_id):
            raise NotFound("plan", ident)
        return _plan(row)

    # ------------------------------------------------------------------- runs

    def list_runs(
        self, team_id: str | None, plan: str, cursor: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Page:
        """A plan's runs, newest first."""
        self.get_plan(team_id, plan)
        limit = check_limit(limit)
        where, params = "plan_id = ?", [plan]
        if cursor:
            where += " AND (started_at, run_id) < (?, ?)"
            params += decode_cursor(cursor, "runs", (str, str))
        with self._read() as cur:
            rows = cur.fetchall(
                f"SELECT {_RUN_COLUMNS} FROM view_runs WHERE {where}"
                " ORDER BY started_at DESC, run_id DESC LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _run, "runs", lambda r: [r[4], r[0]])

    def get_run(self, team_id: str | None, ident: str) -> dict[str, Any]:
        with self._read() as cur:
            row = cur.fetchone(f"SELECT {_RUN_COLUMNS} FROM view_runs WHERE run_id = ?", [ident])
        if row is None or (team_id is not None and row[2] != team_id):
            raise NotFound("run", ident)
        return _run(row)

    def list_results(
        self,
        team_id: str | None,
        run: str,
        *,
        severity: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> Page:
        """A run's results in the order they were recorded, optionally filtered."""
        owner = self.get_run(team_id, run)["team_id"]
        limit = check_limit(limit)
        where, params = "run_id = ? AND team_id = ?", [run, owner]
        if severity is not None:
            if severity not in SEVERITIES:
                raise InvalidInput("severity", f"must be one of {', '.join(SEVERITIES)}")
            where += " AND severity = ?"
            params.append(severity)
        if status is not None:
            if status not in STATUSES:
                raise InvalidInput("status", f"must be one of {', '.join(STATUSES)}")
            where += " AND status = ?"
            params.append(status)
        if cursor:
            where += " AND seq > ?"
            params += decode_cursor(cursor, "results", (int,))
        with self._read() as cur:
            rows = cur.fetchall(
                "SELECT seq, rule_id, title, severity, status, resource_arn, region, message,"
                f" observed_at, details FROM view_results WHERE {where} ORDER BY seq LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _result, "results", lambda r: [r[0]])

    # ------------------------------------------------------------- exclusions

    def list_exclusions(
        self, team_id: str | None, cursor: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Page:
        limit = check_limit(limit)
        where, params = "1 = 1", []
        if team_id is not None:
            where, params = "team_id = ?", [team_id]
        if cursor:
            where += " AND (requested_at, plan_id) > (?, ?)"
            params += decode_cursor(cursor, "exclusions", (str, str))
        with self._read() as cur:
            rows = cur.fetchall(
                "SELECT plan_id, team_id, reason, ticket, requested_by, requested_at, position"
                f" FROM view_exclusions WHERE {where} ORDER BY requested_at, plan_id LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _exclusion, "exclusions", lambda r: [r[5], r[0]])

    # ----------------------------------------------------------------- drills

    def list_drills(self, cursor: str | None = None, limit: int = DEFAULT_LIMIT) -> Page:
        """Restore drills, newest first."""
        limit = check_limit(limit)
        where, params = "1 = 1", []
        if cursor:
            where = "(recorded_at, drill_id) < (?, ?)"
            params = decode_cursor(cursor, "drills", (str, str))
        with self._read() as cur:
            rows = cur.fetchall(
                "SELECT drill_id, backup_id, passed, reason, recorded_at, position, report"
                f" FROM view_drills WHERE {where}"
                " ORDER BY recorded_at DESC, drill_id DESC LIMIT ?",
                [*params, limit + 1],
            )
        return _page(rows, limit, _drill, "drills", lambda r: [r[4], r[0]])

    # ----------------------------------------------------------------- purges

    def teams_with_runs_started_before(self, moment: str) -> list[str]:
        with self._read() as cur:
            rows = cur.fetchall(
                "SELECT DISTINCT team_id FROM view_runs WHERE started_at < ?", [moment]
            )
        return sorted(str(r[0]) for r in rows)

    def plan_owner(self, plan: str) -> str:
        """The team of a plan, for operators who name a plan without its team."""
        return str(self.get_plan(None, plan)["team_id"])


def _page(
    rows: list[Row],
    limit: int,
    to_item: Callable[[Row], dict[str, Any]],
    kind: str,
    key_of: Callable[[Row], list[Any]],
) -> Page:
    """A page from ``limit + 1`` rows: the extra row only says that there is a next page."""
    last = rows[limit - 1] if len(rows) > limit else None
    cursor = encode_cursor(kind, key_of(last)) if last is not None else None
    return Page([to_item(row) for row in rows[:limit]], cursor)


def _drill(r: Row) -> dict[str, Any]:
    return {
        "id": r[0],
        "backup_id": r[1],
        "passed": bool(r[2]),
        "reason": r[3],
        "recorded_at": r[4],
        "position": int(r[5]),
        "report": json.loads(r[6]),
    }


def _exclusion(r: Row) -> dict[str, Any]:
    return {
        "plan_id": r[0],
        "team_id": r[1],
        "reason": r[2],
        "ticket": r[3],
        "requested_by": r[4],
        "requested_at": r[5],
        "position": int(r[6]),
    }


def _account(r: Row) -> dict[str, Any]:
    return {
        "id": r[0],
        "team_id": r[1],
        "role_arn": r[2],
        "aws_account_id": r[3],
        "method": r[4],
        "verified": bool(r[5]),
        "linked": bool(r[6]),
        "linked_at": r[7],
        "unlinked_at": r[8],
        "linked_by": r[9],
        "profile": r[10],
        "access": r[11],
        "access_reason": r[12],
        "access_changed_at": r[13],
    }


def _plan(r: Row) -> dict[str, Any]:
    return {
        "id": r[0],
        "team_id": r[1],
        "account_id": r[2],
        "name": r[3],
        "created_at": r[4],
        "backup_excluded": bool(r[5]),
        "latest_run_id": r[6],
    }


def _run(r: Row) -> dict[str, Any]:
    severities = dict(zip(SEVERITY_COLUMNS, r[8:13], strict=True))
    statuses = dict(zip(STATUS_COLUMNS, r[13:17], strict=True))
    return {
        "id": r[0],
        "plan_id": r[1],
        "team_id": r[2],
        "status": r[3],
        "started_at": r[4],
        "finished_at": r[5],
        "error": r[6],
        "total": int(r[7]),
        "counts": {
            "by_severity": {k: int(v) for k, v in severities.items()},
            "by_status": {k: int(v) for k, v in statuses.items()},
        },
    }


def _result(r: Row) -> dict[str, Any]:
    item = {
        "rule_id": r[1],
        "title": r[2],
        "severity": r[3],
        "status": r[4],
        "resource_arn": r[5],
        "region": r[6],
        "message": r[7],
        "observed_at": r[8],
    }
    if r[9] is not None:
        item["details"] = json.loads(r[9])
    return item
