"""The queue message format (schema 1): parsing for the consumer, building for senders.

One SQS message carries one command of the HTTP API in a JSON envelope; the
worker's ingest token rides in the ``Authorization`` message attribute, as
in an HTTP header. ``docs/queue-ingest.md`` is the reference; this module is
its one implementation. Findings are checked by ``domain.findings``, as on
the HTTP path, not here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

SCHEMA_VERSION = 1
# SQS refuses messages over 256 KiB, body and attributes together.
MAX_MESSAGE_BYTES = 256 * 1024
# Room kept for the attributes (token, content type) and JSON framing.
ATTRIBUTE_ALLOWANCE = 4 * 1024
COMMANDS = ("start_run", "record_results", "complete_run")
END_STATES = ("succeeded", "failed")
AUTHORIZATION = "Authorization"
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_FIELDS = {
    "start_run": {"plan_id", "run_id"},
    "record_results": {"run_id", "results"},
    "complete_run": {"run_id", "status", "error"},
}
_REQUIRED = {
    "start_run": {"plan_id", "run_id"},
    "record_results": {"run_id", "results"},
    "complete_run": {"run_id", "status"},
}
_ENVELOPE = {"schema", "team_id", "idempotency_key", "command"}


class MessageRefused(Exception):
    """The message can never be applied as it is: it goes to the dead-letter queue.

    ``field`` and ``rule`` say why, as the HTTP API's problem answers do.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True)
class Envelope:
    """A parsed message: who sends it, its idempotency key and the command."""

    team_id: UUID
    idempotency_key: str
    command: str
    run_id: UUID
    plan_id: UUID | None = None
    results: Any = None  # checked by the domain, like the HTTP body
    status: str | None = None
    error: str | None = None


def parse(body: str | bytes, token: str | None) -> tuple[Envelope, str]:
    """The envelope and the bearer token of one message, or ``MessageRefused``."""
    if token is None or not token.startswith("Bearer "):
        raise MessageRefused(AUTHORIZATION, "message attribute 'Bearer <ingest token>' is required")
    try:
        raw = body.encode() if isinstance(body, str) else body
    except UnicodeEncodeError:
        raise MessageRefused("body", "must be UTF-8 text") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageRefused("body", f"must be at most {MAX_MESSAGE_BYTES} bytes")
    try:
        # The standard parser, as on the HTTP path: big integers stay integers.
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise MessageRefused("body", "must be valid JSON") from None
    if not isinstance(data, dict):
        raise MessageRefused("body", "must be a JSON object (the envelope)")
    schema = data.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:  # true and 1.0 are not 1
        raise MessageRefused("schema", f"must be {SCHEMA_VERSION} (the only version)")
    command = data.get("command")
    if command not in COMMANDS:
        raise MessageRefused("command", f"must be one of {', '.join(COMMANDS)}")
    unknown = sorted(set(data) - _ENVELOPE - _FIELDS[command])
    if unknown:
        raise MessageRefused(unknown[0], f"unknown field for {command}")
    missing = sorted((_ENVELOPE | _REQUIRED[command]) - set(data))
    if missing:
        raise MessageRefused(missing[0], "is required")
    key = data["idempotency_key"]
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise MessageRefused("idempotency_key", "must be 1 to 255 printable ASCII characters")
    status = data.get("status")
    if command == "complete_run" and status not in END_STATES:
        raise MessageRefused("status", f"must be one of {', '.join(END_STATES)}")
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise MessageRefused("error", "must be a string")
    envelope = Envelope(
        team_id=_uuid(data, "team_id"),
        idempotency_key=key,
        command=command,
        run_id=_uuid(data, "run_id"),
        plan_id=_uuid(data, "plan_id") if command == "start_run" else None,
        results=data.get("results"),
        status=status,
        error=error,
    )
    return envelope, token.removeprefix("Bearer ")


def _uuid(data: dict[str, Any], name: str) -> UUID:
    value = data.get(name)
    if not isinstance(value, str):
        raise MessageRefused(name, "must be a UUID string")
    try:
        return UUID(value)
    except ValueError:
        raise MessageRefused(name, "must be a UUID string") from None


# ------------------------------------------------------------------ senders


def encode(envelope: dict[str, Any]) -> str:
    """A message body: compact JSON, UTF-8 text as SQS wants it."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


def start_run(team_id: UUID, plan_id: UUID, run_id: UUID, key: str) -> str:
    return encode(
        {
            "schema": SCHEMA_VERSION,
            "team_id": str(team_id),
            "idempotency_key": key,
            "command": "start_run",
            "plan_id": str(plan_id),
            "run_id": str(run_id),
        }
    )


def complete_run(
    team_id: UUID, run_id: UUID, key: str, status: str, error: str | None = None
) -> str:
    body: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "team_id": str(team_id),
        "idempotency_key": key,
        "command": "complete_run",
        "run_id": str(run_id),
        "status": status,
    }
    if error is not None:
        body["error"] = error
    return encode(body)


def record_results(
    team_id: UUID, run_id: UUID, results: Sequence[Any], key_prefix: str, max_batch: int
) -> Iterator[str]:
    """Bodies for a run's results: batches of at most ``max_batch``, each under the size limit.

    A batch too big for one message is halved until it fits; batch ``n``
    gets the key ``<key_prefix>/<n>``, so a resend of the same file with the
    same prefix appends nothing twice.
    """
    limit = MAX_MESSAGE_BYTES - ATTRIBUTE_ALLOWANCE
    number = 0

    def body(chunk: Sequence[Any], key: str) -> str:
        return encode(
            {
                "schema": SCHEMA_VERSION,
                "team_id": str(team_id),
                "idempotency_key": key,
                "command": "record_results",
                "run_id": str(run_id),
                "results": list(chunk),
            }
        )

    pending = [results[i : i + max_batch] for i in range(0, len(results), max_batch)]
    pending.reverse()
    while pending:
        chunk = pending.pop()
        candidate = body(chunk, f"{key_prefix}/{number + 1}")
        if len(candidate.encode()) <= limit:
            number += 1
            yield candidate
            continue
        if len(chunk) == 1:
            raise MessageRefused("results", "one finding is larger than a queue message")
        half = len(chunk) // 2
        pending.extend([chunk[half:], chunk[:half]])
