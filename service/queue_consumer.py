"""The SQS consumer: at-least-once delivery in, exactly-once effect on the event log.

Each message is applied inside ``ResultsApp.receipted``: its idempotency key
is saved in the same transaction as the command's events, so a message
delivered twice (or redelivered because the consumer died between the commit
and the delete) appends nothing the second time. A message is deleted only
after its transaction committed. A message that can never be applied goes to
the dead-letter queue with its reason; one that failed for a passing reason
(the database is down) stays on the queue for redelivery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from domain.application import AlreadyApplied
from domain.errors import Conflict, DomainError, InvalidInput, NotFound
from projections.sqlstore import TRANSIENT_ERRORS
from service.database import DatabaseUnavailable
from service.queue_messages import AUTHORIZATION, Envelope, MessageRefused, parse
from service.runtime import Runtime

log = logging.getLogger("resultsvc.consumer")

OUTCOMES = ("applied", "duplicate", "dead_lettered", "left")
WAIT_SECONDS = 10  # long poll; also the longest a SIGTERM waits for an empty poll
VISIBILITY_SECONDS = 60  # the lease on a message in hand, renewed while it is worked on
BACKOFF_SECONDS = 15  # a message left after a passing failure comes back after this
PASSING_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, DatabaseUnavailable)
REASON = "resultsvc-reason"
STATS_DDL = (
    "CREATE TABLE IF NOT EXISTS queue_stats ("
    " queue TEXT NOT NULL, outcome TEXT NOT NULL, count BIGINT NOT NULL,"
    " PRIMARY KEY (queue, outcome))"
)


class NoDeadLetterQueue(Exception):
    """Poison messages need somewhere to go; the consumer will not start without it."""


@dataclass
class ConsumeReport:
    """What a consumer did, by outcome, with the findings it appended."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    findings: int = 0
    polls: int = 0

    def __str__(self) -> str:
        done = ", ".join(
            f"{count} {outcome.replace('_', '-')}" for outcome, count in self.counts.items()
        )
        return f"{done}; {self.findings} findings appended"


def sqs_client() -> Any:
    """An SQS client from boto3's own configuration; reads outlast the long poll."""
    return boto3.client(
        "sqs",
        config=Config(
            connect_timeout=5,
            read_timeout=WAIT_SECONDS + 20,
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )


def dead_letter_queue_of(sqs: Any, queue_url: str) -> str:
    """The dead-letter queue named by the queue's redrive policy."""
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = attributes.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        raise NoDeadLetterQueue(
            f"queue {queue_url} has no redrive policy; give --dead-letter-queue URL"
        )
    target = str(json.loads(policy)["deadLetterTargetArn"])  # arn:aws:sqs:region:account:name
    _, _, _, _, account, name = target.split(":", 5)
    return str(sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"])


class QueueConsumer:
    """Applies the messages of one queue to the runtime's application."""

    def __init__(
        self,
        runtime: Runtime,
        queue_url: str,
        dead_letter_url: str | None = None,
        *,
        sqs: Any = None,
        wait_seconds: int = WAIT_SECONDS,
        visibility_seconds: int = VISIBILITY_SECONDS,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.queue_url = queue_url
        self.sqs = sqs if sqs is not None else sqs_client()
        self.dead_letter_url = dead_letter_url or dead_letter_queue_of(self.sqs, queue_url)
        self.wait_seconds = wait_seconds
        self.visibility_seconds = visibility_seconds
        self.on_applied = on_applied
        self.fifo = queue_url.endswith(".fifo")
        self.report = ConsumeReport()
        with runtime.views.writing() as cur:
            cur.execute(STATS_DDL)

    # ----------------------------------------------------------------- loop

    def run(self, stop: threading.Event, *, until_empty: bool = False) -> ConsumeReport:
        """Poll and apply until ``stop`` is set (SIGTERM), or the queue is empty.

        A stop request lets the message in hand finish (and be deleted); the
        messages received with it but not started are handed back at once.
        """
        while not stop.is_set():
            received = self.poll(stop)
            if received == 0 and until_empty:
                break
        return self.report

    def poll(self, stop: threading.Event | None = None) -> int:
        """One receive (up to 10 messages), applied one by one; how many were received."""
        try:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=self.wait_seconds,
                VisibilityTimeout=self.visibility_seconds,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
            )
        except (BotoCoreError, ClientError) as error:
            log.warning(
                "receive from %s failed: %s", _queue_name(self.queue_url), type(error).__name__
            )
            if stop is not None:
                stop.wait(BACKOFF_SECONDS / 3)
            return 0
        messages = answer.get("Messages", [])
        self.report.polls += 1
        done: list[dict[str, Any]] = []
        outcomes: dict[str, int] = {}
        held: set[str | None] = set()
        try:
            for index, message in enumerate(messages):
                if stop is not None and stop.is_set():
                    self._hand_back(messages[index:])
                    break
                group = message.get("Attributes", {}).get("MessageGroupId")
                if self.fifo and group in held:
                    self._set_visibility(message, 0)  # behind a left message of its group
                    continue
                outcome = self.handle(message)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome != "left":
                    done.append(message)
                elif self.fifo:
                    held.add(group)  # keep the group's order: the rest waits for it
        finally:
            self._delete(done)
            self._count(outcomes)
        return len(messages)

    # -------------------------------------------------------------- one message

    def handle(self, message: dict[str, Any]) -> str:
        """Apply one message; its outcome. Deleting is the caller's job (after commit)."""
        body = str(message.get("Body", ""))
        envelope: Envelope | None = None
        token = message.get("MessageAttributes", {}).get(AUTHORIZATION, {}).get("StringValue")
        try:
            envelope, bearer = parse(body, token)
            self._authorise(envelope, bearer)
            digest = hashlib.sha256(body.encode()).hexdigest()
            with (
                self._lease(message),
                self.runtime.app.receipted(
                    f"queue:{envelope.team_id}", envelope.idempotency_key, digest, envelope.command
                ),
            ):
                appended = self._apply(envelope)
        except AlreadyApplied as applied:
            if applied.same_request:
                return "duplicate"
            return self._dead_letter(
                message, "idempotency_key: was applied before to another message"
            )
        except MessageRefused as refused:
            return self._dead_letter(message, f"{refused.field}: {refused.rule}")
        except InvalidInput as invalid:
            return self._dead_letter(message, f"{invalid.field}: {invalid.rule}")
        except NotFound as missing:
            return self._dead_letter(message, f"{missing.kind}_id: {missing}")
        except Conflict as conflict:
            return self._dead_letter(message, f"{_conflict_field(envelope, conflict)}: {conflict}")
        except DomainError as error:
            return self._dead_letter(message, f"body: {error}")
        except PASSING_ERRORS as error:
            log.warning(
                "message %s left for redelivery: %s", message.get("MessageId"), type(error).__name__
            )
            self._back_off(message)
            return "left"
        except Exception:
            # Unforeseen: leave it; the queue's maxReceiveCount bounds the retries.
            log.exception("message %s left for redelivery", message.get("MessageId"))
            self._back_off(message)
            return "left"
        self.report.findings += appended
        if self.on_applied is not None:
            self.on_applied()
        return "applied"

    def _authorise(self, envelope: Envelope, bearer: str) -> None:
        principal = self.runtime.tokens.authenticate(bearer)
        if principal is None:
            raise MessageRefused(AUTHORIZATION, "invalid or revoked token")
        if "ingest" not in principal.scopes or principal.team_id is None:
            raise MessageRefused(AUTHORIZATION, "this needs an ingest token of the team")
        if principal.team_id != str(envelope.team_id):
            raise MessageRefused("team_id", "is not the team of the token")

    def _apply(self, envelope: Envelope) -> int:
        """Run the envelope's command as its team; the number of findings appended."""
        app, team = self.runtime.app, envelope.team_id
        if envelope.command == "start_run":
            assert envelope.plan_id is not None
            app.start_run(team, envelope.plan_id, run_id=envelope.run_id)
            return 0
        if envelope.command == "record_results":
            return app.record_results(team, envelope.run_id, envelope.results).accepted
        assert envelope.status is not None
        app.complete_run(team, envelope.run_id, envelope.status, envelope.error)
        return 0

    # ----------------------------------------------------------------- SQS side

    def _dead_letter(self, message: dict[str, Any], reason: str) -> str:
        """Move a message that can never be applied to the dead-letter queue, with why.

        If the dead-letter queue cannot take it, the message stays on its queue
        (a passing failure): nothing is deleted that was not put somewhere.
        """
        attributes = {
            REASON: {"DataType": "String", "StringValue": reason[:1000]},
            "resultsvc-refused-at": {
                "DataType": "String",
                "StringValue": datetime.now(UTC).isoformat(),
            },
            "resultsvc-source-message-id": {
                "DataType": "String",
                "StringValue": str(message.get("MessageId", "")),
            },
        }
        extra: dict[str, str] = {}
        if self.dead_letter_url.endswith(".fifo"):
            group = message.get("Attributes", {}).get("MessageGroupId") or "dead-letters"
            extra = {"MessageGroupId": group, "MessageDeduplicationId": str(message["MessageId"])}
        # The Authorization attribute is not copied: a token does not belong in a dead letter.
        try:
            self.sqs.send_message(
                QueueUrl=self.dead_letter_url,
                MessageBody=str(message.get("Body", "")) or "(empty)",
                MessageAttributes=attributes,
                **extra,
            )
        except (BotoCoreError, ClientError) as error:
            log.error(
                "message %s could not be dead-lettered (%s), left on the queue: %s",
                message.get("MessageId"),
                type(error).__name__,
                reason,
            )
            self._back_off(message)
            return "left"
        log.warning("message %s dead-lettered: %s", message.get("MessageId"), reason)
        return "dead_lettered"

    def _back_off(self, message: dict[str, Any]) -> None:
        self._set_visibility(message, BACKOFF_SECONDS)

    def _hand_back(self, messages: list[dict[str, Any]]) -> None:
        """Stopping: messages received but not started go back to the queue now."""
        for message in messages:
            self._set_visibility(message, 0)

    def _set_visibility(self, message: dict[str, Any], seconds: int) -> None:
        # On failure the message simply comes back when its lease ends.
        with suppress(BotoCoreError, ClientError):
            self.sqs.change_message_visibility(
                QueueUrl=self.queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=seconds,
            )

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        """Delete handled messages; one that cannot be deleted is redelivered and deduplicated."""
        for start in range(0, len(messages), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages[start : start + 10])
            ]
            try:
                failed = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except (BotoCoreError, ClientError) as error:
                log.warning(
                    "delete failed (%s): the messages come back and count as duplicates",
                    type(error).__name__,
                )
                continue
            for entry in failed.get("Failed", []):
                log.warning("delete of a handled message failed: %s", entry.get("Code"))

    @contextmanager
    def _lease(self, message: dict[str, Any]) -> Iterator[None]:
        """Keep the message invisible to other consumers while it is being applied."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.visibility_seconds / 2):
                try:
                    self.sqs.change_message_visibility(
                        QueueUrl=self.queue_url,
                        ReceiptHandle=message["ReceiptHandle"],
                        VisibilityTimeout=self.visibility_seconds,
                    )
                except (BotoCoreError, ClientError):
                    log.warning("could not extend the lease of %s", message.get("MessageId"))

        thread = threading.Thread(target=renew, name="sqs-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _count(self, outcomes: dict[str, int]) -> None:
        """Add to the report and to ``queue_stats`` (read by /metrics in any process)."""
        for outcome, count in outcomes.items():
            self.report.counts[outcome] += count
        if not outcomes:
            return
        try:
            with self.runtime.views.writing() as cur:
                for outcome, count in outcomes.items():
                    cur.execute(
                        "INSERT INTO queue_stats (queue, outcome, count) VALUES (?, ?, ?)"
                        " ON CONFLICT (queue, outcome)"
                        " DO UPDATE SET count = queue_stats.count + excluded.count",
                        [self.queue_url, outcome, count],
                    )
        except PASSING_ERRORS:
            log.warning("queue counters not updated (database unavailable)")


def queue_stats(runtime: Runtime) -> list[tuple[str, str, int]]:
    """(queue, outcome, count) for /metrics; the table exists once a consumer started."""
    with runtime.views.reading() as cur:
        rows = cur.fetchall("SELECT queue, outcome, count FROM queue_stats ORDER BY queue, outcome")
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def _conflict_field(envelope: Envelope | None, conflict: Conflict) -> str:
    """The field a refused command's conflict is about, for the ``field: rule`` reason."""
    if envelope is not None and envelope.command == "start_run" and "run id" not in str(conflict):
        return "plan_id"  # its account is unlinked
    return "run_id"


def _queue_name(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]
