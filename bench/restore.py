"""Restore benchmark: the restore drill beside age -d | zstd -d | psql of a pg_dump.

    .venv/bin/python bench/restore.py [--findings 1000000]

1. ``--findings`` findings go into a scratch PostgreSQL database through the
   application (not timed); a full backup is taken to a ``file://`` folder.
2. Baseline, same run: ``pg_dump | zstd -3 | age`` of that database (not
   timed), then ``age -d | zstd -d | psql`` into an empty database (timed).
3. ``resultsvc restore-drill --latest --json`` in its own process: verify,
   decrypt and load into a scratch PostgreSQL database, rebuild the views,
   compare with the live store. Timed whole, and step by step from its report.

Goal: the drill at most 2x the baseline (beyond: 1x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.backup import fill, measured, pg_dump_pipeline
from bench.common import Stopwatch, scratch_database
from service.database import parse_database_url

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")


def restore_dump(url: str, dump: Path, identity: Path) -> float:
    """Seconds to decrypt, decompress and load the dump into a new empty database."""
    config = parse_database_url(url)
    name = f"{config.dbname}_restored"
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        command = (
            f"age -d -i {identity} {dump} | zstd -d -q"
            f" | psql -q -h {config.host} -p {config.port} -U {config.user} -d {name}"
            " -v ON_ERROR_STOP=1 > /dev/null"
        )
        with Stopwatch() as sw:
            subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
        return sw.seconds
    finally:
        with psycopg.connect(config.conninfo(), autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--findings", type=int, default=1_000_000)
    args = parser.parse_args()

    with scratch_database("bench_restore") as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with Stopwatch() as filled:
            fill(url, args.findings, seed=1)
        print(f"findings: {args.findings:,} in PostgreSQL (filled in {filled.seconds:.0f} s)")
        env = {
            **os.environ,
            "RESULTSVC_DATABASE_URL": url,
            "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{folder}/master.key",
        }
        measured([RESULTSVC, "backup", "run", "--full", "--json"], env, folder)
        pg_dump_pipeline(url, folder)
        baseline = restore_dump(url, folder / "dump.zst.age", folder / "age.key")
        print(f"  age -d | zstd -d | psql     : {baseline:6.2f} s")
        seconds, rss, out = measured(
            [RESULTSVC, "restore-drill", "--latest", "--json"], env, folder
        )
        report = json.loads(out)
        assert report["passed"], report["reason"]
        steps = ", ".join(f"{name} {value:.2f} s" for name, value in report["steps"].items())
        print(
            f"  restore drill (whole process): {seconds:6.2f} s  peak RSS {rss / 1024:.0f} MiB"
            f"   ratio {seconds / baseline:.2f}  (goal <= 2, beyond: 1)"
        )
        print(
            f"  the drill's own total (RTO)  : {report['rto_seconds']:6.2f} s"
            f"   ratio {report['rto_seconds'] / baseline:.2f}"
        )
        print(f"  steps: {steps}")
        print(
            f"  restored {report['events_restored']:,} events, compared"
            f" {report['aggregates_compared']:,} aggregates, {len(report['mismatches'])} mismatches"
        )


if __name__ == "__main__":
    main()
