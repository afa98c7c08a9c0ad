"""Queue benchmark: findings/s through the SQS consumer, beside HTTP ingest in the same run.

    .venv/bin/python bench/queue_ingest.py [--findings 200000] [--batch 500] [--consumers 1,2]

Both paths write to the same PostgreSQL (a scratch database), with batches of
``--batch`` findings:

1. HTTP: ``resultsvc serve`` in its own process, one client and then four
   (as ``bench/http_ingest.py``).
2. Queue: the messages are put on a queue of a moto server (its own process,
   on loopback) beforehand, untimed; then ``N`` consumers (threads of this
   process, each a ``QueueConsumer`` as ``resultsvc consume`` runs it) drain
   it, timed from the first receive to the last finding applied. The batches
   belong to four runs, interleaved on the queue. moto stands
   in for SQS: its latencies are loopback ones, not AWS's (~10-30 ms per call).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from uuid import UUID, uuid4

import boto3
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stopwatch, scratch_database
from bench.http_ingest import bench_http_ingest, free_port, prepare_team, start_server
from service import queue_messages as messages
from service.queue_consumer import QueueConsumer
from service.queue_sender import QueueSender
from service.runtime import Runtime
from service.samples import batches
from service.settings import Settings

RUNS = 4  # the findings go to four runs, as the HTTP benchmark's four clients do


def start_moto(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("moto did not start")


def queue_pair(sqs: object) -> str:
    name = uuid4().hex[:12]
    dlq = sqs.create_queue(QueueName=f"dlq-{name}")["QueueUrl"]  # type: ignore[attr-defined]
    arn = sqs.get_queue_attributes(  # type: ignore[attr-defined]
        QueueUrl=dlq, AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})
    answer = sqs.create_queue(  # type: ignore[attr-defined]
        QueueName=f"q-{name}", Attributes={"RedrivePolicy": policy}
    )
    return str(answer["QueueUrl"])


def bench_queue(
    url: str, team: str, plan: str, token: str, all_batches: list[list[dict]], consumers: int
) -> float:
    """Seconds for ``consumers`` to apply every batch, the messages being queued beforehand."""
    sqs = boto3.client("sqs")
    queue = queue_pair(sqs)
    team_id, runs = UUID(team), [uuid4() for _ in range(RUNS)]
    settings = Settings.from_env({"RESULTSVC_DATABASE_URL": url})
    with Runtime.open(settings) as runtime:
        for run in runs:
            runtime.app.start_run(team_id, UUID(plan), run_id=run)
        sender = QueueSender(queue, token, sqs=sqs)
        for number, batch in enumerate(all_batches):
            run = runs[number % RUNS]  # interleaved, as workers' messages arrive
            for body in messages.record_results(team_id, run, batch, f"{run}/{number}", len(batch)):
                sender.send(body)
        expected = sum(len(b) for b in all_batches)
        workers = [
            QueueConsumer(runtime, queue, sqs=boto3.client("sqs"), wait_seconds=1)
            for _ in range(consumers)
        ]
        done = threading.Event()

        def drain(consumer: QueueConsumer) -> None:
            while not done.is_set():
                consumer.poll(done)
                if sum(w.report.findings for w in workers) >= expected:
                    done.set()

        threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
        with Stopwatch() as sw:
            for thread in threads:
                thread.start()
            done.wait()
        for thread in threads:
            thread.join()
        total = sum(runtime.app.get_run(team_id, run).total for run in runs)
        if total != expected:
            raise SystemExit(f"queue ingest lost or doubled findings: {total} != {expected}")
        dead = sum(w.report.counts["dead_lettered"] for w in workers)
        if dead:
            raise SystemExit(f"{dead} messages were dead-lettered")
    return sw.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--findings", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--consumers", default="1,2")
    args = parser.parse_args()

    all_batches = [list(b) for b in batches(args.findings, args.batch, seed=11)]
    bodies = [orjson.dumps({"results": batch}) for batch in all_batches]
    moto_port = free_port()
    moto = start_moto(moto_port)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="eu-west-1",
    )
    try:
        with scratch_database("bench_queue") as url:
            team, plan, token = prepare_team(url)
            port = free_port()
            server = start_server(url, port)
            try:
                http_1 = args.findings / bench_http_ingest(port, plan, token, bodies, 1)
                http_4 = args.findings / bench_http_ingest(port, plan, token, bodies, 4)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
            print(f"ingest: {args.findings} findings in batches of {args.batch} (PostgreSQL)")
            print(f"  HTTP, 1 client            : {http_1:10,.0f} findings/s")
            print(f"  HTTP, 4 clients           : {http_4:10,.0f} findings/s")
            for count in (int(c) for c in args.consumers.split(",")):
                rate = args.findings / bench_queue(url, team, plan, token, all_batches, count)
                print(
                    f"  queue, {count} consumer(s)      : {rate:10,.0f} findings/s"
                    f"   (x{rate / http_1:.2f} HTTP 1 client, x{rate / http_4:.2f} HTTP 4 clients)"
                )
    finally:
        moto.send_signal(signal.SIGTERM)
        moto.wait(timeout=30)


if __name__ == "__main__":
    main()
