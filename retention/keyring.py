"""Plan keys: one AES-256 key per plan, the handle for crypto-shredding.

Every backup encrypts a plan's events under that plan's key. The key is kept
wrapped by the master key, in two places only: an object in the backup store
under ``keyring/plans/`` (a prefix without Object Lock, so it *can* be
destroyed) and a cache table in the database. Destroying both (every object
version) makes that plan's part of every backup, old and new, undecryptable
by anyone, while everything else in those backups still verifies.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from projections.sqlstore import ViewDatabase
from retention.format import b64, unb64
from retention.keys import MasterKey
from retention.stores import ObjectMissing, ObjectStore

PREFIX = "keyring/plans/"
KEY_FORMAT = "resultsvc-plan-key"

KEYRING_DDL = (
    "CREATE TABLE IF NOT EXISTS backup_plan_keys ("
    " plan_id TEXT PRIMARY KEY,"
    " wrapped TEXT NOT NULL,"
    " master_key_ref TEXT NOT NULL,"
    " created_at TEXT NOT NULL)"
)
# Plans whose key was shredded: no key is ever made for them again.
SHREDDED_DDL = (
    "CREATE TABLE IF NOT EXISTS backup_shredded_plans ("
    " plan_id TEXT PRIMARY KEY,"
    " shredded_at TEXT NOT NULL)"
)


class PlanKeyShredded(Exception):
    """The plan was excluded from backups: it has no key, and never will again."""


def object_key(plan_id: UUID | str) -> str:
    return f"{PREFIX}{plan_id}.key"


def _context(plan_id: UUID | str) -> dict[str, str]:
    return {"purpose": "plan-key", "plan": str(plan_id)}


class Keyring:
    def __init__(self, store: ObjectStore, master: MasterKey, db: ViewDatabase) -> None:
        self.store = store
        self.master = master
        self.db = db
        self._plain: dict[str, bytes] = {}  # unwrapped keys of this process, never written

    def ensure_schema(self) -> None:
        with self.db.writing() as cur:
            cur.execute(KEYRING_DDL)
            cur.execute(SHREDDED_DDL)

    def key_for_writing(self, plan_id: UUID) -> bytes:
        """The plan's key, created on first use; refused for a shredded plan.

        The key object is in the store before the key is used: a key that
        only the database held would be lost with the database, and with it
        that plan's part of every backup.
        """
        cached = self._plain.get(str(plan_id))
        if cached is not None:
            return cached
        if self._is_shredded(plan_id):
            raise PlanKeyShredded(f"plan {plan_id} is excluded from backups")
        wrapped = self._cached(plan_id)
        if wrapped is None:
            wrapped = self._stored(plan_id)  # written before a crash, never cached
            if wrapped is None:
                wrapped = self.master.wrap(secrets.token_bytes(32), _context(plan_id))
                self.store.put(object_key(plan_id), self._document(plan_id, wrapped))
            with self.db.writing() as cur:
                cur.execute(
                    "INSERT INTO backup_plan_keys (plan_id, wrapped, master_key_ref, created_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [str(plan_id), b64(wrapped), self.master.ref, datetime.now(UTC).isoformat()],
                )
            winner = self._cached(plan_id)
            assert winner is not None
            if winner != wrapped:  # another writer raced us: its key is the plan's key
                self.store.put(object_key(plan_id), self._document(plan_id, winner))
            wrapped = winner
        elif self._stored(plan_id) is None:
            self.store.put(object_key(plan_id), self._document(plan_id, wrapped))
        if self._is_shredded(plan_id):  # excluded while we were at it
            raise PlanKeyShredded(f"plan {plan_id} is excluded from backups")
        key = self.master.unwrap(wrapped, _context(plan_id))
        self._plain[str(plan_id)] = key
        return key

    def key_for_reading(self, plan_id: UUID | str) -> bytes | None:
        """The plan's key, or ``None`` when it was shredded (or never existed)."""
        cached = self._plain.get(str(plan_id))
        if cached is not None:
            return cached
        wrapped = self._wrapped(plan_id)
        if wrapped is None:
            return None
        key = self.master.unwrap(wrapped, _context(plan_id))
        self._plain[str(plan_id)] = key
        return key

    def shred(self, plan_id: UUID | str) -> int:
        """Destroy the plan's key everywhere it is kept; return how many copies went."""
        self._plain.pop(str(plan_id), None)
        with self.db.writing() as cur:
            cur.execute(
                "INSERT INTO backup_shredded_plans (plan_id, shredded_at) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                [str(plan_id), datetime.now(UTC).isoformat()],
            )
            copies = cur.execute("DELETE FROM backup_plan_keys WHERE plan_id = ?", [str(plan_id)])
        try:
            self.store.head(object_key(plan_id))
            present = 1
        except ObjectMissing:
            present = 0
        self.store.destroy(object_key(plan_id))
        return copies + present

    def rewrap(self, new_master: MasterKey) -> int:
        """Wrap every plan key under ``new_master`` (after a master key rotation)."""
        with self.db.reading() as cur:
            rows = cur.fetchall("SELECT plan_id, wrapped FROM backup_plan_keys")
        for plan_id, wrapped in rows:
            key = self.master.unwrap(unb64(str(wrapped)), _context(str(plan_id)))
            fresh = new_master.wrap(key, _context(str(plan_id)))
            with self.db.writing() as cur:
                cur.execute(
                    "UPDATE backup_plan_keys SET wrapped = ?, master_key_ref = ? WHERE plan_id = ?",
                    [b64(fresh), new_master.ref, str(plan_id)],
                )
            self.store.put(
                object_key(str(plan_id)), self._document(str(plan_id), fresh, new_master)
            )
        self.master = new_master
        return len(rows)

    # ---------------------------------------------------------------- helpers

    def _cached(self, plan_id: UUID | str) -> bytes | None:
        with self.db.reading() as cur:
            row = cur.fetchone(
                "SELECT wrapped FROM backup_plan_keys WHERE plan_id = ?", [str(plan_id)]
            )
        return None if row is None else unb64(str(row[0]))

    def _wrapped(self, plan_id: UUID | str) -> bytes | None:
        """From the cache, else from the store (a restore on a fresh database), else ``None``."""
        cached = self._cached(plan_id)
        return cached if cached is not None else self._stored(plan_id)

    def _stored(self, plan_id: UUID | str) -> bytes | None:
        try:
            document: dict[str, Any] = json.loads(self.store.get(object_key(plan_id)))
        except ObjectMissing:
            return None
        return unb64(str(document["wrapped"]))

    def _is_shredded(self, plan_id: UUID | str) -> bool:
        with self.db.reading() as cur:
            row = cur.fetchone(
                "SELECT 1 FROM backup_shredded_plans WHERE plan_id = ?", [str(plan_id)]
            )
        return row is not None

    def _document(
        self, plan_id: UUID | str, wrapped: bytes, master: MasterKey | None = None
    ) -> bytes:
        return json.dumps(
            {
                "format": KEY_FORMAT,
                "version": 1,
                "plan": str(plan_id),
                "master_key_ref": (master or self.master).ref,
                "wrapped": b64(wrapped),
            },
            sort_keys=True,
        ).encode()
