"""A real projector process killed with SIGKILL mid-page resumes with exact counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from domain.application import ResultsApp
from service.database import view_database
from service.samples import batches

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
BATCHES = 240
BATCH_SIZE = 500


def _fill(app: ResultsApp) -> int:
    team, _ = app.create_team("kill-test")
    account, _ = app.link_account_role(
        team.id, "arn:aws:iam::123456789012:role/k", verified=False, actor="test"
    )
    plan, _ = app.create_plan(team.id, account.id, "p")
    total = 0
    for run_no in range(4):
        run, _ = app.start_run(team.id, plan.id)
        for batch in batches(BATCHES // 4 * BATCH_SIZE, BATCH_SIZE, seed=run_no):
            total += app.record_results(team.id, run.id, batch).accepted
        app.complete_run(team.id, run.id, "succeeded")
    return total


def _expected_rows_up_to(app: ResultsApp, position: int) -> int:
    """Ground truth from the log: results in batch events at or before ``position``."""
    count, start = 0, 0
    while True:
        page = app.recorder.select_notifications(
            start=start, limit=500, stop=position, inclusive_of_start=False
        )
        if not page:
            return count
        for notification in page:
            if notification.topic == "resultsvc/ResultBatch/Recorded":
                count += len(app.mapper.to_domain_event(notification).results)  # type: ignore[attr-defined]
        start = page[-1].id


def _view_state(database_url: str) -> tuple[int, int, str]:
    db = view_database(database_url)
    conn = db.connect()
    try:
        with db.transaction(conn, write=False) as cur:
            row = cur.fetchone(
                "SELECT position, state FROM projection_tracking WHERE view = 'display'"
            )
            rows = cur.fetchone("SELECT count(*) FROM view_results")
        assert row is not None and rows is not None
        return int(row[0]), int(rows[0]), str(row[1])
    finally:
        conn.close()


def test_sigkill_mid_page_then_restart_loses_and_duplicates_nothing(
    app: ResultsApp, database_url: str, tmp_path: Path
) -> None:
    total = _fill(app)
    head = app.head_position()
    env = {**os.environ, "RESULTSVC_DATABASE_URL": database_url}
    projector = subprocess.Popen(
        [RESULTSVC, "projections", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Wait for the first committed page, then kill while later pages are
        # being written. Polling a condition, bounded: not a sleep for a race.
        deadline = time.monotonic() + 120
        position = 0
        while time.monotonic() < deadline:
            try:
                position, _, _ = _view_state(database_url)
            except Exception:  # tables not created yet
                position = 0
            if position > 0:
                break
            time.sleep(0.01)
        assert 0 < position < head, "the projector must be caught mid-log"
        projector.send_signal(signal.SIGKILL)
        projector.wait(timeout=30)
    finally:
        if projector.poll() is None:
            projector.kill()
            projector.wait()
    assert projector.returncode == -signal.SIGKILL

    # What survived is exactly the committed pages: rows match the position.
    position, rows, state = _view_state(database_url)
    assert state == "running"
    assert position < head
    assert rows == _expected_rows_up_to(app, position)

    resumed = subprocess.run(
        [RESULTSVC, "projections", "run", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    position, rows, state = _view_state(database_url)
    assert (position, rows, state) == (head, total, "running")
