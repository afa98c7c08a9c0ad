"""The scheduled jobs: backups, retention sweep, display retention, pending shreds.

APScheduler 3 fires the jobs on every replica; each job runs once per slot
across all of them and never twice at the same time:

- on PostgreSQL a session advisory lock per job (``pg_try_advisory_lock``)
  keeps a second replica out while the first runs;
- the ``scheduler_jobs`` table remembers the last slot done, so a replica
  whose clock fires late does not run the same slot again. On SQLite (one
  host) the claim is an atomic conditional update of that table.

A job that fails is recorded (time and reason, shown by ``backup list`` and
``/metrics``) and runs again at its next slot; when the database itself is
gone, the outcome is kept in memory and recorded within a minute of its
return. Misfires within an hour still run; several missed firings coalesce.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from projections.purge import apply_display_retention
from projections.sqlstore import TRANSIENT_ERRORS, ViewDatabase
from retention.exclusions import shred_pending
from retention.sweeper import sweep
from service.backups import Backups
from service.runtime import Runtime

log = logging.getLogger("resultsvc.scheduler")

JOBS_DDL = (
    "CREATE TABLE IF NOT EXISTS scheduler_jobs ("
    " job TEXT PRIMARY KEY,"
    " last_slot TEXT,"
    " running_since TEXT,"
    " last_success TEXT,"
    " last_failure TEXT,"
    " last_error TEXT)"
)
STALE_RUN = timedelta(hours=6)  # a claim older than this was left by a dead process
PASSING_DB_ERRORS = TRANSIENT_ERRORS  # the database is gone for now, not the job wrong


@dataclass(frozen=True)
class JobSpec:
    name: str
    trigger: CronTrigger
    slot: Callable[[datetime], str]  # the slot a firing at this time belongs to
    run: Callable[[Runtime], Any]


def _day(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d}"


def _hour(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H}"


def _backup(runtime: Runtime) -> Any:
    return Backups.open(runtime).writer.run(full=None)  # full when the chain's full is a week old


def _sweep(runtime: Runtime) -> Any:
    return sweep(runtime.app, Backups.open(runtime).store, datetime.now(UTC))


def _display_retention(runtime: Runtime) -> Any:
    return apply_display_retention(runtime.app, runtime.queries, runtime.settings.display_retention)


def _drill(runtime: Runtime) -> Any:
    backups = Backups.open(runtime)
    report, _ = backups.drill(backups.choose(pick="latest"))
    if not report.passed:
        raise RuntimeError(f"restore drill of {report.backup_id} failed: {report.reason}")
    return report


def _week(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def _shred(runtime: Runtime) -> Any:
    return shred_pending(runtime.app, Backups.open(runtime).keyring, actor="scheduler")


def _check_accounts(runtime: Runtime) -> Any:
    report = runtime.accounts.check_all(actor="scheduler")
    if report.unchecked:
        # Recorded as a failed run (and so in /metrics); the next slot tries again.
        raise RuntimeError(
            f"{len(report.unchecked)} of {report.checked} accounts could not be checked"
            " (AWS unavailable); none of them was marked lost"
        )
    return report


JOBS: tuple[JobSpec, ...] = (
    JobSpec("backup", CronTrigger(hour=2, minute=0, timezone=UTC), _day, _backup),
    JobSpec("retention-sweep", CronTrigger(hour=3, minute=0, timezone=UTC), _day, _sweep),
    JobSpec(
        "display-retention", CronTrigger(hour=4, minute=0, timezone=UTC), _day, _display_retention
    ),
    JobSpec("shred-pending", CronTrigger(minute=17, timezone=UTC), _hour, _shred),
    JobSpec(
        "restore-drill",
        CronTrigger(day_of_week="sun", hour=5, minute=0, timezone=UTC),
        _week,
        _drill,
    ),
    JobSpec(
        "account-verification", CronTrigger(hour=6, minute=0, timezone=UTC), _day, _check_accounts
    ),
)


def ensure_schema(db: ViewDatabase) -> None:
    with db.writing() as cur:
        cur.execute(JOBS_DDL)
        for spec in JOBS:
            cur.execute(
                "INSERT INTO scheduler_jobs (job) SELECT ? WHERE NOT EXISTS"
                " (SELECT 1 FROM scheduler_jobs WHERE job = ?)",
                [spec.name, spec.name],
            )


def job_status(db: ViewDatabase) -> list[dict[str, Any]]:
    """Each job's last success and failure, for ``backup list`` and ``/metrics``."""
    ensure_schema(db)
    with db.reading() as cur:
        rows = cur.fetchall(
            "SELECT job, last_slot, last_success, last_failure, last_error FROM scheduler_jobs"
            " ORDER BY job"
        )
    return [
        {
            "job": r[0],
            "last_slot": r[1],
            "last_success": r[2],
            "last_failure": r[3],
            "last_error": r[4],
        }
        for r in rows
    ]


class JobRunner:
    """Runs one job for one slot, at most once across replicas, and records the outcome."""

    def __init__(self, runtime: Runtime, clock: Callable[[], datetime] | None = None) -> None:
        self.runtime = runtime
        self.db = runtime.views
        self.clock = clock or (lambda: datetime.now(UTC))
        self._local = threading.Lock()
        self._claiming = threading.Lock()
        self._unrecorded: list[tuple[str, str, datetime, Exception | None]] = []
        ensure_schema(self.db)

    def run(self, spec: JobSpec) -> str:
        """Returns "done", "failed", "skipped: <why>".

        With the database gone, the job fails and its outcome is kept here
        until the database can take it (``flush``, every minute, and before
        every run): a job is never left marked running by a passing outage.
        """
        self.flush()
        now = self.clock()
        slot = spec.slot(now)
        try:
            lock = self._advisory_lock(spec.name)
            if lock is False:
                return "skipped: running on another replica"
        except PASSING_DB_ERRORS as error:
            log.error("job %s not started: database unavailable (%s)", spec.name, error)
            self._record(spec.name, slot, now, error)
            return "failed"
        try:
            try:
                claimed = self._claim(spec.name, slot, now)
            except PASSING_DB_ERRORS as error:
                log.error("job %s not started: database unavailable (%s)", spec.name, error)
                self._record(spec.name, slot, now, error)
                return "failed"
            if not claimed:
                return "skipped: slot already done or running"
            try:
                spec.run(self.runtime)
            except Exception as error:
                log.exception("job %s failed", spec.name)
                self._record(spec.name, slot, now, error)
                return "failed"
            self._record(spec.name, slot, now, None)
            return "done"
        finally:
            if lock is not None and lock is not False:
                with contextlib.suppress(*PASSING_DB_ERRORS):
                    lock.close()

    def flush(self) -> int:
        """Record outcomes the database could not take when they happened; how many remain."""
        with self._local:
            pending, self._unrecorded = self._unrecorded, []
        for outcome in pending:
            try:
                self._finish(*outcome)
            except PASSING_DB_ERRORS:
                with self._local:
                    self._unrecorded.append(outcome)
        with self._local:
            return len(self._unrecorded)

    def _record(self, job: str, slot: str, now: datetime, error: Exception | None) -> None:
        try:
            self._finish(job, slot, now, error)
        except PASSING_DB_ERRORS as lost:
            log.warning("job %s outcome kept until the database is back (%s)", job, lost)
            with self._local:
                self._unrecorded.append((job, slot, now, error))

    def _advisory_lock(self, job: str) -> Any:
        """PostgreSQL: a session lock held for the job's duration (None on SQLite)."""
        if self.db.dialect != "postgresql":
            return None
        key = int.from_bytes(hashlib.sha256(f"resultsvc-job:{job}".encode()).digest()[:8], "big")
        key -= 1 << 63  # signed bigint
        conn = psycopg.connect(self.db.conninfo, autocommit=True)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not row or not row[0]:
            conn.close()
            return False
        return conn  # closing the connection releases the lock

    def _claim(self, job: str, slot: str, now: datetime) -> bool:
        stale = (now - STALE_RUN).isoformat()
        with self._claiming, self.db.writing() as cur:
            claimed = cur.execute(
                "UPDATE scheduler_jobs SET running_since = ? WHERE job = ?"
                " AND (last_slot IS NULL OR last_slot <> ?)"
                " AND (running_since IS NULL OR running_since < ?)",
                [now.isoformat(), job, slot, stale],
            )
        return claimed == 1

    def _finish(self, job: str, slot: str, now: datetime, error: Exception | None) -> None:
        with self.db.writing() as cur:
            if error is None:
                cur.execute(
                    "UPDATE scheduler_jobs SET running_since = NULL, last_slot = ?,"
                    " last_success = ? WHERE job = ?",
                    [slot, now.isoformat(), job],
                )
            else:
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                if isinstance(error, PASSING_DB_ERRORS):
                    reason = f"database unavailable: {reason}"
                cur.execute(
                    "UPDATE scheduler_jobs SET running_since = NULL, last_failure = ?,"
                    " last_error = ? WHERE job = ?",
                    [now.isoformat(), reason, job],
                )


def start_scheduler(runtime: Runtime) -> BackgroundScheduler:
    """Start the jobs in background threads; call ``shutdown()`` on the result to stop."""
    runner = JobRunner(runtime)
    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
    )
    for spec in JOBS:
        scheduler.add_job(runner.run, spec.trigger, args=[spec], id=spec.name, name=spec.name)
    # Outcomes of jobs that failed while the database was gone, recorded once it is back.
    scheduler.add_job(runner.flush, "interval", minutes=1, id="record-outcomes")
    scheduler.start()
    return scheduler
