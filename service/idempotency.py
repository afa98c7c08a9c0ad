"""``Idempotency-Key`` on appending requests: the same request twice appends once.

Keys are scoped to the caller's team. The first request claims the key
(``running``); its answer is stored when it ends (``done``). Afterwards the
same key with the same method, path and body gets that answer again and
appends nothing; with anything else it gets 422; while the first is still
running, 409. Answers that failed for a passing reason (5xx) release the key
so the client's retry runs. Keys are kept at least 24 hours.

A claim left ``running`` by a process that died is taken over after
``STALE_AFTER``: the first request may or may not have appended, so the
retry runs again (see docs/operations.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from projections.sqlstore import ViewDatabase

KEEP_FOR = timedelta(hours=48)
STALE_AFTER = timedelta(minutes=5)
SWEEP_PROBABILITY = 0.01  # expired keys are deleted by about one request in a hundred
_KEY = re.compile(r"[\x21-\x7e]{1,255}")

IDEMPOTENCY_DDL = (
    "CREATE TABLE IF NOT EXISTS idempotency_keys ("
    " scope TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " request_sha256 TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " status INTEGER,"
    " body BYTEA,"
    " created_at TEXT NOT NULL,"
    " PRIMARY KEY (scope, key))"
)


class IdempotencyRefused(Exception):
    """The key cannot be used for this request: ``status`` is the HTTP answer."""

    def __init__(self, status: int, title: str, detail: str, *, retry_after: bool = False):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True)
class Replay:
    """The stored answer of the first request with this key."""

    status: int
    body: bytes


def request_digest(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), b"\0", path.encode(), b"\0", body):
        digest.update(part)
    return digest.hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


class IdempotencyStore:
    def __init__(self, db: ViewDatabase) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        ddl = (
            IDEMPOTENCY_DDL
            if self.db.dialect == "postgresql"
            else IDEMPOTENCY_DDL.replace("BYTEA", "BLOB")
        )
        with self.db.writing() as cur:
            cur.execute(ddl)
            cur.execute(
                "CREATE INDEX IF NOT EXISTS ix_idempotency_keys_created_at"
                " ON idempotency_keys (created_at)"
            )

    def begin(self, scope: str, key: str, digest: str) -> Replay | None:
        """Claim a key; ``None`` means go ahead, a ``Replay`` means answer it instead."""
        if not _KEY.fullmatch(key):
            raise IdempotencyRefused(
                400,
                "Bad Idempotency-Key",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
            )
        now = _now()
        with self.db.writing() as cur:
            if random.random() < SWEEP_PROBABILITY:
                cur.execute(
                    "DELETE FROM idempotency_keys WHERE created_at < ?",
                    [(now - KEEP_FOR).isoformat()],
                )
            claimed = cur.execute(
                "INSERT INTO idempotency_keys (scope, key, request_sha256, state, created_at)"
                " VALUES (?, ?, ?, 'running', ?) ON CONFLICT DO NOTHING",
                [scope, key, digest, now.isoformat()],
            )
            if claimed == 1:
                return None
            row = cur.fetchone(
                "SELECT request_sha256, state, status, body, created_at FROM idempotency_keys"
                " WHERE scope = ? AND key = ?",
                [scope, key],
            )
            assert row is not None
            if row[0] != digest:
                raise IdempotencyRefused(
                    422,
                    "Idempotency-Key reused",
                    "this Idempotency-Key was used with another request; use a new key",
                )
            if row[1] == "done":
                return Replay(int(row[2]), bytes(row[3]))
            if datetime.fromisoformat(row[4]) > now - STALE_AFTER:
                raise IdempotencyRefused(
                    409,
                    "Request in progress",
                    "a request with this Idempotency-Key is still running; retry shortly",
                    retry_after=True,
                )
            cur.execute(
                "UPDATE idempotency_keys SET created_at = ? WHERE scope = ? AND key = ?",
                [now.isoformat(), scope, key],
            )
            return None

    def finish(self, scope: str, key: str, status: int, body: bytes) -> None:
        """Store the answer, or release the key when the failure may pass (5xx)."""
        with self.db.writing() as cur:
            if status >= 500:
                cur.execute(
                    "DELETE FROM idempotency_keys WHERE scope = ? AND key = ?", [scope, key]
                )
            else:
                cur.execute(
                    "UPDATE idempotency_keys SET state = 'done', status = ?, body = ?"
                    " WHERE scope = ? AND key = ?",
                    [status, body, scope, key],
                )
