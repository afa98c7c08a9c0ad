"""Soak: the whole service under mixed load for a bounded time, then a reconciliation.

    .venv/bin/python bench/soak.py [--minutes 10] [--writers 4] [--readers 2]
                                   [--batch 200] [--rate 2] [--backup-every 60]
                                   [--drill-every 180]

``resultsvc serve`` (API + projector + scheduler) runs in its own process on
a scratch PostgreSQL database with backups to a folder. For ``--minutes``:

- ``--writers`` threads each start a run, post ``--rate`` batches of
  ``--batch`` findings per second with an Idempotency-Key (retrying the same
  key on connection errors and 5xx), complete the run every 100 batches and
  start another; one batch in 50 is invalid on purpose and must be refused;
- ``--readers`` threads read results pages (with ``after=`` the last position
  written, so they also wait for the projector), plan and run lists;
- a backup every ``--backup-every`` seconds (``POST /v1/backups``) and a
  restore drill every ``--drill-every`` seconds (``POST /v1/restore-drills``);
- ``/metrics`` every 2 s for the projector lag.

Then load stops, a last backup and drill run, and the report prints requests
served, errors by kind, the maximum projector lag, the server's peak RSS, and
the reconciliation: findings accepted by clients = findings in the event log
= rows in the display views, and the last drill passed on a backup holding
the whole log. Exit status 1 if anything does not reconcile.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import scratch_database
from bench.http_ingest import free_port, start_server
from service.database import parse_database_url
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
LAG = re.compile(r'^resultsvc_projector_lag\{view="([^"]+)"\} ([0-9.e+]+)$', re.M)


@dataclass
class Tally:
    """What the clients saw; shared by the load threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    accepted: int = 0  # findings the service accepted (201, replay or already-applied)
    refused_batches: int = 0
    retries: int = 0
    last_position: int = 0
    max_lag: dict[str, float] = field(default_factory=dict)
    backups: list[str] = field(default_factory=list)
    drills: list[dict[str, Any]] = field(default_factory=list)

    def saw(self, label: str, status: int | None, expected: tuple[int, ...] = ()) -> None:
        """Count a request; anything but 2xx and the ``expected`` statuses is an error."""
        with self.lock:
            self.requests[label] += 1
            if status is None:
                self.errors[f"{label}: connection"] += 1
            elif status >= 300 and status not in expected:
                self.errors[f"{label}: {status}"] += 1


class Client:
    """One keep-alive connection; reconnects after a failure."""

    def __init__(self, port: int, token: str, timeout: float = 300) -> None:
        self.port, self.token, self.timeout = port, token, timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int | None, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            payload = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        # A kept-alive connection the server closed while idle (uvicorn: 5 s) fails
        # at once: try again on a new one, as HTTP client libraries do. Safe here:
        # every POST carries an Idempotency-Key.
        for fresh in (self.conn is None, True):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=self.timeout
                    )
                self.conn.request(method, path, body=payload, headers=headers)
                response = self.conn.getresponse()
                raw = response.read()
                return response.status, orjson.loads(raw) if raw[:1] in (b"{", b"[") else raw
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if fresh:
                    return None, None
        return None, None


def writer(
    port: int, token: str, plan: str, tally: Tally, args: Any, stop: threading.Event
) -> None:
    client = Client(port, token)
    sample = list(findings(args.batch, seed=hash(threading.current_thread().name) % 1000))
    bad = [dict(sample[0], severity="urgent")]
    run, in_run, number = None, 0, 0
    period = 1.0 / args.rate
    while not stop.is_set():
        started = time.monotonic()
        if run is None:
            status, answer = client.call("POST", f"/v1/plans/{plan}/runs", key=f"start-{uuid4()}")
            tally.saw("POST runs", status)
            if status != 201:
                stop.wait(1)
                continue
            run, in_run = answer["id"], 0
        number += 1
        invalid = number % 50 == 0
        body = {"results": bad if invalid else sample}
        key = f"{run}/{number}"
        while True:  # a started batch is finished, even when stopping
            status, answer = client.call("POST", f"/v1/runs/{run}/results", body, key)
            tally.saw("POST results", status, (409, 422) if invalid else (409,))
            if status is None or status >= 500 or (status == 409 and _in_progress(answer)):
                with tally.lock:
                    tally.retries += 1
                time.sleep(0.2)  # back-off between retries of a real client
                continue
            with tally.lock:
                if status == 201:
                    tally.accepted += len(sample)
                    tally.last_position = max(tally.last_position, int(answer["position"]))
                elif status == 409 and _already_applied(answer):
                    tally.accepted += len(sample)
                elif invalid and status == 422:
                    tally.refused_batches += 1
                else:
                    tally.errors[f"unexpected results answer {status}"] += 1
            break
        in_run += 1
        if in_run >= 100:
            status, _ = client.call(
                "POST", f"/v1/runs/{run}/complete", {"status": "succeeded"}, f"{run}/end"
            )
            tally.saw("POST complete", status)
            run = None
        stop.wait(max(0.0, period - (time.monotonic() - started)))


def _in_progress(answer: Any) -> bool:
    return isinstance(answer, dict) and str(answer.get("type", "")).endswith("request-in-progress")


def _already_applied(answer: Any) -> bool:
    return isinstance(answer, dict) and str(answer.get("type", "")).endswith("already-applied")


def reader(port: int, token: str, team: str, tally: Tally, stop: threading.Event) -> None:
    client = Client(port, token)
    while not stop.is_set():
        after = tally.last_position
        status, plans = client.call("GET", f"/v1/teams/{team}/plans?after={after}")
        tally.saw("GET plans", status)
        if status != 200 or not plans["items"]:
            stop.wait(0.5)
            continue
        plan = plans["items"][0]["id"]
        status, runs = client.call("GET", f"/v1/plans/{plan}/runs?limit=5")
        tally.saw("GET runs", status)
        for run in runs["items"] if status == 200 else []:
            status, _ = client.call("GET", f"/v1/runs/{run['id']}/results?limit=100")
            tally.saw("GET results", status)
            status, _ = client.call("GET", f"/v1/runs/{run['id']}/results?limit=100&severity=high")
            tally.saw("GET results (filtered)", status)


def operator(port: int, token: str, tally: Tally, args: Any, stop: threading.Event) -> None:
    client = Client(port, token)
    start = time.monotonic()
    next_backup, next_drill = start + args.backup_every, start + args.drill_every
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_backup:
            backup(client, tally)
            next_backup += args.backup_every
        if now >= next_drill and tally.backups:
            drill(client, tally)
            next_drill += args.drill_every
        stop.wait(1)


def backup(client: Client, tally: Tally) -> None:
    status, answer = client.call("POST", "/v1/backups", {"full": False}, f"backup-{uuid4()}")
    tally.saw("POST backups", status)
    if status == 201:
        with tally.lock:
            tally.backups.append(answer["id"])


def drill(client: Client, tally: Tally) -> None:
    status, answer = client.call("POST", "/v1/restore-drills", {}, f"drill-{uuid4()}")
    tally.saw("POST restore-drills", status)
    if status == 201:
        with tally.lock:
            tally.drills.append(answer)
        if not answer["passed"]:
            tally.errors[f"drill failed: {answer['reason']}"] += 1


def metrics_probe(port: int, tally: Tally, stop: threading.Event) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.wait(2):
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            conn.close()
            tally.errors["GET /metrics: connection"] += 1
            continue
        for view, lag in LAG.findall(text):
            tally.max_lag[view] = max(tally.max_lag.get(view, 0.0), float(lag))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(url: str) -> tuple[str, str, str, str]:
    """A team with an account and a plan, its ingest+read token and an ops token."""
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": url})) as runtime:
        team, _ = runtime.app.create_team("soak")
        account, _ = runtime.app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/soak", verified=False, actor="soak"
        )
        plan, _ = runtime.app.create_plan(team.id, account.id, "soak")
        token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read"}))
        ops = runtime.tokens.create(None, frozenset({"ops"}))
        return str(team.id), str(plan.id), token, ops


def reconcile(url: str, team: str, tally: Tally) -> list[str]:
    """Findings accepted = in the log = in the views; the last drill passed on the whole log."""
    problems: list[str] = []
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": url})) as runtime:
        head = runtime.app.head_position()
        runtime.projector.catch_up()
        with psycopg.connect(parse_database_url(url).conninfo()) as conn:
            run_ids = [r[0] for r in conn.execute("SELECT run_id FROM view_runs").fetchall()]
            viewed = conn.execute("SELECT count(*) FROM view_results").fetchone()
        stored = sum(runtime.app.get_run(UUID(team), UUID(r)).total for r in run_ids)
        print(f"  findings accepted by clients : {tally.accepted:,}")
        print(f"  findings in the event log    : {stored:,}")
        print(f"  rows in view_results         : {viewed[0] if viewed else 0:,}")
        print(f"  log head                     : {head:,}")
        if not (tally.accepted == stored == (viewed[0] if viewed else -1)):
            problems.append("accepted, stored and viewed findings differ")
    if not tally.drills:
        problems.append("no restore drill ran")
    else:
        last = tally.drills[-1]
        print(f"  last drill                   : {last['backup_id']} passed={last['passed']}")
        if not last["passed"]:
            problems.append(f"the last drill failed: {last['reason']}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0, help="batches/s per writer")
    parser.add_argument("--backup-every", type=float, default=60)
    parser.add_argument("--drill-every", type=float, default=180)
    args = parser.parse_args()

    with scratch_database("bench_soak") as url, tempfile.TemporaryDirectory() as folder:
        team, plan, token, ops = prepare(url)
        env = {
            **os.environ,
            "RESULTSVC_DATABASE_URL": url,
            "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{folder}/keys/master.key",
        }
        port = free_port()
        log_path = Path(folder) / "serve.log"
        with log_path.open("wb") as log:
            server = start_server(url, port, env, log)
            tally, stop = Tally(), threading.Event()
            threads = [
                threading.Thread(
                    target=writer, args=(port, token, plan, tally, args, stop), name=f"w{i}"
                )
                for i in range(args.writers)
            ]
            threads += [
                threading.Thread(target=reader, args=(port, token, team, tally, stop))
                for _ in range(args.readers)
            ]
            threads.append(threading.Thread(target=operator, args=(port, ops, tally, args, stop)))
            threads.append(threading.Thread(target=metrics_probe, args=(port, tally, stop)))
            began = time.monotonic()
            for thread in threads:
                thread.start()
            try:
                stop.wait(args.minutes * 60)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            closing = Client(port, ops)
            backup(closing, tally)  # the whole log, then a drill of it
            drill(closing, tally)
            elapsed = time.monotonic() - began
            rss = peak_rss_mib(server.pid)
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=120)
        print(f"soak: {elapsed / 60:.1f} min, {args.writers} writers, {args.readers} readers")
        served = sum(tally.requests.values())
        print(f"  requests served              : {served:,} ({served / elapsed:,.0f}/s)")
        for label, count in sorted(tally.requests.items()):
            print(f"    {label:<26}: {count:,}")
        print(f"  retries                      : {tally.retries}")
        print(f"  invalid batches refused      : {tally.refused_batches}")
        print(f"  errors by kind               : {dict(tally.errors) or 'none'}")
        print(f"  max projector lag (events)   : {max(tally.max_lag.values(), default=0):,.0f}")
        print(f"  backups / drills             : {len(tally.backups)} / {len(tally.drills)}")
        print(f"  server peak RSS              : {rss:,.0f} MiB; exit status {code}")
        problems = reconcile(url, team, tally)
        if tally.errors:
            problems.append(f"errors: {dict(tally.errors)}")
        if code != 0:
            problems.append(f"server exit status {code}: see {log_path}")
        print("result: " + ("CLEAN" if not problems else "NOT CLEAN: " + "; ".join(problems)))
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
