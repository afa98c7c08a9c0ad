"""Backup benchmark: full and incremental backups beside pg_dump | zstd -3 | age.

    .venv/bin/python bench/backup.py [--findings 1000000] [--skip-s3]

1. ``--findings`` realistic findings go into a scratch PostgreSQL database
   through the application (not timed).
2. Baseline, same run: ``pg_dump`` of that database piped through
   ``zstd -3`` and ``age -r <recipient>`` into a file.
3. ``resultsvc backup run --full`` to a ``file://`` folder, then to an S3
   server (``moto_server`` on loopback, a bucket with Object Lock), each in
   its own process, timed, with its peak RSS.
4. +1% findings, then ``resultsvc backup run`` (incremental) to the folder.

Goals: full backup at most 1.5x the pg_dump pipeline; incremental at most
0.05x the full; peak RSS under 200 MiB, the same at 1M and 4M findings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stopwatch, scratch_database
from service.database import open_application, parse_database_url
from service.samples import batches

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def fill(url: str, findings: int, seed: int) -> None:
    app = open_application(url)
    try:
        team, _ = app.create_team(f"bench-{seed}")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/bench", verified=False, actor="bench"
        )
        per_plan = max(1, findings // 4)
        for plan_no in range(4):
            plan, _ = app.create_plan(team.id, account.id, f"plan-{plan_no}")
            run, _ = app.start_run(team.id, plan.id)
            for batch in batches(per_plan, 500, seed=seed * 10 + plan_no):
                app.record_results(team.id, run.id, batch)
            app.complete_run(team.id, run.id, "succeeded")
    finally:
        app.close()


def measured(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    """Seconds, peak RSS (KiB) and stdout of a command in its own process."""
    with Stopwatch() as sw:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    rss = int(done.stderr.strip().splitlines()[-1])
    return sw.seconds, rss, done.stdout


def pg_dump_pipeline(url: str, folder: Path) -> tuple[float, int]:
    if shutil.which("age") is None or shutil.which("age-keygen") is None:
        raise SystemExit("the baseline needs age: apt-get install age")
    identity = folder / "age.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(
        ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    config = parse_database_url(url)
    out = folder / "dump.zst.age"
    command = (
        f"pg_dump -h {config.host} -p {config.port} -U {config.user} {config.dbname}"
        f" | zstd -3 -q | age -r {recipient} > {out}"
    )
    with Stopwatch() as sw:
        subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
    return sw.seconds, out.stat().st_size


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    with scratch_database("bench_backup") as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with Stopwatch() as filled:
            fill(url, args.findings, seed=1)
        print(f"findings: {args.findings:,} in PostgreSQL (filled in {filled.seconds:.0f} s)")

        dump_seconds, dump_bytes = pg_dump_pipeline(url, folder)
        print(
            f"  pg_dump | zstd -3 | age      : {dump_seconds:6.2f} s  {dump_bytes / 2**20:7.1f} MiB"
        )

        env = {
            **os.environ,
            "RESULTSVC_DATABASE_URL": url,
            "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{folder}/master.key",
        }
        seconds, rss, out = measured([RESULTSVC, "backup", "run", "--full", "--json"], env, folder)
        full = json.loads(out)
        print(
            f"  full backup, file://         : {seconds:6.2f} s"
            f"  {full['bytes_stored'] / 2**20:7.1f} MiB  peak RSS {rss / 1024:.0f} MiB"
            f"   ratio {seconds / dump_seconds:.2f}"
            "  (goal <= 1.5)"
        )
        full_seconds = seconds

        if not args.skip_s3:
            server, endpoint = start_moto()
            try:
                import boto3

                s3_env = {
                    **env,
                    "RESULTSVC_BACKUP_URL": "s3://bench-backups/prod",
                    "AWS_ENDPOINT_URL": endpoint,
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_REGION": "us-east-1",
                }
                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    region_name="us-east-1",
                    aws_access_key_id="bench",
                    aws_secret_access_key="bench",
                ).create_bucket(Bucket="bench-backups", ObjectLockEnabledForBucket=True)
                seconds, rss, out = measured(
                    [RESULTSVC, "backup", "run", "--full", "--json"], s3_env, folder
                )
                print(
                    f"  full backup, S3 (moto)       : {seconds:6.2f} s"
                    f"  peak RSS {rss / 1024:.0f} MiB   ratio {seconds / dump_seconds:.2f}"
                    "  (the test server is the bottleneck)"
                )
            finally:
                server.terminate()
                server.wait(timeout=30)

        fill(url, max(1, args.findings // 100), seed=2)
        seconds, rss, out = measured([RESULTSVC, "backup", "run", "--json"], env, folder)
        incremental = json.loads(out)
        print(
            f"  +1% then incremental, file://: {seconds:6.2f} s"
            f"  {incremental['bytes_stored'] / 2**20:7.1f} MiB  peak RSS {rss / 1024:.0f} MiB"
            f"   ratio to full {seconds / full_seconds:.3f} (whole processes)"
        )
        inner = incremental["duration_seconds"] / full["duration_seconds"]
        print(
            "  the backups alone (writer, without process start):"
            f" full {full['duration_seconds']:.2f} s,"
            f" incremental {incremental['duration_seconds']:.3f} s,"
            f" ratio {inner:.3f}  (goal <= 0.05)"
        )
        print(
            "  note: each backup runs as `resultsvc backup run` in its own process (Python start-up"
            " and imports, ~0.5 s, included)"
        )


if __name__ == "__main__":
    main()
