"""Reliability against the database: dropped connections, a stopped database, a restart.

Every scenario runs the real code paths against real PostgreSQL servers:

- 8 HTTP clients ingest into a real ``resultsvc serve`` whose database
  connections go through a fault-injecting TCP proxy (``tests/fault_proxy.py``)
  that drops every connection several times and stalls once; every batch must
  end stored exactly once (or refused and never stored);
- a scheduled backup whose database is stopped (``pg_ctl stop -m immediate``)
  just before or during the job, on a private cluster (``tests/pg_cluster.py``);
- a running ``resultsvc serve`` whose database stops and restarts under it.

Bugs these scenarios ran into are pinned by strict xfail tests, each with the
place and the mechanism in its reason (idempotency keys left "in progress",
a projector thread that dies, /readyz blocking, dead pooled connections after
an outage, keep-alive connections closed after a 5xx, job reasons).

Nothing sleeps to wait for something: every wait is a bounded poll of an
observable condition (an answer, a counter, a row) with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from service.api import create_app
from service.backups import Backups
from service.database import parse_database_url
from service.runtime import Runtime
from service.samples import findings
from service.scheduler import JOBS, JobRunner, JobSpec, job_status
from service.settings import Settings
from tests.conftest import free_port
from tests.fault_proxy import tcp_proxy
from tests.pg_cluster import PgCluster, pg_cluster

pytestmark = pytest.mark.postgres

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
PROBLEM = "application/problem+json"
ALREADY_APPLIED = "already-applied"
IN_PROGRESS = "Request in progress"

# ---------------------------------------------------------------- plumbing


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def wait_until(
    condition: Callable[[], bool], seconds: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``seconds``."""
    end = _deadline(seconds)
    pause = threading.Event()
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {seconds}s waiting for {what}")
        pause.wait(interval)  # a polling interval, bounded by the deadline above


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    content_type: str
    headers: dict[str, str]

    @property
    def problem_type(self) -> str:
        return str(self.body.get("type", "")) if isinstance(self.body, dict) else ""

    @property
    def title(self) -> str:
        return str(self.body.get("title", "")) if isinstance(self.body, dict) else ""

    @property
    def is_problem(self) -> bool:
        return (
            self.content_type.startswith(PROBLEM)
            and isinstance(self.body, dict)
            and self.body.get("status") == self.status
        )


class Http:
    """One keep-alive HTTP connection to the server, reopened after any failure."""

    def __init__(self, port: int, token: str | None = None, timeout: float = 30.0) -> None:
        self.port = port
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        key: str | None = None,
    ) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        content_type = response.getheader("content-type") or ""
        parsed: Any = json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
        if response.getheader("connection", "").lower() == "close":
            self.close()
        return Answer(response.status, parsed, content_type, dict(response.getheaders()))


class ServeProcess:
    """``resultsvc serve`` as deployed, its output in a file (a full pipe would block it)."""

    def __init__(self, database_url: str, folder: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = folder / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{folder}/keys/master.key",
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [RESULTSVC, "serve", "--port", str(self.port), *extra],
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        probe = Http(self.port, timeout=5)

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited at start-up:\n{self.tail()}")
            try:
                return probe.call("GET", "/healthz").status == 200
            except OSError:
                return False

        try:
            wait_until(healthy, 60, "serve to answer /healthz", interval=0.05)
        except BaseException:
            self.kill()
            raise
        finally:
            probe.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as a deployment stops it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@dataclass
class Tenant:
    team: str
    account: str
    plan: str
    runs: list[str]
    token: str


def make_tenant(database_url: str, runs: int) -> Tenant:
    """A team, a linked account, a plan, ``runs`` runs and an ingest+read token, directly."""
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        app = runtime.app
        team, _ = app.create_team("reliability")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/reliability", verified=False, actor="test"
        )
        plan, _ = app.create_plan(team.id, account.id, "nightly")
        run_ids = [str(app.start_run(team.id, plan.id)[0].id) for _ in range(runs)]
        token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read"}))
    return Tenant(str(team.id), str(account.id), str(plan.id), run_ids, token)


def via(url: str, port: int) -> str:
    """The same database URL (user, password, database, schema) through another port."""
    config = parse_database_url(url)
    auth = quote(config.user, safe="")
    if config.password:
        auth += ":" + quote(config.password, safe="")
    query = "" if config.schema == "public" else f"?schema={config.schema}"
    return f"postgresql://{auth}@127.0.0.1:{port}/{quote(config.dbname, safe='')}{query}"


def tagged_batch(tag: str, size: int, seed: int, *, invalid: bool = False) -> bytes:
    """``size`` findings whose messages carry ``tag``; ``invalid`` breaks one severity."""
    items = list(findings(size, seed=seed))
    for index, item in enumerate(items):
        item["message"] = f"{tag}/{index:03d} {item['message']}"
    if invalid:
        items[size // 2]["severity"] = "urgent"
    return json.dumps({"results": items}).encode()


def tag_of(finding: dict[str, Any]) -> str:
    return str(finding["message"]).split("/", 1)[0]


def stored_tags(database_url: str, tenant: Tenant, run: str) -> tuple[Counter[str], int]:
    """How many stored findings carry each tag, and the run's batch count, from the events."""
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        team, run_id = uuid.UUID(tenant.team), uuid.UUID(run)
        tags = Counter(tag_of(item) for item in runtime.app.run_results(team, run_id))
        batches = runtime.app.get_run(team, run_id).batches
    return tags, batches


def head_position(database_url: str) -> int:
    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": database_url})) as runtime:
        return runtime.app.head_position()


def read_after(client: Http, path: str, position: int, seconds: float = 60) -> Answer:
    """GET ``path?after=position`` until the views reached it (200), within ``seconds``."""
    answers: list[Answer] = []

    def reached() -> bool:
        try:
            answer = client.call("GET", f"{path}?after={position}")
        except OSError:
            return False
        answers.append(answer)
        return answer.status != 503  # 503: views behind (or the database coming back)

    wait_until(reached, seconds, f"the views to reach position {position} for {path}")
    assert answers[-1].status == 200, answers[-1]
    return answers[-1]


def direct_conn(database_url: str) -> psycopg.Connection[Any]:
    """A psycopg connection with the URL's schema on the search path."""
    config = parse_database_url(database_url)
    conn = psycopg.connect(config.conninfo(), autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(config.schema)))
    return conn


def test_the_fault_proxy_drops_refuses_and_stalls(pg_url: str) -> None:
    """The proxy itself, on a real PostgreSQL connection: each control does what it says."""
    config = parse_database_url(pg_url)
    with tcp_proxy(config.host, config.port) as proxy:
        conninfo = parse_database_url(via(pg_url, proxy.port)).conninfo(connect_timeout=5)
        conn = psycopg.connect(conninfo, autocommit=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert (proxy.accepted, proxy.active) == (1, 1)

        proxy.stall(True)
        result: list[Any] = []
        query = threading.Thread(target=lambda: result.append(conn.execute("SELECT 2").fetchone()))
        query.start()
        wait_until(lambda: proxy.held >= 1, 10, "the stalled query's bytes to be held")
        assert query.is_alive() and result == []  # its bytes never reached the server
        proxy.stall(False)
        query.join(timeout=10)
        assert result == [(2,)]

        assert proxy.drop() == 1
        assert (proxy.dropped, proxy.active) == (1, 0)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 3")
        conn.close()

        proxy.refuse(True)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo)
        assert proxy.refused >= 1  # libpq may try more than once
        proxy.refuse(False)
        with psycopg.connect(conninfo) as again:
            assert again.execute("SELECT 4").fetchone() == (4,)
        assert proxy.accepted == 2


# ============================================================ a. 8 clients, drops


CLIENTS = 8
BATCHES = 30  # valid batches per client
BATCH_SIZE = 50
INVALID_AFTER = (9, 21)  # each client also sends an invalid batch after these
IN_PROGRESS_PATIENCE = 3.0  # seconds of "Request in progress" before a key counts as stuck
BATCH_DEADLINE = 90.0


@dataclass
class Batch:
    client: int
    number: int
    invalid: bool
    key: str
    body: bytes
    outcome: str = ""  # accepted, already-applied, refused, stuck
    status: int = 0
    attempts: int = 0

    @property
    def tag(self) -> str:
        return f"c{self.client:02d}b{self.number:03d}"


@dataclass
class Traffic:
    """Shared counters of the clients, observed by the fault driver."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    answers: int = 0  # answers and connection errors, retries included
    attempts: int = 0
    in_flight: int = 0
    running: int = 0
    connection_errors: int = 0
    server_errors: int = 0
    non_problem_errors: list[str] = field(default_factory=list)
    in_progress: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def started(self) -> None:
        with self.lock:
            self.attempts += 1
            self.in_flight += 1
            self.lock.notify_all()

    def ended(self, status: int | None) -> None:
        with self.lock:
            self.in_flight -= 1
            self.answers += 1
            if status is None:
                self.connection_errors += 1
            else:
                self.statuses[status] += 1
            self.lock.notify_all()

    def wait(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        with self.lock:
            if not self.lock.wait_for(condition, timeout=seconds):
                raise AssertionError(f"gave up after {seconds}s waiting for {what}")


def post_until_final(
    client: Http,
    run: str,
    batch: Batch,
    traffic: Traffic,
    stop: threading.Event,
    patience: float = IN_PROGRESS_PATIENCE,
) -> None:
    """Post a batch under its key until a final answer; same key and body on every retry.

    Final: 201 (or its replay), 409 already-applied (applied, its answer was
    lost), any other 4xx refusal. Retried: connection errors, 5xx, 409 "Request
    in progress". A key still "in progress" after ``patience`` seconds is
    recorded as ``stuck`` (the service keeps such a claim for STALE_AFTER).
    """
    end = _deadline(BATCH_DEADLINE)
    in_progress_since: float | None = None
    retry_pause = 0.0
    while True:
        if stop.is_set():
            raise AssertionError(f"batch {batch.tag}: the test gave up")
        if time.monotonic() > end:
            raise AssertionError(f"batch {batch.tag} got no final answer in {BATCH_DEADLINE}s")
        if retry_pause:
            stop.wait(retry_pause)  # the client's retry back-off, not a synchronisation
        batch.attempts += 1
        traffic.started()
        try:
            answer = client.call("POST", f"/v1/runs/{run}/results", batch.body, batch.key)
        except (OSError, http.client.HTTPException):
            traffic.ended(None)
            retry_pause = 0.05
            continue
        traffic.ended(answer.status)
        batch.status = answer.status
        if answer.status == 201:
            batch.outcome = "accepted"
            return
        if answer.status == 409 and answer.problem_type.endswith(ALREADY_APPLIED):
            batch.outcome = ALREADY_APPLIED
            return
        if answer.status == 409 and answer.title == IN_PROGRESS:
            with traffic.lock:
                traffic.in_progress += 1
            now = time.monotonic()
            in_progress_since = in_progress_since or now
            if now - in_progress_since > patience:
                batch.outcome = "stuck"
                return
            retry_pause = 0.05
            continue
        if answer.status >= 500:
            with traffic.lock:
                traffic.server_errors += 1
                if not answer.is_problem:
                    traffic.non_problem_errors.append(f"{answer.status} {answer.body!r:.200}")
            retry_pause = 0.02
            continue
        assert answer.is_problem, answer
        batch.outcome = "refused"
        return


def client_batches(client: int) -> list[Batch]:
    made = []
    number = 0
    for index in range(BATCHES):
        made.append(
            Batch(
                client,
                number,
                False,
                f"rel-{client}-{number}-{uuid.uuid4().hex}",
                tagged_batch(f"c{client:02d}b{number:03d}", BATCH_SIZE, client * 1000 + number),
            )
        )
        number += 1
        if index in INVALID_AFTER:
            made.append(
                Batch(
                    client,
                    number,
                    True,
                    f"rel-{client}-{number}-{uuid.uuid4().hex}",
                    tagged_batch(
                        f"c{client:02d}b{number:03d}",
                        BATCH_SIZE,
                        client * 1000 + number,
                        invalid=True,
                    ),
                )
            )
            number += 1
    return made


def age_idempotency_keys(database_url: str, team: str, keys: list[str]) -> int:
    """Make claims look older than STALE_AFTER, as if that time had passed."""
    old = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    with direct_conn(database_url) as conn:
        cur = conn.execute(
            "UPDATE idempotency_keys SET created_at = %s WHERE scope = %s AND key = ANY(%s)",
            (old, team, keys),
        )
        return cur.rowcount


def test_eight_clients_ingest_exactly_once_while_connections_drop(
    pg_url: str, tmp_path: Path
) -> None:
    config = parse_database_url(pg_url)
    tenant = make_tenant(pg_url, runs=CLIENTS)
    work = {client: client_batches(client) for client in range(CLIENTS)}
    traffic = Traffic()
    stop = threading.Event()
    failures: list[BaseException] = []
    drops: list[int] = []

    with tcp_proxy(config.host, config.port) as proxy:
        server = ServeProcess(via(pg_url, proxy.port), tmp_path)
        try:

            def client_main(client: int) -> None:
                http_client = Http(server.port, tenant.token)
                try:
                    for batch in work[client]:
                        post_until_final(http_client, tenant.runs[client], batch, traffic, stop)
                except BaseException as error:
                    failures.append(error)
                finally:
                    http_client.close()
                    with traffic.lock:
                        traffic.running -= 1
                        traffic.lock.notify_all()

            traffic.running = CLIENTS
            threads = [
                threading.Thread(target=client_main, args=(c,), name=f"client-{c}")
                for c in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            try:
                # Five drops, spaced by answers, not by time; then one stall.
                for threshold in (20, 55, 90, 125, 160):
                    traffic.wait(
                        lambda t=threshold: traffic.answers >= t or traffic.running == 0,
                        60,
                        f"{threshold} answers",
                    )
                    drops.append(proxy.drop())
                traffic.wait(
                    lambda: traffic.answers >= 195 or traffic.running == 0, 60, "195 answers"
                )
                proxy.stall(True)
                try:
                    # Bytes are held: every client still running ends up waiting on a request.
                    traffic.wait(
                        lambda: traffic.in_flight >= traffic.running,
                        30,
                        "every client to wait on the stalled database",
                    )
                    wait_until(lambda: proxy.held >= 1, 30, "the proxy to hold bytes")
                    answers_while_stalled = traffic.answers
                finally:
                    proxy.stall(False)
                traffic.wait(
                    lambda: traffic.answers > answers_while_stalled or traffic.running == 0,
                    60,
                    "an answer after the stall",
                )
            except BaseException:
                stop.set()  # the clients give up at their next attempt
                raise
            finally:
                for thread in threads:
                    thread.join(timeout=BATCH_DEADLINE * 2)
            assert not [t.name for t in threads if t.is_alive()], "clients still running"
            if failures:
                raise failures[0]

            # Keys left "in progress" by a lost answer: let STALE_AFTER pass (age the
            # claim), then the same retry must end with a final answer.
            stuck = [b for batches in work.values() for b in batches if b.outcome == "stuck"]
            if stuck:
                aged = age_idempotency_keys(pg_url, tenant.team, [b.key for b in stuck])
                assert aged == len(stuck)
                for batch in stuck:
                    resolver = Http(server.port, tenant.token)
                    post_until_final(
                        resolver, tenant.runs[batch.client], batch, traffic, stop, patience=30
                    )
                    resolver.close()
                    assert batch.outcome != "stuck", batch.tag

            # The projector caught up with the log head: every run's view, read after it.
            head = head_position(pg_url)
            reader = Http(server.port, tenant.token)
            views = {
                run: read_after(reader, f"/v1/runs/{run}", head).body["total"]
                for run in tenant.runs
            }
            reader.close()
            assert server.alive(), server.tail()
            assert server.terminate() == 0, server.tail()
        finally:
            server.kill()

    all_batches = [b for batches in work.values() for b in batches]
    outcomes = Counter(b.outcome for b in all_batches)
    figures = {
        "drops": len(drops),
        "connections closed by drops": sum(drops),
        "proxy connections accepted": proxy.accepted,
        "stalls": 1,
        "chunks held by the stall": proxy.held,
        "requests": traffic.attempts,
        "retries": traffic.attempts - len(all_batches),
        "HTTP connection errors": traffic.connection_errors,
        "5xx answers": traffic.server_errors,
        "409 in progress answers": traffic.in_progress,
        "outcomes": dict(outcomes),
        "stuck keys resolved after STALE_AFTER": len(stuck),
        "statuses": dict(traffic.statuses),
    }
    print(f"\nreliability figures (a): {json.dumps(figures)}")

    assert len(drops) == 5 and all(closed >= 1 for closed in drops), drops
    assert traffic.attempts > len(all_batches), "the faults caused no retry at all"
    assert traffic.non_problem_errors == [], traffic.non_problem_errors
    for client, batches in work.items():
        run = tenant.runs[client]
        accepted = {b.tag for b in batches if b.outcome in ("accepted", ALREADY_APPLIED)}
        refused = {b.tag for b in batches if b.outcome == "refused"}
        assert {b.status for b in batches if b.outcome == "refused"} == {422}
        assert refused == {b.tag for b in batches if b.invalid}
        assert len(accepted) == BATCHES
        tags, recorded = stored_tags(pg_url, tenant, run)
        # Each accepted batch is in the store exactly once, whole; no refused one is.
        assert set(tags) == accepted
        assert set(tags.values()) == {BATCH_SIZE}
        assert recorded == len(accepted)
        assert sum(tags.values()) == BATCH_SIZE * len(accepted) == BATCH_SIZE * BATCHES
        assert views[run] == sum(tags.values())


def test_a_lost_answer_never_leaves_its_idempotency_key_in_progress(
    pg_url: str, tmp_path: Path
) -> None:
    """A dropped database connection while the answer is stored: the retry gets an answer.

    The request is held (a lock on the event table) after it claimed its key;
    every database connection is dropped; the lock is released. The command
    then applies (the event store reconnects), but storing its answer meets a
    dead pooled connection. The client's retry with the same key must get a
    final answer (201 replay, or 409 already-applied) promptly, not "in
    progress" until STALE_AFTER (5 minutes) has passed.
    """
    config = parse_database_url(pg_url)
    tenant = make_tenant(pg_url, runs=1)
    run = tenant.runs[0]
    body = tagged_batch("held", 10, seed=5)
    key = f"held-{uuid.uuid4().hex}"
    with tcp_proxy(config.host, config.port) as proxy:
        settings = Settings.from_env(
            {
                "RESULTSVC_DATABASE_URL": via(pg_url, proxy.port),
                "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
                "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
            }
        )
        with (
            Runtime.open(settings) as runtime,
            TestClient(create_app(runtime), raise_server_exceptions=False) as api,
        ):
            headers = {"Authorization": f"Bearer {tenant.token}", "Idempotency-Key": key}
            first: list[Any] = []
            request = threading.Thread(
                target=lambda: first.append(
                    api.post(f"/v1/runs/{run}/results", content=body, headers=headers)
                )
            )
            with direct_conn(pg_url) as locker, direct_conn(pg_url) as watcher:
                locker.execute("BEGIN")
                locker.execute("LOCK TABLE resultsvc_events IN ACCESS EXCLUSIVE MODE")
                request.start()
                try:
                    wait_until(
                        lambda: bool(blocked_by(watcher, locker)),
                        30,
                        "the request to wait on the event table",
                    )
                    assert proxy.drop() >= 2  # the pooled view connection, the event store's
                finally:
                    locker.execute("COMMIT")
                    request.join(timeout=120)
            assert not request.is_alive()
            # The command applied exactly once. Storing its answer met the dropped
            # connection: the client still gets the command's answer (201), or a
            # 5xx if the failure came earlier; either way the retry must settle.
            assert first[0].status_code == 201 or first[0].status_code >= 500, first[0].text
            applied = Counter(
                tag_of(item)
                for item in runtime.app.run_results(uuid.UUID(tenant.team), uuid.UUID(run))
            )
            assert applied == Counter({"held": 10})

            retries: list[Any] = []

            def final() -> bool:
                response = api.post(f"/v1/runs/{run}/results", content=body, headers=headers)
                retries.append(response)
                if response.status_code >= 500:
                    return False  # a passing failure: retry
                return not (response.status_code == 409 and response.json()["title"] == IN_PROGRESS)

            try:
                wait_until(final, 8, "a final answer to the retry", interval=0.1)
            except AssertionError as error:
                seen = Counter(
                    f"{r.status_code} {r.json().get('title')}" for r in retries
                ).most_common()
                raise AssertionError(f"{error}; the retries got {seen}") from None
            answer = retries[-1]
            assert answer.status_code == 201 or (
                answer.status_code == 409 and answer.json()["type"].endswith(ALREADY_APPLIED)
            ), answer.text


def blocked_by(
    watcher: psycopg.Connection[Any], locker: psycopg.Connection[Any]
) -> list[tuple[int, datetime]]:
    """Statements waiting on a lock ``locker`` holds: (backend pid, statement start).

    Read on another connection, so each call sees fresh activity.
    """
    holder = locker.info.backend_pid
    rows = watcher.execute(
        "SELECT pid, query_start FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
        (holder,),
    ).fetchall()
    return [(int(row[0]), row[1]) for row in rows]


# ============================================================ the private cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this module's own: these tests stop and restart it."""
    with pg_cluster() as made:
        yield made


@contextlib.contextmanager
def restarted_afterwards(cluster: PgCluster) -> Iterator[None]:
    """Whatever the test does to the cluster, it is running again afterwards."""
    try:
        yield
    finally:
        if not cluster.running():
            cluster.start()


# ============================================================ b. a job, the database stopped


BACKUP = next(spec for spec in JOBS if spec.name == "backup")
SLOT = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class JobWorld:
    runtime: Runtime
    env: dict[str, str]
    url: str
    head: int


@pytest.fixture
def job_world(cluster: PgCluster, tmp_path: Path) -> Iterator[JobWorld]:
    """A runtime on a fresh database of the private cluster, with a run of 150 results."""
    url = cluster.url(f"jobs_{uuid.uuid4().hex[:10]}")
    env = {
        "RESULTSVC_DATABASE_URL": url,
        "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
        "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
    }
    runtime = Runtime.open(Settings.from_env(env))
    try:
        app = runtime.app
        team, _ = app.create_team("jobs")
        account, _ = app.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/jobs", verified=False, actor="test"
        )
        plan, _ = app.create_plan(team.id, account.id, "nightly")
        run, _ = app.start_run(team.id, plan.id)
        for seed in range(3):
            app.record_results(team.id, run.id, list(findings(50, seed=seed)))
        with restarted_afterwards(cluster):
            yield JobWorld(runtime, env, url, app.head_position())
    finally:
        runtime.close()


def backup_row(runtime: Runtime) -> dict[str, Any]:
    return next(row for row in job_status(runtime.views) if row["job"] == "backup")


def running_since(url: str) -> Any:
    with direct_conn(url) as conn:
        row = conn.execute("SELECT running_since FROM scheduler_jobs WHERE job = 'backup'")
        found = row.fetchone()
    assert found is not None
    return found[0]


def cli(env: dict[str, str], folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RESULTSVC, *args],
        env={**os.environ, **env},
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def idle_pooled_connections(runtime: Runtime, count: int) -> None:
    """Leave at least ``count`` idle connections in the views' pool, as a busy service has."""
    with contextlib.ExitStack() as held:
        for _ in range(count):
            held.enter_context(runtime.views.reading())


def failed_backup(cluster: PgCluster, world: JobWorld, when: str) -> tuple[JobRunner, Clock]:
    """The backup job of slot SLOT run with the database stopped ``when``; it is back after."""
    runtime = world.runtime
    clock = Clock(SLOT)
    runner = JobRunner(runtime, clock=clock)
    spec = BACKUP
    if when == "during the job":

        def stopping_then_backup(rt: Runtime) -> Any:
            cluster.stop("immediate")  # the job holds its lock and its claim: mid-job
            return BACKUP.run(rt)

        spec = JobSpec(BACKUP.name, BACKUP.trigger, BACKUP.slot, stopping_then_backup)
    else:
        cluster.stop("immediate")
    try:
        outcome = runner.run(spec)  # never raises: the outcome is kept until recorded
    finally:
        cluster.start()
    assert outcome == "failed"
    return runner, clock


def flush_until_recorded(runner: JobRunner) -> int:
    """Call ``flush`` as the scheduler does every minute until nothing is pending; how often."""
    calls = 1
    while runner.flush() != 0:
        calls += 1
        assert calls <= 10, "the outcome was never recorded"
    return calls


@pytest.mark.parametrize("when", ["before the run", "during the job"])
def test_a_backup_whose_database_stops_fails_cleanly_and_runs_at_the_next_slot(
    cluster: PgCluster, job_world: JobWorld, tmp_path: Path, when: str
) -> None:
    runtime = job_world.runtime
    # The service had been busy: two idle connections in the views' pool, both killed
    # by the stop. During the job one fails the job and one fails recording its outcome.
    idle_pooled_connections(runtime, 2)
    runner, clock = failed_backup(cluster, job_world, when)
    if when == "during the job":
        # The claim is in the database, its outcome only in memory until a flush.
        assert running_since(job_world.url) == SLOT.isoformat()
    flushes = flush_until_recorded(runner)
    assert running_since(job_world.url) is None  # nothing is left marked running
    row = backup_row(runtime)
    assert row["last_failure"] == SLOT.isoformat()
    assert row["last_success"] is None and row["last_slot"] is None
    reason = row["last_error"]
    print(f"\nbackup failed {when}: recorded after {flushes} flush(es), reason {reason!r}")
    if when == "before the run":
        assert reason.startswith("database unavailable: OperationalError: connection failed")
        assert f"port {cluster.port} failed: Connection refused" in reason
    else:
        assert reason.startswith("database unavailable: "), reason
    backups = Backups.open(runtime)
    assert backups.catalog.ids() == [] and backups.catalog.prefixes() == set()

    # The next slot (a day later on the injected clock) runs it.
    clock.now = SLOT + timedelta(days=1)
    assert runner.run(BACKUP) == "done"
    row = backup_row(runtime)
    assert row["last_success"] == clock.now.isoformat()
    assert row["last_slot"] == "2026-03-03"
    assert row["last_failure"] == SLOT.isoformat()
    assert running_since(job_world.url) is None

    listed = cli(job_world.env, tmp_path, "backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert len(document["backups"]) == 1, document
    (only,) = document["backups"]
    assert only["kind"] == "full"
    assert only["positions"] == [1, job_world.head]
    job = next(j for j in document["jobs"] if j["job"] == "backup")
    assert job["last_failure"] == SLOT.isoformat()
    assert job["last_success"] == clock.now.isoformat()
    # One complete backup and no half one: every folder in the store has its manifest.
    assert backups.catalog.prefixes() == {only["id"]}
    verified = cli(job_world.env, tmp_path, "backup", "verify", only["id"])
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_first_flush_after_the_database_is_back_records_the_outcome(
    cluster: PgCluster, job_world: JobWorld
) -> None:
    idle_pooled_connections(job_world.runtime, 3)
    runner, _ = failed_backup(cluster, job_world, "before the run")
    assert runner.flush() == 0
    assert backup_row(job_world.runtime)["last_failure"] == SLOT.isoformat()


def test_a_job_failed_by_the_database_says_so_in_its_recorded_reason(
    cluster: PgCluster, job_world: JobWorld
) -> None:
    idle_pooled_connections(job_world.runtime, 2)
    runner, _ = failed_backup(cluster, job_world, "during the job")
    flush_until_recorded(runner)
    reason = backup_row(job_world.runtime)["last_error"]
    assert "database" in reason.lower(), reason


# ============================================================ c. serve, a restart under it


OUTAGE_BOUND = 45.0  # the views pool's default getconn timeout (30 s), plus margin
READY_BOUND = 10.0  # twice the service's own connect timeout (CONNECT_TIMEOUT_SECONDS = 5)


def test_serve_answers_problems_during_an_outage_and_recovers_without_a_restart(
    cluster: PgCluster, tmp_path: Path
) -> None:
    url = cluster.url(f"served_{uuid.uuid4().hex[:10]}")
    tenant = make_tenant(url, runs=1)
    run = tenant.runs[0]
    batches = [
        Batch(0, n, False, f"outage-{n}-{uuid.uuid4().hex}", tagged_batch(f"o{n}", 50, n))
        for n in range(3)
    ]
    traffic = Traffic()
    stop = threading.Event()
    server = ServeProcess(url, tmp_path)
    pid = server.process.pid
    try:
        client = Http(server.port, tenant.token, timeout=OUTAGE_BOUND)
        post_until_final(client, run, batches[0], traffic, stop)
        assert batches[0].outcome == "accepted"
        assert read_after(client, f"/v1/runs/{run}", head_position(url)).body["total"] == 50

        # ---- the database stops under the running server
        answers: dict[str, Answer | BaseException] = {}
        done = threading.Condition()

        def ask(name: str, method: str, path: str, body: bytes | None, key: str | None) -> None:
            own = Http(server.port, tenant.token, timeout=OUTAGE_BOUND)
            try:
                result: Answer | BaseException = own.call(method, path, body, key)
            except BaseException as error:  # a timeout here is a hang
                result = error
            finally:
                own.close()
            with done:
                answers[name] = result
                done.notify_all()

        requests = {
            "post": ("POST", f"/v1/runs/{run}/results", batches[1].body, batches[1].key),
            "run": ("GET", f"/v1/runs/{run}", None, None),
            "results": ("GET", f"/v1/runs/{run}/results?limit=10", None, None),
            "after": ("GET", f"/v1/runs/{run}?after={head_position(url) + 1}", None, None),
        }
        with restarted_afterwards(cluster):
            cluster.stop("fast")
            threads = [
                threading.Thread(target=ask, args=(name, *request))
                for name, request in requests.items()
            ]
            for thread in threads:
                thread.start()
            with done:
                assert done.wait_for(lambda: bool(answers), timeout=OUTAGE_BOUND + 5)
                first = next(iter(answers.values()))
            # Asked while the database was down: a problem answer, not a hang or a crash.
            assert isinstance(first, Answer), first
            assert first.status >= 500 and first.is_problem, first
            assert Http(server.port, timeout=5).call("GET", "/healthz").status == 200
            assert server.alive(), server.tail()
            cluster.start()
        for thread in threads:
            thread.join(timeout=OUTAGE_BOUND + 5)
        assert set(answers) == set(requests)
        for name, answer in answers.items():
            # Each answered within the bound: a problem, or success once the database returned.
            assert isinstance(answer, Answer), f"{name}: {answer!r}"
            assert (answer.status >= 500 and answer.is_problem) or answer.status in (200, 201), (
                name,
                answer,
            )
        outage_statuses = {
            name: answer.status for name, answer in answers.items() if isinstance(answer, Answer)
        }

        # ---- the same server, not restarted, takes the batch again (same key)
        post_until_final(client, run, batches[1], traffic, stop)
        assert batches[1].outcome in ("accepted", ALREADY_APPLIED)

        # ---- pg_ctl restart -m fast under it
        cluster.restart("fast")
        errors_before = traffic.server_errors
        post_until_final(client, run, batches[2], traffic, stop)
        assert batches[2].outcome == "accepted"
        after_restart_problems = traffic.server_errors - errors_before

        # The projector thread resumed: the views reach the head, /readyz says ready.
        head = head_position(url)
        view = read_after(client, f"/v1/runs/{run}", head).body
        assert view["total"] == 150

        probe = Http(server.port, timeout=OUTAGE_BOUND)

        def ready() -> bool:
            answer = probe.call("GET", "/readyz")
            return answer.status == 200 and set(answer.body["lag"].values()) == {0}

        wait_until(ready, 60, "/readyz to report every view at the head", interval=0.2)
        assert server.alive() and server.process.pid == pid
        probe.close()
        client.close()
        assert server.terminate() == 0, server.tail()
    finally:
        server.kill()
    tags, recorded = stored_tags(url, tenant, run)
    assert tags == Counter({"o0": 50, "o1": 50, "o2": 50})
    assert recorded == 3
    print(
        f"\nreliability figures (c): answers to requests sent during the outage"
        f" {outage_statuses}; {after_restart_problems} 5xx after the restart;"
        f" {traffic.attempts} posts for 3 batches"
    )


def test_readyz_answers_503_promptly_while_the_database_is_down(
    cluster: PgCluster, tmp_path: Path
) -> None:
    url = cluster.url(f"ready_{uuid.uuid4().hex[:10]}")
    server = ServeProcess(url, tmp_path)
    try:
        probe = Http(server.port, timeout=READY_BOUND)
        wait_until(lambda: probe.call("GET", "/readyz").status == 200, 30, "ready", interval=0.1)
        with restarted_afterwards(cluster):
            cluster.stop("fast")
            try:
                answer = probe.call("GET", "/readyz")
            except TimeoutError:
                raise AssertionError(
                    f"/readyz gave no answer within {READY_BOUND}s with the database down"
                ) from None
            assert answer.status == 503 and answer.is_problem, answer
            assert "database" in answer.body["detail"]
    finally:
        server.kill()


def test_a_5xx_during_an_outage_leaves_the_http_connection_usable(
    cluster: PgCluster, tmp_path: Path
) -> None:
    url = cluster.url(f"keepalive_{uuid.uuid4().hex[:10]}")
    tenant = make_tenant(url, runs=1)
    path = f"/v1/runs/{tenant.runs[0]}"
    server = ServeProcess(url, tmp_path)
    try:
        client = Http(server.port, tenant.token, timeout=OUTAGE_BOUND)
        assert client.call("GET", path).status == 200
        with restarted_afterwards(cluster):
            cluster.stop("fast")
            answer = client.call("GET", path)
            assert answer.status >= 500 and answer.is_problem, answer
            announced_close = answer.headers.get("connection", "").lower() == "close"
            cluster.start()
        if not announced_close:  # kept alive: the connection must carry the next request
            try:
                client.call("GET", path)
            except (http.client.RemoteDisconnected, ConnectionError) as error:
                raise AssertionError(
                    f"the server closed a keep-alive connection after a {answer.status}"
                    f" without saying so: {error!r}"
                ) from None
    finally:
        server.kill()


# ============================================================ the projector thread


PROJECTOR_CANCELS = 12  # more than the 10 attempts eventsourcing makes itself


def test_the_projector_thread_survives_failing_reads_of_the_event_log(
    pg_url: str, tmp_path: Path
) -> None:
    """Reads of the log cancelled (as by statement_timeout or an operator), then fine again.

    The projector must treat it like a dropped connection: back off, retry,
    and catch up once the log can be read.
    """
    settings = Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": pg_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
        }
    )
    with Runtime.open(settings) as runtime:
        stop = threading.Event()
        thread = threading.Thread(
            target=runtime.projector.run, args=(stop,), name="projector", daemon=True
        )
        thread.start()

        def views_at(position: int) -> Callable[[], bool]:
            return lambda: all(s.position >= position for s in runtime.projector.status())

        try:
            _, position = runtime.app.create_team("before")
            wait_until(views_at(position), 30, "the views to project the first team")
            cancelled: set[tuple[int, datetime]] = set()  # each blocked statement once
            with direct_conn(pg_url) as locker, direct_conn(pg_url) as watcher:
                locker.execute("BEGIN")
                locker.execute("LOCK TABLE resultsvc_events IN ACCESS EXCLUSIVE MODE")

                def cancel_reads() -> bool:
                    for statement in blocked_by(watcher, locker):
                        if statement not in cancelled:
                            watcher.execute("SELECT pg_cancel_backend(%s)", (statement[0],))
                            cancelled.add(statement)
                    return len(cancelled) >= PROJECTOR_CANCELS or not thread.is_alive()

                try:
                    wait_until(cancel_reads, 60, "the projector's reads to be cancelled")
                finally:
                    locker.execute("COMMIT")
            assert len(cancelled) >= 10
            _, position = runtime.app.create_team("after")
            wait_until(
                lambda: not thread.is_alive() or views_at(position)(),
                30,
                "the projector to catch up (or to have died)",
            )
            assert thread.is_alive(), "the projector thread ended"
            assert views_at(position)()
        finally:
            stop.set()
            thread.join(timeout=30)
