"""Projection benchmark: findings/s from the event log into the views, and view lag.

    .venv/bin/python bench/projection.py [--findings 1000000] [--lag-batches 400]

1. Throughput. ``--findings`` realistic findings in batches of ``--batch``
   (spread over ``--runs`` runs of ``--plans`` plans) go into the PostgreSQL
   event store first, through ``ResultsApp.record_results``, in a child
   process (timed and printed, not the figure). Then, timed, the whole log is
   projected into the views by ``Projector.catch_up()`` in this process.
   Baseline in the same run: a psycopg ``COPY`` of the same rows (the 13
   ``view_results`` columns, built beforehand) into a table created by the
   same DDL as ``view_results`` (same column types, primary key and indexes).
   Both timed sections start after a CHECKPOINT; afterwards the two tables
   are checked to hold exactly the same rows. Goal: projection at least 0.3
   of COPY. The peak RSS of this process (``getrusage``) is printed after
   the projection; the ingest ran in a child process, so it is the
   projector's own peak.
2. Lag. A projector runs beside an ingest loop (``--lag-batches`` batches of
   ``--batch`` through ``record_results``, one thread, as fast as it goes):
   by default the real ``resultsvc projections run`` in its own process
   (LISTEN/NOTIFY on PostgreSQL, stopped with SIGTERM), or with ``--projector
   thread`` ``Projector.run`` in a thread of this process. For every append,
   the lag is the time from ``record_results`` returning (with its position)
   to a probe thread seeing every view's ``projection_tracking`` position at
   or past it (one small query every ``--poll-ms``, on its own connection;
   the figure is an upper bound by at most one poll interval plus a query).
   Reported per view and for all views together, which is what
   ``DisplayQueries.wait_for`` (read-your-writes) waits for. Goal: p99 under
   1 s. ``--lag-rate`` paces the ingest instead of running it flat out.

Python threads share the GIL: the ingest loop and the probe share this
process's interpreter, and in ``--projector thread`` mode the projector
shares it too, so that mode measures contention for one interpreter as much
as lag. The default (a separate projector process, as deployed) avoids that;
everything still shares the machine's cores with PostgreSQL.

``--profile`` runs the timed projection under cProfile and prints the top
costs (the rate printed with it is then lowered by the profiler's overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import multiprocessing
import os
import pstats
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stopwatch, scratch_database
from domain.findings import validate_batch
from projections.projector import Projector
from projections.schema import DISPLAY_TABLES, ddl
from projections.views import RESULT_COLUMNS, result_rows
from service.database import open_application, parse_database_url, view_database
from service.samples import batches

SEED = 17
LAG_SEED = 23
ROLE_ARN = "arn:aws:iam::123456789012:role/bench"
COPY_SUFFIX = "_copy"
RESULTSVC = Path(sys.executable).parent / "resultsvc"
GIL_NOTE = (
    "ingest loop and lag probe are threads of this process (one GIL); the projector is {where}"
)

# (run_id, team_id, plan_id) as the views store them (text)
RunKey = tuple[str, str, str]


# ------------------------------------------------------------------ helpers


def batch_count(findings: int, batch: int) -> int:
    return math.ceil(findings / batch)


def runs_layout(findings: int, batch: int, runs: int) -> tuple[int, int]:
    """(runs actually used, batches per run): batch k goes to run k // per_run."""
    total = batch_count(findings, batch)
    runs = max(1, min(runs, total))
    per_run = math.ceil(total / runs)
    return math.ceil(total / per_run), per_run


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def proc_peak_rss_mib(pid: int) -> float | None:
    """VmHWM of another process (Linux), or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def settle(url: str, vacuum: bool = False) -> None:
    """Quiet the server before a timed section: statistics and dirty pages dealt with now."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        if vacuum:
            conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def conninfo(url: str) -> str:
    return parse_database_url(url).conninfo()


# --------------------------------------------------------- part 1: the fill


def fill(url: str, findings: int, batch: int, runs: int, plans: int) -> tuple[list[RunKey], float]:
    """Record the findings through the application API (run in a child process).

    Returns the runs, in the order their batches were recorded, and the seconds taken.
    """
    app = open_application(url)
    try:
        used_runs, per_run = runs_layout(findings, batch, runs)
        team, _ = app.create_team("bench-projection")
        account, _ = app.link_account_role(team.id, ROLE_ARN, verified=False, actor="bench")
        plan_ids = [app.create_plan(team.id, account.id, f"plan-{p}")[0].id for p in range(plans)]
        keys: list[RunKey] = []
        run_id: Any = None
        with Stopwatch() as sw:
            for k, chunk in enumerate(batches(findings, batch, seed=SEED)):
                if k % per_run == 0:
                    if run_id is not None:
                        app.complete_run(team.id, run_id, "succeeded")
                    plan_id = plan_ids[len(keys) % plans]
                    run_id = app.start_run(team.id, plan_id)[0].id
                    keys.append((str(run_id), str(team.id), str(plan_id)))
                app.record_results(team.id, run_id, chunk)
            app.complete_run(team.id, run_id, "succeeded")
        assert len(keys) == used_runs
        return keys, sw.seconds
    finally:
        app.close()


def fill_in_child(
    url: str, findings: int, batch: int, runs: int, plans: int
) -> tuple[list[RunKey], float]:
    """``fill`` in a spawned process, so this process's peak RSS is the projector's."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fill, url, findings, batch, runs, plans).result()


# ---------------------------------------------------- part 1: projection


def project(url: str, profile: int) -> tuple[dict[str, float], int, str]:
    """Catch every view up with the log; (seconds per view, notifications, profile text)."""
    app = open_application(url)
    views = view_database(url)
    projector = Projector(app, views)
    try:
        projector.ensure_schema()
        profiler = cProfile.Profile() if profile else None
        seconds: dict[str, float] = {}
        notifications = 0
        for view in projector.views:
            if profiler is not None:
                profiler.enable()
            with Stopwatch() as sw:
                notifications = max(notifications, projector.catch_up([view]))
            if profiler is not None:
                profiler.disable()
            seconds[view.name] = sw.seconds
        states = {s.view: (s.state, s.lag) for s in projector.status()}
        assert all(state == ("running", 0) for state in states.values()), states
        text = ""
        if profiler is not None:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(profile)
            stats.sort_stats("cumulative").print_stats(profile)
            text = out.getvalue()
        return seconds, notifications, text
    finally:
        projector.close()
        views.close()
        app.close()


# -------------------------------------------------------- part 1: baseline


def baseline_rows(
    keys: list[RunKey], findings: int, batch: int, runs: int
) -> list[tuple[Any, ...]]:
    """The rows the display view writes for the fill, built as ``DisplayView`` builds them."""
    _, per_run = runs_layout(findings, batch, runs)
    rows: list[tuple[Any, ...]] = []
    for k, chunk in enumerate(batches(findings, batch, seed=SEED)):
        run_id, team_id, plan_id = keys[k // per_run]
        rows.extend(result_rows(run_id, team_id, plan_id, k % per_run + 1, validate_batch(chunk)))
    return rows


def bench_copy(url: str, rows: list[tuple[Any, ...]]) -> float:
    """Seconds to COPY the rows into a fresh table identical to ``view_results``."""
    (table,) = (t for t in DISPLAY_TABLES if t.name == "view_results")
    target = table.name + COPY_SUFFIX
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(target), sql.SQL(", ").join(map(sql.Identifier, RESULT_COLUMNS))
    )
    with psycopg.connect(conninfo(url)) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(target)))
        for create in ddl(table, "postgresql", COPY_SUFFIX):
            conn.execute(create)  # type: ignore[arg-type]
        conn.commit()
        with Stopwatch() as sw:
            with conn.cursor() as cur, cur.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
    return sw.seconds


def check_same_rows(url: str, expected: int) -> None:
    """The view and the baseline hold the same rows (same count, nothing in one only)."""
    with psycopg.connect(conninfo(url)) as conn:
        conn.execute("SET work_mem = '256MB'")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM view_results),"
            f" (SELECT count(*) FROM view_results{COPY_SUFFIX}),"
            " (SELECT sum(total) FROM view_runs)"
        ).fetchone()
        assert counts is not None and tuple(counts) == (expected, expected, expected), counts
        only = conn.execute(
            "SELECT count(*) FROM"
            f" (TABLE view_results EXCEPT ALL TABLE view_results{COPY_SUFFIX}) AS only_in_view"
        ).fetchone()
        assert only is not None and only[0] == 0, f"{only} rows differ from the baseline's"
        conn.execute(f"DROP TABLE view_results{COPY_SUFFIX}")
        conn.commit()


# -------------------------------------------------------------- part 2: lag


class LagProbe(threading.Thread):
    """Sees when each view reaches each appended position; keeps the times seen.

    An append is visible on the views (``DisplayQueries.wait_for``) once
    every view has reached it: its lag is the largest of its per-view lags.
    """

    def __init__(self, url: str, poll_seconds: float) -> None:
        super().__init__(name="lag-probe", daemon=True)
        self.conninfo = conninfo(url)
        self.poll_seconds = poll_seconds
        self.appended: list[tuple[int, float]] = []  # (position, returned at), in order
        self.seen: dict[str, list[float]] = {}  # view -> when it reached appended[i]
        self.polls = 0
        self.finish = threading.Event()
        self.error: BaseException | None = None

    def note(self, position: int, returned_at: float) -> None:
        self.appended.append((position, returned_at))

    def run(self) -> None:
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                while True:
                    done = self.finish.is_set()
                    rows = conn.execute("SELECT view, position FROM projection_tracking").fetchall()
                    now = time.perf_counter()
                    self.polls += 1
                    appended = len(self.appended)
                    for view, position in rows:
                        seen = self.seen.setdefault(view, [])
                        while len(seen) < appended and self.appended[len(seen)][0] <= position:
                            seen.append(now)
                    if done:
                        return
                    time.sleep(self.poll_seconds)
        except BaseException as error:  # reported by the main thread
            self.error = error

    def lags(self) -> dict[str, list[float]]:
        """Seconds from each append to its view(s): per view, and ``all`` (the largest)."""
        assert all(len(seen) == len(self.appended) for seen in self.seen.values())
        per_view = {
            view: [at - returned for at, (_, returned) in zip(seen, self.appended, strict=True)]
            for view, seen in sorted(self.seen.items())
        }
        per_view["all views"] = [max(lags) for lags in zip(*per_view.values(), strict=True)]
        return per_view


class ProjectorUnderTest:
    """The live projector: ``resultsvc projections run`` (process) or a thread here."""

    def __init__(self, url: str, mode: str, workdir: Path) -> None:
        self.url = url
        self.mode = mode
        self.log = workdir / "projector.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.peak_rss: float | None = None
        if mode == "process":
            env = {**os.environ, "RESULTSVC_DATABASE_URL": url}
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(
                    [str(RESULTSVC), "projections", "run"],
                    cwd=workdir,  # no stray .env
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        else:
            self.app = open_application(url)
            self.views = view_database(url)
            self.projector = Projector(self.app, self.views)
            self.thread = threading.Thread(
                target=self.projector.run, args=(self.stop_event,), name="projector", daemon=True
            )
            self.thread.start()

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.thread is not None and self.thread.is_alive()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            self.peak_rss = proc_peak_rss_mib(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif self.thread is not None:
            self.stop_event.set()
            self.thread.join(timeout=30)
            self.views.close()
            self.app.close()


def wait_until_views_reach(
    url: str, position: int, projector: ProjectorUnderTest, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT min(position) FROM projection_tracking").fetchone()
            if row is not None and row[0] is not None and row[0] >= position:
                return
            if not projector.alive():
                raise RuntimeError(f"projector exited:\n{projector.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"views did not reach {position} in {timeout:.0f} s")
            time.sleep(0.01)


def bench_lag(
    url: str, lag_batches: int, batch: int, mode: str, poll_seconds: float, rate: float
) -> dict[str, Any]:
    cut = list(batches(lag_batches * batch, batch, seed=LAG_SEED))
    app = open_application(url)
    try:
        team, _ = app.create_team("bench-lag")
        account, _ = app.link_account_role(team.id, ROLE_ARN, verified=False, actor="bench")
        plan, _ = app.create_plan(team.id, account.id, "lag")
        run, _ = app.start_run(team.id, plan.id)
        with tempfile.TemporaryDirectory(prefix="bench_projection_") as workdir:
            projector = ProjectorUnderTest(url, mode, Path(workdir))
            try:
                # Warm-up: one append seen by the views proves the projector is
                # listening (it LISTENs before its first catch-up).
                warm = app.record_results(team.id, run.id, cut[0])
                wait_until_views_reach(url, warm.position, projector, timeout=120)
                probe = LagProbe(url, poll_seconds)
                probe.start()
                last = warm.position
                interval = batch / rate if rate > 0 else 0.0
                with Stopwatch() as ingest:
                    start = time.perf_counter()
                    for number, chunk in enumerate(cut[1:]):
                        if interval:  # paced: batch n is due at start + n * interval
                            time.sleep(max(0.0, start + number * interval - time.perf_counter()))
                        last = app.record_results(team.id, run.id, chunk).position
                        probe.note(last, time.perf_counter())
                with Stopwatch() as drain:
                    wait_until_views_reach(url, last, projector, timeout=600)
                probe.finish.set()
                probe.join(timeout=30)
                if probe.error is not None:
                    raise probe.error
            finally:
                projector.stop()
    finally:
        app.close()
    return {
        "appends": len(cut) - 1,
        "ingest_seconds": ingest.seconds,
        "ingest_rate": (len(cut) - 1) * batch / ingest.seconds,
        "drain_seconds": drain.seconds,
        "polls": probe.polls,
        "lags": {view: sorted(lags) for view, lags in probe.lags().items()},
        "projector_rss": projector.peak_rss,
    }


# -------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--plans", type=int, default=4)
    parser.add_argument("--lag-batches", type=int, default=400)
    parser.add_argument(
        "--lag-rate",
        type=float,
        default=0,
        metavar="FINDINGS_PER_S",
        help="pace the lag test's ingest (default: as fast as possible)",
    )
    parser.add_argument("--projector", choices=("process", "thread"), default="process")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="lag probe interval")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile the projection, top N"
    )
    parser.add_argument("--skip-lag", action="store_true")
    args = parser.parse_args()
    if args.lag_batches < 2 and not args.skip_lag:
        parser.error("--lag-batches must be at least 2 (one warm-up, then the measured ones)")

    used_runs, _ = runs_layout(args.findings, args.batch, args.runs)
    print(
        f"findings: {args.findings:,} in batches of {args.batch}, {used_runs} runs over"
        f" {args.plans} plans (PostgreSQL)",
        flush=True,
    )
    with scratch_database("bench_projection") as url:
        keys, fill_seconds = fill_in_child(url, args.findings, args.batch, args.runs, args.plans)
        print(
            f"  event store filled through the API in {fill_seconds:.1f} s"
            f" ({args.findings / fill_seconds:,.0f} findings/s, child process, not the figure)",
            flush=True,
        )

        settle(url, vacuum=True)
        rss_before = peak_rss_mib()
        seconds, notifications, profile_text = project(url, args.profile)
        rss_after = peak_rss_mib()
        projection_seconds = sum(seconds.values())
        projection_rate = args.findings / projection_seconds
        per_view = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
        print(
            f"  projection (Projector.catch_up, {notifications:,} notifications):"
            f" {projection_seconds:.1f} s ({per_view})"
            + ("  [under cProfile]" if args.profile else ""),
            flush=True,
        )
        print(
            f"  peak RSS of this process: {rss_before:,.0f} MiB before projecting,"
            f" {rss_after:,.0f} MiB after",
            flush=True,
        )

        rows = baseline_rows(keys, args.findings, args.batch, args.runs)
        settle(url)
        copy_seconds = bench_copy(url, rows)
        del rows
        copy_rate = args.findings / copy_seconds
        check_same_rows(url, args.findings)
        ratio = projection_rate / copy_rate
        print(f"  projection      {projection_rate:10,.0f} findings/s")
        print(f"  COPY baseline   {copy_rate:10,.0f} rows/s (same rows, table and indexes)")
        print(f"  ratio           {ratio:10.2f}   (goal >= 0.3: {verdict(ratio >= 0.3)})")
        if profile_text:
            print(profile_text)

        if args.skip_lag:
            return
        where = (
            "`resultsvc projections run`, a separate process"
            if args.projector == "process"
            else "a thread of this process too (contends for the GIL)"
        )
        print(
            f"lag: {args.lag_batches} batches of {args.batch} appended"
            + (
                f" at {args.lag_rate:,.0f} findings/s,"
                if args.lag_rate
                else " as fast as possible,"
            )
            + f" projector: {args.projector}",
            flush=True,
        )
        lag = bench_lag(
            url, args.lag_batches, args.batch, args.projector, args.poll_ms / 1000, args.lag_rate
        )
        print(f"  note: {GIL_NOTE.format(where=where)}")
        print(
            f"  ingest during the test: {lag['ingest_rate']:,.0f} findings/s"
            f" ({lag['ingest_seconds']:.1f} s); views caught up {lag['drain_seconds']:.2f} s"
            " after the last append"
        )
        print(
            f"  append returned -> view(s) at its position, {lag['appends']} appends,"
            f" probe every {args.poll_ms:g} ms ({lag['polls']:,} polls):"
        )
        for view, lags in lag["lags"].items():
            print(
                f"    {view:<11} p50 {percentile(lags, 0.5) * 1000:7,.0f} ms"
                f"   p99 {percentile(lags, 0.99) * 1000:7,.0f} ms"
                f"   max {lags[-1] * 1000:7,.0f} ms"
            )
        p99 = percentile(lag["lags"]["all views"], 0.99)
        print(f"    goal: p99 (all views, what wait_for sees) < 1 s: {verdict(p99 < 1.0)}")
        if lag["projector_rss"] is not None:
            print(f"  projector process peak RSS: {lag['projector_rss']:,.0f} MiB")


if __name__ == "__main__":
    main()
