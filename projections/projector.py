"""The projector: events from the log into the display views, exactly once.

For each view, one transaction reads the view's tracking position (locking
its row), applies the next page of events, writes the new position and
commits: view rows and position move together or not at all, so a projector
killed at any instant resumes where its last commit left it.

Pages are large (many events, bulk inserts) because one transaction per event
is far too slow. PostgreSQL wakes the projector with LISTEN/NOTIFY on the
event table's channel; SQLite is polled.

An event a view cannot apply stops that view: its state becomes ``failed``
with the error and the position, shown by ``resultsvc projections status``.
Nothing is skipped. Connection trouble is not such a failure: it is retried.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql as pgsql

from domain.application import ResultsApp
from projections.schema import (
    TRACKING_DDL,
    create_indexes,
    create_tables,
    drop_tables,
    swap_tables,
)
from projections.sqlstore import TRANSIENT_ERRORS, Cursor, ViewDatabase
from projections.views import ALL_VIEWS, PASS_THROUGH, EventNotProjectable, View

log = logging.getLogger(__name__)

# A page is at most this many events, and is cut after the event that brings
# it to this many result rows: big enough for bulk inserts, small enough that
# a write becomes visible within a fraction of a second under load.
PAGE_EVENTS = 200
PAGE_ROWS = 5000
POLL_SECONDS = 0.1
STATE_RUNNING = "running"
STATE_FAILED = "failed"


@dataclass(frozen=True)
class ViewStatus:
    """Where a view stands: what ``projections status`` and ``/readyz`` report."""

    view: str
    position: int
    head: int
    state: str
    last_error: str | None
    error_position: int | None

    @property
    def lag(self) -> int:
        return max(0, self.head - self.position)


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Projector:
    """Keeps the views up to date with the event log."""

    def __init__(
        self,
        app: ResultsApp,
        db: ViewDatabase,
        views: Sequence[View] = ALL_VIEWS,
        page_events: int = PAGE_EVENTS,
        page_rows: int = PAGE_ROWS,
    ) -> None:
        self.app = app
        self.db = db
        self.views = list(views)
        self.page_events = page_events
        self.page_rows = page_rows
        self._conn: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # ----------------------------------------------------------------- set-up

    def connection(self) -> Any:
        if self._conn is None:
            self._conn = self.db.connect()
        return self._conn

    def ensure_schema(self) -> None:
        """Create the tracking table and any missing view tables, in one transaction."""
        with self._lock, self.db.transaction(self.connection()) as cur:
            cur.execute(TRACKING_DDL)
            for view in self.views:
                create_tables(cur, view.tables)
                cur.execute(
                    "INSERT INTO projection_tracking (view, position, state, updated_at)"
                    " SELECT ?, 0, ?, ? WHERE NOT EXISTS"
                    " (SELECT 1 FROM projection_tracking WHERE view = ?)",
                    [view.name, STATE_RUNNING, now_text(), view.name],
                )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------- projecting

    def step(self, view: View) -> int:
        """Apply one page of events to a view in one transaction; return how many."""
        with self._lock:
            try:
                with self.db.transaction(self.connection()) as cur:
                    return self._apply_page(cur, view, suffix="", tracked=True)
            except EventNotProjectable as error:
                self._record_failure(view, error)
                log.error("view %s stopped: %s", view.name, error)
                return 0
            except TRANSIENT_ERRORS:
                self.close()  # reconnect on the next step
                raise

    def _apply_page(self, cur: Cursor, view: View, suffix: str, tracked: bool) -> int:
        position, state = self._tracking(cur, view.name, lock=True) if tracked else (0, "")
        if state == STATE_FAILED:
            return 0
        count, _ = self._apply_from(cur, view, position, suffix, update_tracking=tracked)
        return count

    def _apply_from(
        self, cur: Cursor, view: View, position: int, suffix: str, *, update_tracking: bool
    ) -> tuple[int, int]:
        """Apply the page after ``position``; return (notifications read, last position)."""
        notifications = self.app.recorder.select_notifications(
            start=position, limit=self.page_events, inclusive_of_start=False
        )
        if not notifications:
            return 0, position
        to_event = self.app.mapper.to_domain_event
        page = []
        rows = 0
        last = position
        read = 0
        for notification in notifications:
            read += 1
            last = notification.id
            if notification.topic in view.topics:
                try:
                    event = to_event(notification)
                except Exception as error:
                    raise EventNotProjectable(
                        f"cannot decode {notification.topic} at position {notification.id}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
                page.append((notification.id, notification.topic, event))
                rows += len(getattr(event, "results", ()))
                if rows >= self.page_rows:
                    break  # commit soon: a position is visible only once its page commits
        try:
            view.apply(cur, page, suffix)
        except PASS_THROUGH:
            raise
        except Exception as error:  # a view without its own wrapping: still loud, not a crash
            first = page[0][0] if page else last
            raise EventNotProjectable(
                f"page at positions {first} to {last}: {type(error).__name__}: {error}"
            ) from error
        if update_tracking:
            cur.execute(
                "UPDATE projection_tracking SET position = ?, updated_at = ? WHERE view = ?",
                [last, now_text(), view.name],
            )
        return read, last

    def _tracking(self, cur: Cursor, view: str, *, lock: bool) -> tuple[int, str]:
        statement = "SELECT position, state FROM projection_tracking WHERE view = ?"
        if lock and self.db.dialect == "postgresql":
            statement += " FOR UPDATE"
        row = cur.fetchone(statement, [view])
        if row is None:
            raise RuntimeError(f"view {view} has no tracking row: run ensure_schema first")
        return int(row[0]), str(row[1])

    def _record_failure(self, view: View, error: EventNotProjectable) -> None:
        text = str(error)[:2000]
        position = None
        marker = " at position "
        if marker in text:
            digits = text.split(marker, 1)[1].split(":", 1)[0]
            position = int(digits) if digits.isdigit() else None
        with self.db.transaction(self.connection()) as cur:
            cur.execute(
                "UPDATE projection_tracking SET state = ?, last_error = ?, error_position = ?,"
                " updated_at = ? WHERE view = ?",
                [STATE_FAILED, text, position, now_text(), view.name],
            )

    def catch_up(self, views: Iterable[View] | None = None) -> int:
        """Apply everything in the log now; return how many notifications were read.

        Views take turns, a page each, so a slow view never holds back the
        others (a reader waiting for a position waits for every view).
        """
        total = 0
        pending = list(views or self.views)
        while pending:
            still = []
            for view in pending:
                done = self.step(view)
                total += done
                if done:
                    still.append(view)
            pending = still
        return total

    def restart_failed(self) -> list[str]:
        """Put failed views back to running (after a fix): they retry the event that failed."""
        with self._lock, self.db.transaction(self.connection()) as cur:
            rows = cur.fetchall(
                "SELECT view FROM projection_tracking WHERE state = ?", [STATE_FAILED]
            )
            cur.execute(
                "UPDATE projection_tracking SET state = ?, last_error = NULL,"
                " error_position = NULL, updated_at = ? WHERE state = ?",
                [STATE_RUNNING, now_text(), STATE_FAILED],
            )
        return [str(row[0]) for row in rows]

    # ---------------------------------------------------------------- running

    def wake(self) -> None:
        """Ask a running projector to look at the log now (after an in-process append)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Project until ``stop`` is set: catch up, then wait for news and repeat."""
        listener = self._listener()
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    self.catch_up()
                    backoff = 0.5
                except TRANSIENT_ERRORS as error:
                    log.warning(
                        "projector: %s; retrying in %.1fs", str(error).splitlines()[0], backoff
                    )
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                self._wait_for_news(listener, stop)
        finally:
            if listener is not None:
                listener.close()
            self.close()

    def _listener(self) -> Any:
        if self.db.dialect != "postgresql":
            return None
        try:
            conn = psycopg.connect(self.db.conninfo, autocommit=True)
            channel = self.app.recorder.channel_name  # type: ignore[attr-defined]
            conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
        except psycopg.Error as error:
            log.warning("projector: LISTEN failed (%s); polling instead", error)
            return None
        return conn

    def _wait_for_news(self, listener: Any, stop: threading.Event) -> None:
        if listener is None:
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            return
        try:
            for _ in listener.notifies(timeout=1.0, stop_after=1):
                break
        except psycopg.Error:
            stop.wait(POLL_SECONDS)

    # ----------------------------------------------------------------- status

    def status(self) -> list[ViewStatus]:
        head = self.app.head_position()
        with self.db.reading() as cur:  # not the projector's own connection: never waits for it
            rows = cur.fetchall(
                "SELECT view, position, state, last_error, error_position"
                " FROM projection_tracking ORDER BY view"
            )
        return [
            ViewStatus(
                view=str(r[0]),
                position=int(r[1]),
                head=head,
                state=str(r[2]),
                last_error=r[3],
                error_position=None if r[4] is None else int(r[4]),
            )
            for r in rows
        ]

    # ---------------------------------------------------------------- rebuild

    def rebuild(self, view: View, progress: Callable[[int], None] | None = None) -> int:
        """Build a view afresh from the whole log beside the live one, then swap.

        Readers keep the old tables until the swap, which happens in one
        transaction holding the view's tracking row, so the live projector
        can neither write the old tables meanwhile nor skip an event after.
        The fresh tables are loaded without their secondary indexes, which are
        built once the bulk of the log is in (much faster than maintaining
        them row by row). Returns the position the rebuilt view reached.
        """
        suffix = f"_rb{secrets.token_hex(3)}"
        conn = self.db.connect()
        try:
            with self.db.transaction(conn) as cur:
                drop_tables(cur, view.tables, suffix)
                create_tables(cur, view.tables, suffix, indexes=False)
            position, count = 0, -1
            while count != 0:  # catch up page by page without blocking the live projector
                with self.db.transaction(conn) as cur:
                    count, position = self._apply_from(
                        cur, view, position, suffix, update_tracking=False
                    )
                if progress is not None:
                    progress(position)
            with self.db.transaction(conn) as cur:
                create_indexes(cur, view.tables, suffix)
            with self._lock, self.db.transaction(conn) as cur:
                self._tracking(cur, view.name, lock=True)
                count = -1
                while count != 0:  # the last few events, with the live projector held
                    count, position = self._apply_from(
                        cur, view, position, suffix, update_tracking=False
                    )
                swap_tables(cur, view.tables, suffix)
                cur.execute(
                    "UPDATE projection_tracking SET position = ?, state = ?, last_error = NULL,"
                    " error_position = NULL, updated_at = ? WHERE view = ?",
                    [position, STATE_RUNNING, now_text(), view.name],
                )
            return position
        except BaseException:
            with self.db.transaction(conn) as cur:
                drop_tables(cur, view.tables, suffix)
            raise
        finally:
            conn.close()
