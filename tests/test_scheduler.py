"""The scheduled jobs: once per slot across replicas, never twice at the same time.

Two ``JobRunner`` objects on one database stand for two replicas. Their clocks
are injected, so "the next slot" is a different value, not a wait. On
PostgreSQL a second replica is kept out by the advisory lock while the first
runs; on SQLite by the claim in ``scheduler_jobs``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from service.backups import Backups
from service.runtime import Runtime
from service.scheduler import JOBS, JobRunner, JobSpec, job_status, start_scheduler
from service.settings import Settings

SLOT_START = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = SLOT_START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Job:
    """A tiny job that records its calls; it can block, or fail, on demand."""

    def __init__(self, name: str = "test-job") -> None:
        self.calls: list[Runtime] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_with: Exception | None = None
        self.spec = JobSpec(
            name,
            CronTrigger(hour=2, minute=0, timezone=UTC),
            lambda moment: f"{moment:%Y-%m-%d}",
            self,
        )

    def __call__(self, runtime: Runtime) -> str:
        self.calls.append(runtime)
        self.started.set()
        assert self.release.wait(30), "the test never released the job"
        if self.fail_with is not None:
            raise self.fail_with
        return "ran"


def _settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/master.key",
        }
    )


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[Callable[[Clock], JobRunner]]:
    """Makes job runners, each on a runtime of its own (a replica), on one database."""
    opened: list[Runtime] = []

    def make(clock: Clock) -> JobRunner:
        runtime = Runtime.open(_settings(database_url, tmp_path))
        opened.append(runtime)
        return JobRunner(runtime, clock=clock)

    yield make
    for runtime in opened:
        runtime.close()


def _status(runner: JobRunner, name: str) -> dict[str, Any]:
    return next(row for row in job_status(runner.db) if row["job"] == name)


def _register(runner: JobRunner, name: str) -> None:
    """Jobs outside ``JOBS`` need their row (``ensure_schema`` only makes those of JOBS)."""
    with runner.db.writing() as cur:
        cur.execute(
            "INSERT INTO scheduler_jobs (job) SELECT ? WHERE NOT EXISTS"
            " (SELECT 1 FROM scheduler_jobs WHERE job = ?)",
            [name, name],
        )


def test_a_second_replica_is_kept_out_while_the_first_runs(
    replicas: Callable[[Clock], JobRunner], database_url: str
) -> None:
    clock = Clock()
    first, second = replicas(clock), replicas(clock)
    job = Job()
    _register(first, job.spec.name)
    job.release.clear()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(first.run(job.spec)))
    thread.start()
    try:
        assert job.started.wait(30)
        skipped = second.run(job.spec)
    finally:
        job.release.set()
        thread.join(30)
    if database_url.startswith("postgresql"):
        assert skipped == "skipped: running on another replica"
    else:
        assert skipped == "skipped: slot already done or running"
    assert outcome == ["done"]
    assert len(job.calls) == 1
    status = _status(second, job.spec.name)
    assert status["last_slot"] == "2026-03-02"
    assert status["last_success"] == SLOT_START.isoformat()
    assert status["last_failure"] is None


def test_a_slot_runs_once_and_the_next_slot_runs_again(
    replicas: Callable[[Clock], JobRunner],
) -> None:
    clock = Clock()
    first, second = replicas(clock), replicas(clock)
    job = Job()
    _register(first, job.spec.name)
    assert first.run(job.spec) == "done"
    # a replica whose trigger fires late, still in the same slot
    clock.now = SLOT_START + timedelta(hours=20)
    assert second.run(job.spec) == "skipped: slot already done or running"
    assert first.run(job.spec) == "skipped: slot already done or running"
    assert len(job.calls) == 1
    clock.now = SLOT_START + timedelta(days=1)
    assert second.run(job.spec) == "done"
    assert first.run(job.spec) == "skipped: slot already done or running"
    assert len(job.calls) == 2
    assert _status(first, job.spec.name)["last_slot"] == "2026-03-03"


def test_a_failing_job_is_recorded_and_runs_at_the_next_slot(
    replicas: Callable[[Clock], JobRunner],
) -> None:
    clock = Clock()
    runner = replicas(clock)
    job = Job()
    _register(runner, job.spec.name)
    job.fail_with = RuntimeError("bucket unreachable\nsecond line of detail")
    assert runner.run(job.spec) == "failed"
    status = _status(runner, job.spec.name)
    assert status["last_failure"] == SLOT_START.isoformat()
    assert status["last_error"] == "RuntimeError: bucket unreachable"  # one line
    assert status["last_success"] is None and status["last_slot"] is None

    job.fail_with = None
    clock.now = SLOT_START + timedelta(days=1)
    assert runner.run(job.spec) == "done"
    status = _status(runner, job.spec.name)
    assert status["last_slot"] == "2026-03-03"
    assert status["last_success"] == clock.now.isoformat()
    assert status["last_failure"] == SLOT_START.isoformat()  # kept for operators
    assert len(job.calls) == 2


def test_a_claim_left_by_a_dead_process_is_taken_over_once_stale(
    replicas: Callable[[Clock], JobRunner],
) -> None:
    clock = Clock()
    runner = replicas(clock)
    job = Job()
    _register(runner, job.spec.name)
    for age, expected in ((timedelta(hours=1), "skipped"), (timedelta(hours=7), "done")):
        with runner.db.writing() as cur:
            cur.execute(
                "UPDATE scheduler_jobs SET running_since = ? WHERE job = ?",
                [(clock.now - age).isoformat(), job.spec.name],
            )
        assert runner.run(job.spec).startswith(expected)
    assert len(job.calls) == 1


def test_the_backup_job_takes_a_backup_once_per_day(tmp_path: Path) -> None:
    clock = Clock()
    settings = _settings(f"sqlite:///{tmp_path}/resultsvc.db", tmp_path)
    with Runtime.open(settings) as runtime:
        runtime.app.create_team("t")
        runner = JobRunner(runtime, clock=clock)
        spec = next(spec for spec in JOBS if spec.name == "backup")
        assert runner.run(spec) == "done"
        assert runner.run(spec) == "skipped: slot already done or running"
        taken = Backups.open(runtime).catalog.all()
        assert [(b.kind, b.last_position) for b in taken] == [("full", 2)]
        assert _status(runner, "backup")["last_slot"] == f"{clock.now:%Y-%m-%d}"


def test_start_scheduler_registers_every_job_once_per_replica(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = BackgroundScheduler.start

    def start_paused(self: BackgroundScheduler, *args: Any, **kwargs: Any) -> None:
        started(self, *args, paused=True)  # nothing fires during the test

    monkeypatch.setattr(BackgroundScheduler, "start", start_paused)
    scheduler = start_scheduler(runtime)
    try:
        assert scheduler.running
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {spec.name for spec in JOBS} | {"record-outcomes"}
        # Outcomes kept while the database was gone are recorded every minute.
        assert getattr(jobs["record-outcomes"].func, "__name__", "") == "flush"
        for spec in JOBS:
            job = jobs[spec.name]
            assert job.trigger is spec.trigger
            assert job.args == (spec,)
            assert job.coalesce is True
            assert job.max_instances == 1
            assert job.misfire_grace_time == 3600
            assert getattr(job.func, "__name__", "") == "run"
            assert isinstance(job.func.__self__, JobRunner)
    finally:
        scheduler.shutdown(wait=True)
    assert not scheduler.running
