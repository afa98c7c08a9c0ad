"""HTTP benchmark: ingest through a real uvicorn, and read latency on a big run.

    .venv/bin/python bench/http_ingest.py [--findings 200000] [--clients 4]
                                          [--view-rows 5000000] [--queries 300]

1. Ingest: ``resultsvc serve`` in its own process on loopback (PostgreSQL),
   ``--clients`` threads posting batches of 500 findings (bodies encoded
   beforehand, keep-alive connections). Beside it, in the same run, the
   application API rate of ``bench/ingest.py`` on the same data. Goal: HTTP
   at least 0.5 of the application API.
2. Reads: ``--view-rows`` results of one run written into the views with
   ``COPY`` (this measures queries, not projection), then
   ``GET /v1/runs/{id}/results?limit=100`` for the first page and for a deep
   page (a cursor near the end), one request at a time, measured at the
   client. Goal: p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stopwatch, scratch_database
from bench.ingest import bench_app_ingest
from projections.queries import encode_cursor
from projections.views import RESULT_COLUMNS
from service.database import parse_database_url
from service.runtime import Runtime
from service.samples import batches, findings
from service.settings import Settings

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    url: str, port: int, env: dict[str, str] | None = None, log: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``resultsvc serve`` on ``url`` (plus ``env``), its output to ``log``; up when it answers."""
    server = subprocess.Popen(
        [RESULTSVC, "serve", "--port", str(port)],
        env={**os.environ, **(env or {}), "RESULTSVC_DATABASE_URL": url},
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("server did not start")


def prepare_team(url: str) -> tuple[str, str, str]:
    """A team, an account, a plan and an ingest+read token, straight through the runtime."""
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": url})) as runtime:
        team, _ = runtime.app.create_team("http-bench")
        account, _ = runtime.app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/bench", verified=False, actor="bench"
        )
        plan, _ = runtime.app.create_plan(team.id, account.id, "bench")
        token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read"}))
        return str(team.id), str(plan.id), token


def request(
    conn: http.client.HTTPConnection, method: str, path: str, token: str, body: bytes | None = None
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def bench_http_ingest(port: int, plan: str, token: str, bodies: list[bytes], clients: int) -> float:
    """Seconds for ``clients`` threads to post every body, each thread on its own run."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    runs = []
    for _ in range(clients):
        status, body = request(conn, "POST", f"/v1/plans/{plan}/runs", token)
        assert status == 201, body
        runs.append(orjson.loads(body)["id"])
    shares = [bodies[i::clients] for i in range(clients)]
    errors: list[str] = []

    def client(run: str, share: list[bytes]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        for payload in share:
            status, answer = request(connection, "POST", f"/v1/runs/{run}/results", token, payload)
            if status != 201:
                errors.append(f"{status} {answer[:200]!r}")
                return

    threads = [
        threading.Thread(target=client, args=(run, share))
        for run, share in zip(runs, shares, strict=True)
    ]
    with Stopwatch() as sw:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise SystemExit(f"ingest failed: {errors[0]}")
    return sw.seconds


def fill_views(url: str, team: str, plan: str, rows: int) -> str:
    """One run with ``rows`` results written straight into the view tables."""
    run = str(uuid4())
    config = parse_database_url(url)
    sample = list(findings(1000, seed=5))
    with psycopg.connect(config.conninfo()) as conn:
        conn.execute(
            "INSERT INTO view_runs (run_id, team_id, plan_id, status, started_at, total)"
            " VALUES (%s, %s, %s, 'succeeded', '2026-11-01T00:00:00.000000Z', %s)",
            (run, team, plan, rows),
        )
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY view_results ({', '.join(RESULT_COLUMNS)}) FROM STDIN") as copy,
        ):
            for seq in range(rows):
                f = sample[seq % 1000]
                copy.write_row(
                    (
                        run,
                        seq,
                        team,
                        plan,
                        f["rule_id"],
                        f["title"],
                        f["severity"],
                        f["status"],
                        f["resource_arn"],
                        f["region"],
                        f["message"],
                        f["observed_at"],
                        None,
                    )
                )
        conn.commit()
        conn.execute("ANALYZE view_results")
        conn.commit()
    return run


def latencies(port: int, token: str, path: str, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(20):  # warm-up: connections, plans, caches
        request(conn, "GET", path, token)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        status, body = request(conn, "GET", path, token)
        samples.append((time.perf_counter() - start) * 1000)
        assert status == 200, body[:200]
    return samples


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.2f} ms  p99 {p99:.2f} ms  max {ordered[-1]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--findings", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--view-rows", type=int, default=5_000_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()

    all_batches = list(batches(args.findings, 500, seed=11))
    bodies = [orjson.dumps({"results": batch}) for batch in all_batches]
    with scratch_database("bench_http") as url:
        app_seconds = bench_app_ingest(url, all_batches)
        team, plan, token = prepare_team(url)
        port = free_port()
        server = start_server(url, port)
        try:
            http_seconds = bench_http_ingest(port, plan, token, bodies, args.clients)
            print(f"ingest: {args.findings} findings in batches of 500 (PostgreSQL)")
            app_rate, http_rate = args.findings / app_seconds, args.findings / http_seconds
            print(f"  application API       : {app_rate:10,.0f} findings/s")
            print(f"  HTTP, {args.clients} clients       : {http_rate:10,.0f} findings/s")
            print(f"  ratio HTTP/application: {http_rate / app_rate:.2f}   (goal >= 0.5)")

            with Stopwatch() as fill:
                run = fill_views(url, team, plan, args.view_rows)
            filled = f"{fill.seconds:.0f} s to COPY"
            print(f"reads: {args.view_rows:,} results in one run's view ({filled})")
            first = latencies(port, token, f"/v1/runs/{run}/results?limit=100", args.queries)
            deep_cursor = encode_cursor("results", [args.view_rows - 150])
            deep = latencies(
                port, token, f"/v1/runs/{run}/results?limit=100&cursor={deep_cursor}", args.queries
            )
            filtered = latencies(
                port,
                token,
                f"/v1/runs/{run}/results?limit=100&severity=low&cursor={deep_cursor}",
                args.queries,
            )
            print(f"  first page           : {describe(first)}   (goal p99 < 10 ms)")
            print(f"  deep page (cursor)   : {describe(deep)}")
            print(f"  deep page, severity  : {describe(filtered)}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
