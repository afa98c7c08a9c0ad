"""Queue ingest over SQS (moto over HTTP): exactly-once effect, dead letters, failures, signals.

docs/queue-ingest.md is the contract. In-process tests drive ``QueueConsumer``
on the ``runtime`` of the parametrised store; the process tests run the real
``resultsvc`` script (``consume``, ``send-results``, ``serve --consume``) on
PostgreSQL or SQLite. Faults are real: a proxy answering SQS with an error, a
PostgreSQL backend terminated while it waits for the events table.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError
from psycopg import sql

from service import queue_messages as qm
from service.database import parse_database_url
from service.queue_consumer import BACKOFF_SECONDS, NoDeadLetterQueue, QueueConsumer
from service.queue_sender import QueueSender
from service.samples import findings
from tests.aws_proxy import Fault, Recorded, aws_proxy
from tests.conftest import free_port
from tests.queue_support import (
    RESULTSVC,
    QueuePair,
    TeamWorld,
    contiguous_batches,
    create_queue_pair,
    head,
    make_team,
    parse_report,
    queue_depth,
    receive_all,
    sqs_tap,
    subprocess_env,
    topics_after,
    wait_until,
)

PG_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
RECEIPT = "resultsvc/Receipt/Recorded"
BATCH = "resultsvc/ResultBatch/Recorded"
REASON = "resultsvc-reason"


@pytest.fixture
def sqs(aws: str) -> Any:
    """A client straight to moto (never through a test proxy)."""
    return boto3.client("sqs", endpoint_url=aws)


@pytest.fixture
def pair(sqs: Any) -> QueuePair:
    return create_queue_pair(sqs)


@pytest.fixture
def blue(runtime: Any) -> TeamWorld:
    return make_team(runtime, "blue")


def consumer_of(runtime: Any, pair: QueuePair, **options: Any) -> QueueConsumer:
    return QueueConsumer(runtime, pair.url, wait_seconds=0, **options)


def drain(consumer: QueueConsumer) -> None:
    consumer.run(threading.Event(), until_empty=True)


def batches_of(bodies: list[str]) -> list[list[dict[str, Any]]]:
    return [json.loads(body)["results"] for body in bodies]


def by_resource(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda f: f["resource_arn"])


def target_is(name: str) -> Any:
    def matches(request: Recorded) -> bool:
        return request.headers.get("X-Amz-Target") == f"AmazonSQS.{name}"

    return matches


def metric(text: str, queue: str, outcome: str) -> float | None:
    for line in text.splitlines():
        labels = (f'queue="{queue}"', f'outcome="{outcome}"')
        if line.startswith("resultsvc_queue_messages{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------ 1. round trip


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
def test_a_run_sent_through_the_queue_is_recorded_whole(
    runtime: Any, sqs: Any, blue: TeamWorld, fifo: bool
) -> None:
    pair = create_queue_pair(sqs, fifo=fifo)
    run_id = uuid4()
    sent = list(findings(3_000, seed=11))
    bodies = list(qm.record_results(blue.id, run_id, sent, f"{run_id}/r", 1000))
    assert len(bodies) == 6  # 1,000 sample findings do not fit in 252 KiB: halved
    start = qm.start_run(blue.id, blue.plan_id, run_id, f"{run_id}/start")
    complete = qm.complete_run(blue.id, run_id, f"{run_id}/complete", "succeeded")
    sender = QueueSender(pair.url, blue.token, group=str(run_id), sqs=sqs)
    consumer = consumer_of(runtime, pair)
    before = head(runtime)

    if fifo:  # a FIFO queue keeps the order of a message group: all at once
        for body in [start, *bodies, complete]:
            sender.send(body)
        drain(consumer)
    else:  # a standard queue does not: each step once the previous one is consumed
        for step in ([start], bodies, [complete]):
            for body in step:
                sender.send(body)
            drain(consumer)

    counts = consumer.report.counts
    assert counts == {"applied": 8, "duplicate": 0, "dead_lettered": 0, "left": 0}
    assert consumer.report.findings == 3_000
    run = runtime.app.get_run(blue.id, run_id)
    assert (run.total, run.status, run.batches) == (3_000, "succeeded", 6)
    received = list(runtime.app.run_results(blue.id, run_id))
    if fifo:
        assert received == sent
    else:
        assert contiguous_batches(received, batches_of(bodies))
    assert Counter(topics_after(runtime, before))[RECEIPT] == 8
    assert queue_depth(sqs, pair.url) == (0, 0)
    assert queue_depth(sqs, pair.dead_letter_url) == (0, 0)


# ------------------------------------------------------------------ 2. duplicates


def test_every_message_delivered_twice_is_applied_once(
    runtime: Any, sqs: Any, pair: QueuePair, blue: TeamWorld
) -> None:
    run_id = uuid4()
    runtime.app.start_run(blue.id, blue.plan_id, run_id=run_id)
    sent = list(findings(1_500, seed=2))
    bodies = list(qm.record_results(blue.id, run_id, sent, f"{run_id}/r", 500))
    bodies.append(qm.complete_run(blue.id, run_id, f"{run_id}/complete", "failed", "timeout"))
    sender = QueueSender(pair.url, blue.token, sqs=sqs)
    for body in bodies:
        sender.send(body)
        sender.send(body)
    consumer = consumer_of(runtime, pair)
    before = head(runtime)

    drain(consumer)

    assert consumer.report.counts == {"applied": 4, "duplicate": 4, "dead_lettered": 0, "left": 0}
    assert consumer.report.findings == 1_500
    run = runtime.app.get_run(blue.id, run_id)
    assert (run.total, run.status, run.error) == (1_500, "failed", "timeout")
    assert list(runtime.app.run_results(blue.id, run_id)) == sent
    appended = Counter(topics_after(runtime, before))
    assert (appended[RECEIPT], appended[BATCH]) == (4, 3)
    assert queue_depth(sqs, pair.url) == (0, 0)

    # Sent a third time, later: still nothing appended.
    after_first = head(runtime)
    sender.send(bodies[0])
    drain(consumer)
    assert consumer.report.counts["duplicate"] == 5
    assert head(runtime) == after_first


def test_a_message_whose_delete_failed_comes_back_and_counts_as_duplicate(
    runtime: Any,
    sqs: Any,
    pair: QueuePair,
    blue: TeamWorld,
    aws: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = uuid4()
    runtime.app.start_run(blue.id, blue.plan_id, run_id=run_id)
    sent = list(findings(800, seed=4))
    sender = QueueSender(pair.url, blue.token, sqs=sqs)
    for body in qm.record_results(blue.id, run_id, sent, f"{run_id}/r", 400):
        sender.send(body)
    with aws_proxy(aws) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", proxy.url)
        failing = threading.Event()
        failing.set()
        is_delete = target_is("DeleteMessageBatch")
        proxy.rules.append(
            lambda r: Fault(403, "AccessDenied") if failing.is_set() and is_delete(r) else None
        )
        consumer = consumer_of(runtime, pair)

        assert consumer.poll() == 2
        assert consumer.report.counts["applied"] == 2
        applied_head = head(runtime)
        deletes = [r for r in proxy.requests if is_delete(r)]
        assert deletes, "the consumer never tried to delete what it applied"
        assert queue_depth(sqs, pair.url) == (0, 2)  # not deleted: in flight

        # The delete failed: SQS hands the messages out again (made visible now
        # with the handles the consumer used, instead of waiting for the lease).
        failing.clear()
        for entry in json.loads(deletes[-1].body)["Entries"]:
            sqs.change_message_visibility(
                QueueUrl=pair.url, ReceiptHandle=entry["ReceiptHandle"], VisibilityTimeout=0
            )
        assert consumer.poll() == 2

    assert consumer.report.counts == {"applied": 2, "duplicate": 2, "dead_lettered": 0, "left": 0}
    assert consumer.report.findings == 800
    assert head(runtime) == applied_head
    assert runtime.app.get_run(blue.id, run_id).total == 800
    assert list(runtime.app.run_results(blue.id, run_id)) == sent
    assert queue_depth(sqs, pair.url) == (0, 0)


# ------------------------------------------------------------------ 3. poison


def test_poison_messages_are_dead_lettered_with_their_reason_and_counted(
    runtime: Any, api: Any, sqs: Any, pair: QueuePair, blue: TeamWorld
) -> None:
    app = runtime.app
    red = make_team(runtime, "red")
    blue_run, red_run, ended_run = uuid4(), uuid4(), uuid4()
    app.start_run(blue.id, blue.plan_id, run_id=blue_run)
    app.start_run(red.id, red.plan_id, run_id=red_run)
    app.start_run(blue.id, blue.plan_id, run_id=ended_run)
    app.complete_run(blue.id, ended_run, "succeeded")
    revoked = runtime.tokens.create(team_id=str(blue.id), scopes=frozenset({"ingest"}))
    with runtime.views.writing() as cur:
        cur.execute("UPDATE api_tokens SET revoked = 1 WHERE token_id = ?", [revoked.split("_")[1]])
    reader = runtime.tokens.create(team_id=str(blue.id), scopes=frozenset({"read"}))
    consumer = consumer_of(runtime, pair)

    good = list(findings(2, seed=9))
    keyed = next(qm.record_results(blue.id, blue_run, good, "blue/keyed", 1000))
    QueueSender(pair.url, blue.token, sqs=sqs).send(keyed)
    drain(consumer)
    assert consumer.report.counts["applied"] == 1
    before = head(runtime)

    def records(team: UUID, run: UUID, prefix: str, results: list[Any] = good) -> str:
        return next(qm.record_results(team, run, results, prefix, 1000))  # key <prefix>/1

    unknown_run, unknown_plan = uuid4(), uuid4()
    urgent = [dict(good[0]), dict(good[1], severity="urgent")]
    cases: dict[str, tuple[str, str | None, str]] = {
        "not JSON": ('{"schema": 1, "command": ', blue.token, "body: must be valid JSON"),
        "bad finding": (
            records(blue.id, blue_run, "p/urgent", urgent),
            blue.token,
            "results[1].severity: must be one of critical, high",
        ),
        "no token": (records(blue.id, blue_run, "p/none"), None, "Authorization: "),
        "revoked token": (
            records(blue.id, blue_run, "p/revoked"),
            revoked,
            "Authorization: invalid or revoked token",
        ),
        "unknown token": (
            records(blue.id, blue_run, "p/unknown"),
            "rsvc_0123456789ab_not-a-secret",
            "Authorization: invalid or revoked token",
        ),
        "read token": (
            records(blue.id, blue_run, "p/read"),
            reader,
            "Authorization: this needs an ingest token",
        ),
        "envelope of another team": (
            records(red.id, red_run, "p/red"),
            blue.token,
            "team_id: is not the team of the token",
        ),
        "another team's run": (
            records(red.id, blue_run, "p/steal"),
            red.token,
            f"run_id: run {blue_run} not found",
        ),
        "unknown run": (
            records(red.id, unknown_run, "p/nowhere"),
            red.token,
            f"run_id: run {unknown_run} not found",
        ),
        "another team's plan": (
            qm.start_run(red.id, blue.plan_id, uuid4(), "p/plan"),
            red.token,
            f"plan_id: plan {blue.plan_id} not found",
        ),
        "unknown plan": (
            qm.start_run(red.id, unknown_plan, uuid4(), "p/noplan"),
            red.token,
            f"plan_id: plan {unknown_plan} not found",
        ),
        "ended run": (
            records(blue.id, ended_run, "p/late"),
            blue.token,
            f"run_id: run {ended_run} has ended",
        ),
        "key reused with another body": (
            records(blue.id, blue_run, "blue/keyed", list(findings(3, seed=10))),
            blue.token,
            "idempotency_key: was applied before to another message",
        ),
    }
    sent_ids: dict[str, str] = {}
    for name, (body, token, _) in cases.items():
        if token is None:
            sent_ids[name] = sqs.send_message(QueueUrl=pair.url, MessageBody=body)["MessageId"]
        else:
            sent_ids[name] = QueueSender(pair.url, token, sqs=sqs).send(body)

    drain(consumer)

    counts = consumer.report.counts
    assert counts == {"applied": 1, "duplicate": 0, "dead_lettered": len(cases), "left": 0}
    letters = {
        m["MessageAttributes"]["resultsvc-source-message-id"]["StringValue"]: m
        for m in receive_all(sqs, pair.dead_letter_url)
    }
    assert sorted(letters) == sorted(sent_ids.values())
    reasons: dict[str, str] = {}
    for name, (body, _, expected) in cases.items():
        letter = letters[sent_ids[name]]
        attributes = letter["MessageAttributes"]
        assert letter["Body"] == body, name
        assert "Authorization" not in attributes, f"{name}: the token was copied"
        reasons[name] = attributes[REASON]["StringValue"]
        assert reasons[name].startswith(expected), (name, reasons[name])
        refused_at = datetime.fromisoformat(attributes["resultsvc-refused-at"]["StringValue"])
        assert refused_at.tzinfo is not None
    # Another team's ids are refused exactly like ids that do not exist.
    assert reasons["another team's run"].replace(str(blue_run), "ID") == reasons[
        "unknown run"
    ].replace(str(unknown_run), "ID")
    assert reasons["another team's plan"].replace(str(blue.plan_id), "ID") == reasons[
        "unknown plan"
    ].replace(str(unknown_plan), "ID")

    assert queue_depth(sqs, pair.url) == (0, 0)
    assert head(runtime) == before, "a refused message appended events"
    assert app.get_run(blue.id, blue_run).total == 2
    assert app.get_run(red.id, red_run).total == 0

    page = api.get("/metrics")
    assert page.status_code == 200
    assert metric(page.text, pair.url, "dead_lettered") == len(cases)
    assert metric(page.text, pair.url, "applied") == 1


@SQLITE_ONLY
def test_the_reason_for_an_unknown_run_or_plan_names_the_field(
    runtime: Any, sqs: Any, pair: QueuePair, blue: TeamWorld
) -> None:
    sender = QueueSender(pair.url, blue.token, sqs=sqs)
    sender.send(next(qm.record_results(blue.id, uuid4(), list(findings(1)), "k/run", 10)))
    sender.send(qm.start_run(blue.id, uuid4(), uuid4(), "k/plan"))
    drain(consumer_of(runtime, pair))
    reasons = sorted(
        m["MessageAttributes"][REASON]["StringValue"]
        for m in receive_all(sqs, pair.dead_letter_url)
    )
    assert len(reasons) == 2
    assert reasons[0].startswith("plan_id: "), reasons
    assert reasons[1].startswith("run_id: "), reasons


@SQLITE_ONLY
def test_a_queue_without_redrive_policy_needs_a_dead_letter_queue_given(
    runtime: Any, sqs: Any
) -> None:
    pair = create_queue_pair(sqs, redrive=False)
    with pytest.raises(NoDeadLetterQueue):
        consumer_of(runtime, pair)
    consumer = QueueConsumer(runtime, pair.url, pair.dead_letter_url, wait_seconds=0)
    sqs.send_message(QueueUrl=pair.url, MessageBody='{"schema": 1}')
    drain(consumer)
    assert consumer.report.counts["dead_lettered"] == 1
    [letter] = receive_all(sqs, pair.dead_letter_url)
    assert letter["MessageAttributes"][REASON]["StringValue"].startswith("Authorization: ")


@SQLITE_ONLY
def test_a_dead_letter_queue_that_refuses_leaves_the_message_and_the_consumer_goes_on(
    runtime: Any,
    sqs: Any,
    pair: QueuePair,
    blue: TeamWorld,
    aws: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = uuid4()
    runtime.app.start_run(blue.id, blue.plan_id, run_id=run_id)
    sender = QueueSender(pair.url, blue.token, sqs=sqs)
    sender.send("not JSON")
    sender.send(next(qm.record_results(blue.id, run_id, list(findings(2)), "k", 10)))
    dead_name = pair.dead_letter_url.rsplit("/", 1)[1]
    is_send = target_is("SendMessage")
    with aws_proxy(aws) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", proxy.url)
        proxy.rules.append(
            lambda r: (
                Fault(403, "AccessDenied") if is_send(r) and dead_name in r.body.decode() else None
            )
        )
        consumer = consumer_of(runtime, pair)
        try:
            received = consumer.poll()
        except ClientError as error:
            pytest.fail(f"poll() raised {error!r}: the consumer stops")
    assert received == 2
    assert consumer.report.counts["left"] == 1  # kept for a later attempt, not lost
    assert consumer.report.counts["applied"] == 1  # the next message still applied
    assert runtime.app.get_run(blue.id, run_id).total == 2
    assert queue_depth(sqs, pair.url) == (0, 1)


# ------------------------------------------------------------------ 4. passing failure


@PG_ONLY
def test_a_database_failure_leaves_the_message_then_it_applies_once(
    runtime: Any,
    database_url: str,
    sqs: Any,
    pair: QueuePair,
    blue: TeamWorld,
    aws: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = uuid4()
    runtime.app.start_run(blue.id, blue.plan_id, run_id=run_id)
    sent = list(findings(500, seed=5))
    QueueSender(pair.url, blue.token, sqs=sqs).send(
        next(qm.record_results(blue.id, run_id, sent, f"{run_id}/r", 1000))
    )
    config = parse_database_url(database_url)
    events = sql.SQL("{}.{}").format(
        sql.Identifier(config.schema), sql.Identifier("resultsvc_events")
    )
    before = head(runtime)
    is_visibility = target_is("ChangeMessageVisibility")

    with (
        aws_proxy(aws) as proxy,
        psycopg.connect(config.conninfo()) as locker,
        psycopg.connect(config.conninfo(), autocommit=True) as admin,
        ThreadPoolExecutor(1) as pool,
    ):
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", proxy.url)
        consumer = consumer_of(runtime, pair)
        # Reads go on; an append waits for the table (the store sets no lock timeout).
        locker.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(events))
        polled = pool.submit(consumer.poll)

        def connection_lost() -> bool:
            # The appending backend goes away, as in a failover; the store's own
            # retries get the same answer until they give up.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%%'"
                " AND position(%s in query) > 0",
                [f'"{config.schema}"'],
            )
            return polled.done()

        wait_until(connection_lost, 60, "the blocked append to fail")
        assert polled.result() == 1
        locker.rollback()
        backoffs = [
            json.loads(r.body)
            for r in proxy.requests
            if is_visibility(r) and json.loads(r.body)["VisibilityTimeout"] == BACKOFF_SECONDS
        ]

    assert consumer.report.counts == {"applied": 0, "duplicate": 0, "dead_lettered": 0, "left": 1}
    assert head(runtime) == before
    assert runtime.app.get_run(blue.id, run_id).total == 0
    assert queue_depth(sqs, pair.url) == (0, 1)  # kept, invisible for the back-off
    assert queue_depth(sqs, pair.dead_letter_url) == (0, 0)
    assert len(backoffs) == 1

    # The database is back; the back-off ends now rather than in 15 s.
    sqs.change_message_visibility(
        QueueUrl=pair.url, ReceiptHandle=backoffs[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    assert consumer.poll() == 1
    assert consumer.report.counts == {"applied": 1, "duplicate": 0, "dead_lettered": 0, "left": 1}
    assert runtime.app.get_run(blue.id, run_id).total == 500
    assert list(runtime.app.run_results(blue.id, run_id)) == sent
    assert Counter(topics_after(runtime, before)) == Counter(
        {"resultsvc/PlanRun/BatchRecorded": 1, BATCH: 1, RECEIPT: 1}
    )
    assert queue_depth(sqs, pair.url) == (0, 0)


# ------------------------------------------------------------------ 5, 6. processes


@pytest.fixture
def forty_batches(
    runtime: Any, sqs: Any, pair: QueuePair, blue: TeamWorld
) -> tuple[UUID, list[dict[str, Any]], list[str]]:
    """A started run and 40 messages of 500 findings on the queue."""
    run_id = uuid4()
    runtime.app.start_run(blue.id, blue.plan_id, run_id=run_id)
    sent = list(findings(20_000, seed=3))
    bodies = list(qm.record_results(blue.id, run_id, sent, f"{run_id}/r", 500))
    assert len(bodies) == 40
    sender = QueueSender(pair.url, blue.token, sqs=sqs)
    for body in bodies:
        sender.send(body)
    return run_id, sent, bodies


def consume_process(
    pair: QueuePair, env: dict[str, str], cwd: Path, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RESULTSVC, "consume", "--queue", pair.url, "--wait-seconds", "1", *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test started; any still running at the end is killed."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def some_applied(runtime: Any, base: int, process: subprocess.Popen[Any]) -> Any:
    # Three events a message: the run's marker, the batch, the receipt.
    return lambda: head(runtime) >= base + 2 * 3 or process.poll() is not None


@PG_ONLY
def test_a_consumer_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    runtime: Any,
    database_url: str,
    sqs: Any,
    pair: QueuePair,
    blue: TeamWorld,
    aws: str,
    tmp_path: Path,
    forty_batches: tuple[UUID, list[dict[str, Any]], list[str]],
    processes: list[subprocess.Popen[Any]],
) -> None:
    run_id, sent, bodies = forty_batches
    base = head(runtime)
    with sqs_tap(aws) as tap:
        env = subprocess_env(database_url, tmp_path, AWS_ENDPOINT_URL_SQS=tap.url)
        process = consume_process(pair, env, tmp_path)
        processes.append(process)
        wait_until(some_applied(runtime, base, process), 90, "the consumer to apply batches")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        handles = tap.receipt_handles()
        deleted = tap.deleted()
    assert process.returncode == -signal.SIGKILL
    killed_at = runtime.app.get_run(blue.id, run_id).total
    assert 0 < killed_at < 20_000, "killed too late: the test needs a consumer mid-queue"
    committed = killed_at // 500
    assert deleted <= committed, "a message was deleted before its events were committed"

    # The killed consumer's leases would end in 60 s; hand its messages back now.
    # (Handles of messages it had deleted are refused: those are gone.)
    for handle in handles:
        with suppress(ClientError):
            sqs.change_message_visibility(
                QueueUrl=pair.url, ReceiptHandle=handle, VisibilityTimeout=0
            )
    restart = subprocess.run(
        [RESULTSVC, "consume", "--queue", pair.url, "--wait-seconds", "1", "--until-empty"],
        cwd=tmp_path,
        env=subprocess_env(database_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restart.returncode == 0, restart.stderr
    report = parse_report(restart.stdout)
    assert report["findings"] == 20_000 - killed_at
    assert report["applied"] == 40 - committed
    # Committed but not deleted when killed: delivered again, found applied.
    assert report["duplicate"] == committed - deleted
    assert (report["dead_lettered"], report["left"]) == (0, 0)

    run = runtime.app.get_run(blue.id, run_id)
    assert (run.total, run.batches) == (20_000, 40)
    received = list(runtime.app.run_results(blue.id, run_id))
    assert by_resource(received) == by_resource(sent)
    assert contiguous_batches(received, batches_of(bodies))
    assert Counter(topics_after(runtime, base))[RECEIPT] == 40
    assert queue_depth(sqs, pair.url) == (0, 0)
    assert queue_depth(sqs, pair.dead_letter_url) == (0, 0)


@PG_ONLY
def test_sigterm_finishes_the_message_in_hand_and_a_restart_completes_exactly(
    runtime: Any,
    database_url: str,
    sqs: Any,
    pair: QueuePair,
    blue: TeamWorld,
    tmp_path: Path,
    forty_batches: tuple[UUID, list[dict[str, Any]], list[str]],
    processes: list[subprocess.Popen[Any]],
) -> None:
    run_id, _, bodies = forty_batches
    base = head(runtime)
    env = subprocess_env(database_url, tmp_path)
    process = consume_process(pair, env, tmp_path)
    processes.append(process)
    wait_until(some_applied(runtime, base, process), 90, "the consumer to apply batches")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    first = parse_report(out)
    stopped_at = runtime.app.get_run(blue.id, run_id).total
    assert 0 < stopped_at < 20_000, "stopped too late: the test needs a consumer mid-queue"
    assert first["findings"] == stopped_at  # what it reports is what it committed

    # No lease to wait for: applied messages were deleted, the others handed back.
    restart = consume_process(pair, env, tmp_path, "--until-empty")
    processes.append(restart)
    out, err = restart.communicate(timeout=120)
    assert restart.returncode == 0, err
    second = parse_report(out)
    assert second["duplicate"] == 0, "a message applied before the stop was not deleted"
    assert first["applied"] + second["applied"] == 40
    assert first["findings"] + second["findings"] == 20_000

    received = list(runtime.app.run_results(blue.id, run_id))
    assert len(received) == runtime.app.get_run(blue.id, run_id).total == 20_000
    assert contiguous_batches(received, batches_of(bodies))
    assert Counter(topics_after(runtime, base))[RECEIPT] == 40
    assert queue_depth(sqs, pair.url) == (0, 0)


# ------------------------------------------------------------------ 8. send-results


@SQLITE_ONLY
def test_send_results_refuses_to_start_or_complete_a_run_on_a_standard_queue(
    database_url: str, sqs: Any, pair: QueuePair, blue: TeamWorld, tmp_path: Path
) -> None:
    findings_file = tmp_path / "findings.jsonl"
    findings_file.write_text(json.dumps(next(iter(findings(1, seed=3)))) + "\n")
    token_file = tmp_path / "ingest.token"
    token_file.write_text(blue.token + "\n")
    done = subprocess.run(
        [
            *(RESULTSVC, "send-results", "--queue", pair.url, "--team", str(blue.id)),
            *("--run", str(uuid4()), "--token-file", str(token_file)),
            *("--start-plan", str(blue.plan_id), str(findings_file)),
        ],
        cwd=tmp_path,
        env=subprocess_env(database_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "FIFO" in done.stderr.strip().splitlines()[-1]
    assert queue_depth(sqs, pair.url) == (0, 0)


@SQLITE_ONLY
def test_send_results_then_consume_records_the_run_and_a_resend_appends_nothing(
    runtime: Any,
    database_url: str,
    sqs: Any,
    blue: TeamWorld,
    tmp_path: Path,
) -> None:
    # --start-plan and --complete need the order only a FIFO queue keeps.
    pair = create_queue_pair(sqs, fifo=True)
    run_id = uuid4()
    sent = list(findings(1_200, seed=8))
    lines = [json.dumps(f) for f in sent]
    findings_file = tmp_path / "findings.jsonl"
    findings_file.write_text("\n".join([*lines[:600], "", *lines[600:]]) + "\n")
    token_file = tmp_path / "ingest.token"
    token_file.write_text(blue.token + "\n")
    env = subprocess_env(database_url, tmp_path)

    def send(path: Path, run: UUID) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(RESULTSVC, "send-results", "--queue", pair.url, "--team", str(blue.id)),
                *("--run", str(run), "--token-file", str(token_file)),
                *("--start-plan", str(blue.plan_id), "--complete", "succeeded", str(path)),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def consume() -> dict[str, int]:
        done = subprocess.run(
            [RESULTSVC, "consume", "--queue", pair.url, "--until-empty", "--wait-seconds", "1"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return parse_report(done.stdout)

    sending = send(findings_file, run_id)
    assert sending.returncode == 0, sending.stderr
    assert f"sent 5 messages (1200 findings) for run {run_id}" in sending.stdout
    assert blue.token not in sending.stdout + sending.stderr
    assert queue_depth(sqs, pair.url) == (5, 0)  # start, 3 batches (500, 500, 200), complete
    report = consume()
    assert report == {
        "applied": 5,
        "duplicate": 0,
        "dead_lettered": 0,
        "left": 0,
        "findings": 1_200,
    }
    run = runtime.app.get_run(blue.id, run_id)
    assert (run.total, run.status) == (1_200, "succeeded")
    assert by_resource(list(runtime.app.run_results(blue.id, run_id))) == by_resource(sent)
    settled = head(runtime)

    again = send(findings_file, run_id)
    assert again.returncode == 0, again.stderr
    resent = consume()  # SQS's own FIFO deduplication may drop them first; either way:
    assert (resent["applied"], resent["dead_lettered"], resent["findings"]) == (0, 0, 0)
    assert head(runtime) == settled
    assert runtime.app.get_run(blue.id, run_id).total == 1_200

    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1], '{"rule_id": "x",', lines[2]]) + "\n")
    refused = send(broken, uuid4())
    assert refused.returncode != 0
    assert "line 3" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert queue_depth(sqs, pair.url) == (0, 0), "something was sent"


@SQLITE_ONLY
def test_consume_without_a_dead_letter_queue_refuses_to_start(
    runtime: Any, database_url: str, sqs: Any, tmp_path: Path
) -> None:
    pair = create_queue_pair(sqs, redrive=False)
    sqs.send_message(QueueUrl=pair.url, MessageBody="{}")
    done = subprocess.run(
        [RESULTSVC, "consume", "--queue", pair.url, "--until-empty", "--wait-seconds", "0"],
        cwd=tmp_path,
        env=subprocess_env(database_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "no redrive policy" in done.stderr and "--dead-letter-queue" in done.stderr
    assert "Traceback" not in done.stderr
    assert queue_depth(sqs, pair.url) == (1, 0)  # untouched


# ------------------------------------------------------------------ 9. serve --consume


def call(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        answer = conn.getresponse()
        raw = answer.read()
    finally:
        conn.close()
    return answer.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()


@PG_ONLY
def test_serve_with_consume_applies_messages_readable_over_http_then_stops_on_sigterm(
    runtime: Any,
    database_url: str,
    sqs: Any,
    pair: QueuePair,
    tmp_path: Path,
    processes: list[subprocess.Popen[Any]],
) -> None:
    team = make_team(runtime, "served", frozenset({"ingest", "read"}))
    run_id = uuid4()
    sent = list(findings(1_100, seed=12))
    bodies = list(qm.record_results(team.id, run_id, sent, f"{run_id}/r", 1000))
    port = free_port()
    with (tmp_path / "serve.log").open("w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [RESULTSVC, "serve", "--port", str(port), "--no-scheduler", "--consume", pair.url],
            cwd=tmp_path,
            env=subprocess_env(database_url, tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    processes.append(process)

    def healthy() -> bool:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        with suppress(OSError):
            return call(port, "/healthz")[0] == 200
        return False

    wait_until(healthy, 60, "serve to answer /healthz", interval=0.1)
    sender = QueueSender(pair.url, team.token, sqs=sqs)
    # As the guide says for a standard queue: each step once the queue has taken the last.
    for step in (
        [qm.start_run(team.id, team.plan_id, run_id, f"{run_id}/start")],
        bodies,
        [qm.complete_run(team.id, run_id, f"{run_id}/complete", "succeeded")],
    ):
        for body in step:
            sender.send(body)
        wait_until(lambda: queue_depth(sqs, pair.url) == (0, 0), 60, "the queue to be consumed")

    def readable() -> bool:
        status, run = call(port, f"/v1/runs/{run_id}", team.token)
        return status == 200 and run["total"] == 1_100 and run["status"] == "succeeded"

    wait_until(readable, 60, "the run to be readable", interval=0.05)
    status, page = call(port, "/metrics")
    assert status == 200
    assert metric(page, pair.url, "applied") == len(bodies) + 2
    assert queue_depth(sqs, pair.dead_letter_url) == (0, 0)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not re.search(r"Traceback", (tmp_path / "serve.log").read_text())
    assert runtime.app.get_run(team.id, run_id).total == 1_100
