"""API tokens: scopes, one team (except ops), only a hash stored.

A token reads ``rsvc_<id>_<secret>``. The id finds the row; the secret is
checked against its SHA-256 with a constant-time comparison. The secret is
printed once, at creation, and never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from domain.errors import InvalidInput
from projections.sqlstore import ViewDatabase

SCOPES = ("ingest", "read", "compliance", "ops")
PREFIX = "rsvc_"
_TOKEN_ID = re.compile(r"[0-9a-f]{12}")  # secrets.token_hex(6), as ``create`` issues them

TOKENS_DDL = (
    "CREATE TABLE IF NOT EXISTS api_tokens ("
    " token_id TEXT PRIMARY KEY,"
    " secret_sha256 TEXT NOT NULL,"
    " team_id TEXT,"
    " scopes TEXT NOT NULL,"
    " created_at TEXT NOT NULL,"
    " revoked INTEGER NOT NULL DEFAULT 0)"
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, its team (``None`` for ops) and its scopes."""

    token_id: str
    team_id: str | None
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}"


def parse_scopes(text: str, team_id: str | None) -> frozenset[str]:
    """Check a scope list against the rules: known scopes; ops alone and without a team."""
    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise InvalidInput("scope", f"must be a comma-separated list of {', '.join(SCOPES)}")
    if "ops" in scopes and (len(scopes) > 1 or team_id is not None):
        raise InvalidInput("scope", "ops tokens carry no team and no other scope")
    if "ops" not in scopes and team_id is None:
        raise InvalidInput("team", "ingest, read and compliance tokens need --team")
    return scopes


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """Issues and checks tokens; the table lives beside the views."""

    def __init__(self, db: ViewDatabase) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        conn = self.db.connect()
        try:
            with self.db.transaction(conn) as cur:
                cur.execute(TOKENS_DDL)
        finally:
            conn.close()

    def create(self, team_id: str | None, scopes: frozenset[str]) -> str:
        """Store a new token's hash and return the token (shown once)."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        conn = self.db.connect()
        try:
            with self.db.transaction(conn) as cur:
                cur.execute(
                    "INSERT INTO api_tokens (token_id, secret_sha256, team_id, scopes, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [
                        token_id,
                        _digest(secret),
                        team_id,
                        ",".join(sorted(scopes)),
                        datetime.now(UTC).isoformat(),
                    ],
                )
        finally:
            conn.close()
        return f"{PREFIX}{token_id}_{secret}"

    def revoke(self, token_id: str) -> bool:
        """Refuse a token from now on; False when no such token exists."""
        if not _TOKEN_ID.fullmatch(token_id):
            return False
        with self.db.writing() as cur:
            changed = cur.execute(
                "UPDATE api_tokens SET revoked = 1 WHERE token_id = ?", [token_id]
            )
        return bool(changed)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid token, else ``None`` (whatever was wrong with it)."""
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        token_id, _, secret = token[len(PREFIX) :].partition("_")
        if not secret:
            return None
        row = None
        # Only ids as issued reach the database (a NUL byte would make PostgreSQL
        # refuse the query); a malformed id takes the same comparison below.
        if _TOKEN_ID.fullmatch(token_id):
            with self.db.reading() as cur:
                row = cur.fetchone(
                    "SELECT secret_sha256, team_id, scopes, revoked FROM api_tokens"
                    " WHERE token_id = ?",
                    [token_id],
                )
        # Compare even when the id is unknown, so timing does not tell ids apart.
        stored = row[0] if row is not None else "0" * 64
        matches = hmac.compare_digest(stored.encode(), _digest(secret).encode())
        if row is None or not matches or row[3]:
            return None
        return Principal(token_id, row[1], frozenset(str(row[2]).split(",")))
