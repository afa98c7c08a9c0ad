"""Ingest benchmark: findings/s through the application API vs a plain COPY.

    .venv/bin/python bench/ingest.py [--findings 200000] [--batch 500]

1. ``--findings`` realistic findings in batches of ``--batch`` through
   ``ResultsApp.record_results`` (validation, events, one transaction per
   batch) into PostgreSQL; then, in the same run, a psycopg ``COPY`` of the
   same findings (as JSON) into a plain table. Goal: at least 0.5 of COPY.
2. A 2,000-batch run: the time of the last 100 batches against the first
   100. Appends must stay O(batch), so the ratio should be close to 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stopwatch, scratch_database
from service.database import open_application, parse_database_url
from service.samples import batches


def bench_app_ingest(url: str, all_batches: list[list[dict[str, object]]]) -> float:
    """Seconds to record every batch through the application API, one run."""
    app = open_application(url)
    try:
        team, _ = app.create_team("bench")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/bench", verified=False, actor="bench"
        )
        plan, _ = app.create_plan(team.id, account.id, "bench")
        run, _ = app.start_run(team.id, plan.id)
        with Stopwatch() as sw:
            for batch in all_batches:
                app.record_results(team.id, run.id, batch)
        assert app.get_run(team.id, run.id).total == sum(len(b) for b in all_batches)
        return sw.seconds
    finally:
        app.close()


def bench_copy(url: str, all_batches: list[list[dict[str, object]]]) -> float:
    """Seconds to COPY the same findings as JSON into a fresh plain table."""
    config = parse_database_url(url)
    with psycopg.connect(config.conninfo()) as conn:
        conn.execute("DROP TABLE IF EXISTS findings_copy")
        conn.execute("CREATE TABLE findings_copy (id bigserial PRIMARY KEY, finding jsonb)")
        conn.commit()
        with Stopwatch() as sw:
            with conn.cursor() as cur, cur.copy("COPY findings_copy (finding) FROM STDIN") as copy:
                for batch in all_batches:
                    for finding in batch:
                        copy.write_row((json.dumps(finding),))
            conn.commit()
    return sw.seconds


def bench_long_run(url: str, batches_in_run: int, batch_size: int) -> tuple[float, float]:
    app = open_application(url)
    try:
        team, _ = app.create_team("long-run")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/bench", verified=False, actor="bench"
        )
        plan, _ = app.create_plan(team.id, account.id, "long")
        run, _ = app.start_run(team.id, plan.id)
        cut = list(batches(batches_in_run * batch_size, batch_size, seed=3))
        first = last = 0.0
        for i, batch in enumerate(cut):
            with Stopwatch() as sw:
                app.record_results(team.id, run.id, batch)
            if i < 100:
                first += sw.seconds
            elif i >= batches_in_run - 100:
                last += sw.seconds
        return first, last
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--findings", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--long-run-batches", type=int, default=2000)
    parser.add_argument("--long-run-batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="app/COPY pairs; median reported")
    args = parser.parse_args()

    all_batches = list(batches(args.findings, args.batch, seed=11))
    print(f"findings: {args.findings} in batches of {args.batch} (PostgreSQL)")
    pairs = []
    with scratch_database("bench_ingest") as url:
        for round_no in range(1, args.rounds + 1):
            app_rate = args.findings / bench_app_ingest(url, all_batches)
            copy_rate = args.findings / bench_copy(url, all_batches)
            pairs.append((app_rate / copy_rate, app_rate, copy_rate))
            print(
                f"  round {round_no}: application API {app_rate:9,.0f}/s"
                f"  COPY {copy_rate:9,.0f}/s  ratio {app_rate / copy_rate:.2f}"
            )
        first, last = bench_long_run(url, args.long_run_batches, args.long_run_batch_size)
    ratio, app_rate, copy_rate = sorted(pairs)[len(pairs) // 2]
    print(f"  median round    : application API {app_rate:,.0f} findings/s")
    print(f"                    COPY baseline   {copy_rate:,.0f} findings/s")
    print(f"                    ratio app/COPY  {ratio:.2f}   (goal >= 0.5)")
    print(
        f"long run: {args.long_run_batches} batches of {args.long_run_batch_size}: "
        f"first 100 {first:.3f} s, last 100 {last:.3f} s, ratio last/first {last / first:.2f} "
        "(goal ~1)"
    )


if __name__ == "__main__":
    main()
