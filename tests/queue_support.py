"""Helpers for the queue-ingest tests: queue pairs on moto, teams, bounded waits, an SQS tap.

Nothing here patches boto3 or the service: queues are real (moto over HTTP),
teams are made through the application, and the tap is an HTTP proxy that
forwards every request unchanged and keeps what SQS answered (the receipt
handles of received messages), so a test can hand messages of a killed
consumer back to the queue the way an operator with the handles could.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
REPORT = re.compile(
    r"(?P<applied>\d+) applied, (?P<duplicate>\d+) duplicate, "
    r"(?P<dead_lettered>\d+) dead-lettered, (?P<left>\d+) left; (?P<findings>\d+) findings appended"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


# ------------------------------------------------------------------ queues


@dataclass(frozen=True)
class QueuePair:
    """A source queue whose redrive policy names its dead-letter queue."""

    url: str
    dead_letter_url: str


def create_queue_pair(sqs: Any, *, fifo: bool = False, redrive: bool = True) -> QueuePair:
    """A fresh pair with unique names on the shared moto server."""
    name = uuid.uuid4().hex[:24]
    suffix = ".fifo" if fifo else ""
    attributes = {"FifoQueue": "true"} if fifo else {}
    dead = sqs.create_queue(QueueName=f"dlq-{name}{suffix}", Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    source_attributes = dict(attributes)
    if redrive:
        source_attributes["RedrivePolicy"] = json.dumps(
            {"deadLetterTargetArn": arn, "maxReceiveCount": "5"}
        )
    source = sqs.create_queue(QueueName=f"src-{name}{suffix}", Attributes=source_attributes)
    return QueuePair(source["QueueUrl"], dead)


def queue_depth(sqs: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every visible message of a queue (kept invisible afterwards, not deleted)."""
    found: list[dict[str, Any]] = []
    while True:
        answer = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=300,
            MessageAttributeNames=["All"],
        )
        messages = answer.get("Messages", [])
        if not messages:
            return found
        found.extend(messages)


# ------------------------------------------------------------------ teams


@dataclass(frozen=True)
class TeamWorld:
    """A team with a linked account, a plan and an ingest token."""

    id: uuid.UUID
    account_id: uuid.UUID
    plan_id: uuid.UUID
    token: str


def make_team(runtime: Any, name: str, scopes: frozenset[str] = frozenset({"ingest"})) -> TeamWorld:
    app = runtime.app
    team, _ = app.create_team(name)
    account, _ = app.link_account_role(
        team.id, "arn:aws:iam::123456789012:role/x", verified=False, actor="t"
    )
    plan, _ = app.create_plan(team.id, account.id, f"{name} plan")
    token = runtime.tokens.create(team_id=str(team.id), scopes=scopes)
    return TeamWorld(team.id, account.id, plan.id, token)


def head(runtime: Any) -> int:
    """The log head: the last notification id (0 for an empty log)."""
    return int(runtime.app.recorder.max_notification_id() or 0)


def topics_after(runtime: Any, position: int) -> list[str]:
    """The topics of every event appended after ``position``, in log order."""
    found: list[str] = []
    start = position
    while True:
        page = runtime.app.recorder.select_notifications(
            start=start, limit=500, inclusive_of_start=False
        )
        if not page:
            return found
        found.extend(n.topic for n in page)
        start = page[-1].id


# ------------------------------------------------------------------ waiting


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(interval)


def parse_report(text: str) -> dict[str, int]:
    """The counts a consumer prints when it stops."""
    match = REPORT.search(text)
    assert match is not None, f"no consume report in output: {text!r}"
    return {name: int(value) for name, value in match.groupdict().items()}


def contiguous_batches(received: Sequence[Any], batches: Sequence[Sequence[Any]]) -> bool:
    """Whether ``received`` is exactly the batches, each whole and in its own order, any order.

    A standard queue does not keep the order of messages, only their content.
    """
    remaining = [list(batch) for batch in batches]
    position = 0
    while remaining:
        for index, batch in enumerate(remaining):
            if list(received[position : position + len(batch)]) == batch:
                position += len(batch)
                del remaining[index]
                break
        else:
            return False
    return position == len(received)


def subprocess_env(database_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``resultsvc`` process: this test's database and folders, AWS as set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    env.update(
        RESULTSVC_DATABASE_URL=database_url,
        RESULTSVC_BACKUP_URL=f"file://{tmp_path}/backups",
        RESULTSVC_MASTER_KEY=f"file://{tmp_path}/keys/master.key",
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------ the tap


@dataclass(frozen=True)
class Exchange:
    """One SQS call through the tap: its operation, request and answer (JSON protocol)."""

    target: str
    request: dict[str, Any]
    status: int
    answer: dict[str, Any]


@dataclass
class SqsTap:
    upstream: str
    url: str = ""
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def receipt_handles(self) -> list[str]:
        """Handles of every message SQS handed out through the tap."""
        with self.lock:
            return [
                message["ReceiptHandle"]
                for exchange in self.exchanges
                if exchange.target == "AmazonSQS.ReceiveMessage" and exchange.status == 200
                for message in exchange.answer.get("Messages", [])
            ]

    def deleted(self) -> int:
        """How many messages SQS confirmed deleted through the tap."""
        with self.lock:
            return sum(
                len(exchange.answer.get("Successful", []))
                for exchange in self.exchanges
                if exchange.target == "AmazonSQS.DeleteMessageBatch" and exchange.status == 200
            )


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def sqs_tap(upstream: str) -> Iterator[SqsTap]:
    """A forwarding proxy to ``upstream`` that keeps each SQS request and its answer."""
    tap = SqsTap(upstream)
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request("POST", self.path, body=body, headers=headers)
                answer = conn.getresponse()
                payload = answer.read()
                status = answer.status
                answer_headers = answer.getheaders()
            finally:
                conn.close()
            with tap.lock:
                tap.exchanges.append(
                    Exchange(
                        self.headers.get("X-Amz-Target", ""), _json(body), status, _json(payload)
                    )
                )
            self.send_response(status)
            for name, value in answer_headers:
                if name.lower() not in HOP_HEADERS | {"content-length"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tap.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="sqs-tap", daemon=True)
    thread.start()
    try:
        yield tap
    finally:
        server.shutdown()
        server.server_close()
