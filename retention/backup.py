"""Taking a backup: the event log, streamed into encrypted packs, the manifest last.

A full backup holds every notification up to the head when it started; an
incremental one the notifications after its parent's last. Memory stays flat:
notifications are read in pages, a blob is sealed when it reaches
``BLOB_BYTES`` or the key changes, a pack is streamed to the store part by
part and closed at ``PACK_BYTES``.

Each event goes under the key of the plan it belongs to (or the backup's own
data key for teams and accounts). Events of plans excluded from backups are
left out altogether, and their keys are shredded, so older backups cannot
give them back either.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from domain.application import ResultsApp
from domain.model import ResultBatch
from retention.catalog import BackupInfo, Catalog, manifest_key, pack_key
from retention.format import (
    FORMAT,
    KEY_BACKUP,
    NONCE_BYTES,
    VERSION,
    Record,
    b64,
    blob_aad,
    encode_record,
    plan_key_ref,
    seal_blob,
    sign_manifest,
)
from retention.keyring import Keyring, PlanKeyShredded
from retention.keys import MasterKey
from retention.stores import ObjectStore, ObjectWriter

log = logging.getLogger(__name__)

PAGE = 500
BLOB_BYTES = 4 * 1024 * 1024
PACK_BYTES = 64 * 1024 * 1024
FULL_EVERY = timedelta(days=7)

Progress = Callable[[int], None]


class BackupFailed(Exception):
    """The backup did not complete; nothing of it is listed. The message says why."""


@dataclass
class _Blob:
    key_ref: str
    first: int = 0
    last: int = 0
    records: int = 0
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


def new_backup_id(now: datetime, after: str | None = None) -> str:
    """Sortable by creation time, unique, always after ``after`` (the latest backup).

    ``20261129T205012123456Z-3f2a9c1d``: microseconds, then random bits. Two
    backups in the same microsecond (or a clock that stepped back) still sort
    in the order they were taken, which the catalog's ordering relies on.
    """
    moment = now.astimezone(UTC)
    while True:
        candidate = f"{moment:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}"
        if after is None or candidate > after:
            return candidate
        moment += timedelta(microseconds=1)


class PlanOf:
    """Tells which plan an event belongs to, decoding only small events.

    Result batches are most of the bytes; their plan is known from the run's
    ``BatchRecorded`` marker, which is saved in the same transaction just
    before the batch, so the batch itself is never decoded.
    """

    def __init__(self, app: ResultsApp) -> None:
        self.app = app
        self.batches: dict[UUID, UUID] = {}

    def __call__(self, notification: Any) -> UUID | None:
        topic: str = notification.topic
        if topic.startswith("resultsvc/Plan/"):
            return UUID(str(notification.originator_id))
        if topic == "resultsvc/ResultBatch/Recorded":
            plan = self.batches.pop(UUID(str(notification.originator_id)), None)
            if plan is not None:
                return plan
            return UUID(str(self.app.mapper.to_domain_event(notification).plan_id))  # type: ignore[attr-defined]
        if topic.startswith(("resultsvc/PlanRun/", "resultsvc/DisplayPurge/")):
            event: Any = self.app.mapper.to_domain_event(notification)
            if topic == "resultsvc/PlanRun/BatchRecorded":
                batch_id = ResultBatch.create_id(
                    UUID(str(notification.originator_id)), event.batch_no
                )
                self.batches[batch_id] = event.plan_id
            plan_id = getattr(event, "plan_id", None)
            return None if plan_id is None else UUID(str(plan_id))
        return None


@dataclass
class BackupResult:
    info: BackupInfo
    skipped_excluded: int
    duration_seconds: float


class BackupWriter:
    def __init__(
        self,
        app: ResultsApp,
        store: ObjectStore,
        master: MasterKey,
        keyring: Keyring,
        *,
        retention: timedelta,
        full_every: timedelta = FULL_EVERY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.app = app
        self.store = store
        self.master = master
        self.keyring = keyring
        self.retention = retention
        self.full_every = full_every
        self.clock = clock
        self.catalog = Catalog(store)

    def plan(self, full: bool | None = None) -> tuple[str, BackupInfo | None]:
        """Full or incremental, and on which parent: a new full when the chain's is old."""
        now = self.clock()
        live = [b for b in self.catalog.all() if b.expires_at > now]
        latest = live[-1] if live else None
        if full or latest is None:
            return "full", None
        chain_full = latest if latest.kind == "full" else self.catalog.get(latest.chain[0])
        if full is None and now - chain_full.created_at >= self.full_every:
            return "full", None
        return "incremental", latest

    def run(self, full: bool | None = None, progress: Progress | None = None) -> BackupResult:
        """Take a backup; raise ``BackupFailed`` (and leave nothing listed) on any failure."""
        started = time.monotonic()
        now = self.clock()
        kind, parent = self.plan(full)
        existing = self.catalog.ids()
        backup_id = new_backup_id(now, existing[-1] if existing else None)
        head = self.app.head_position()
        first = 1 if parent is None else parent.last_position + 1
        if parent is None:
            expires_at = now + self.retention
            chain: list[str] = []
        else:
            expires_at = parent.expires_at  # the chain goes as a whole
            chain = [*parent.chain, parent.id]
        excluded = self.app.excluded_plans()
        data_key, wrapped_data_key = self.master.new_data_key({"backup": backup_id})
        writer = _PackWriter(self.store, backup_id, expires_at)
        try:
            stats = self._stream(backup_id, data_key, writer, first, head, excluded, progress)
            writer.finish()
        except BaseException as error:
            writer.abort()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise BackupFailed(f"backup {backup_id} failed: {error}") from error
        duration = time.monotonic() - started
        document: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "id": backup_id,
            "kind": kind,
            "parent": None if parent is None else parent.id,
            "chain": chain,
            "first_position": first,
            "last_position": head,
            "created_at": now.isoformat(),
            "expires_at": expires_at.isoformat(),
            "master_key_ref": self.master.ref,
            "wrapped_data_key": b64(wrapped_data_key),
            "excluded_plans": sorted(str(p) for p in excluded),
            "plans": sorted(stats["plans"]),
            "packs": writer.packs,
            "blobs": writer.blobs,
            "stats": {
                "events": stats["events"],
                "skipped_excluded": stats["skipped"],
                "bytes_plain": stats["bytes_plain"],
                "bytes_stored": sum(p["size"] for p in writer.packs),
                "duration_seconds": round(duration, 3),
            },
        }
        signed = sign_manifest(document, data_key)
        try:
            self.store.put(
                manifest_key(backup_id),
                _json(signed),
                retain_until=expires_at if self.store.object_lock else None,
            )
        except Exception as error:
            raise BackupFailed(
                f"backup {backup_id} failed writing its manifest: {error}"
            ) from error
        self.app.record_backup(
            backup_id=backup_id,
            kind=kind,
            parent=document["parent"],
            first_position=first,
            last_position=head,
            events=stats["events"],
            bytes_stored=document["stats"]["bytes_stored"],
            duration_seconds=document["stats"]["duration_seconds"],
            expires_at=expires_at.isoformat(),
            excluded_plans=document["excluded_plans"],
        )
        return BackupResult(self.catalog.get(backup_id), stats["skipped"], duration)

    def _stream(
        self,
        backup_id: str,
        data_key: bytes,
        writer: _PackWriter,
        first: int,
        head: int,
        excluded: dict[UUID, int],
        progress: Progress | None,
    ) -> dict[str, Any]:
        plan_of = PlanOf(self.app)
        stats: dict[str, Any] = {"events": 0, "skipped": 0, "bytes_plain": 0, "plans": set()}
        blob: _Blob | None = None
        keys: dict[str, bytes] = {KEY_BACKUP: data_key}

        def seal(current: _Blob) -> None:
            key = keys[current.key_ref]
            pack, index = writer.next_blob_place()
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = seal_blob(
                key,
                nonce,
                b"".join(current.parts),
                blob_aad(backup_id, pack, index, current.key_ref),
            )
            writer.add(sealed, current)
            stats["bytes_plain"] += current.size

        for notification in self._notifications(first, head):
            plan = plan_of(notification)
            if plan is not None and plan in excluded:
                stats["skipped"] += 1
                continue
            key_ref = KEY_BACKUP if plan is None else plan_key_ref(plan)
            if plan is not None and key_ref not in keys:
                try:
                    keys[key_ref] = self.keyring.key_for_writing(plan)
                except PlanKeyShredded:  # excluded while this backup was running
                    excluded[plan] = notification.id
                    stats["skipped"] += 1
                    continue
                stats["plans"].add(str(plan))
            encoded = encode_record(
                Record(
                    notification.id,
                    UUID(str(notification.originator_id)),
                    notification.originator_version,
                    notification.topic,
                    notification.state,
                )
            )
            if blob is not None and (blob.key_ref != key_ref or blob.size >= BLOB_BYTES):
                seal(blob)
                blob = None
            if blob is None:
                blob = _Blob(key_ref, first=notification.id)
            blob.parts.append(encoded)
            blob.size += len(encoded)
            blob.records += 1
            blob.last = notification.id
            stats["events"] += 1
            if progress is not None:
                progress(notification.id)
        if blob is not None:
            seal(blob)
        return stats

    def _notifications(self, first: int, head: int) -> Iterator[Any]:
        start = first - 1
        while start < head:
            page = self.app.recorder.select_notifications(
                start=start, limit=PAGE, stop=head, inclusive_of_start=False
            )
            if not page:
                return
            yield from page
            start = page[-1].id


class _PackWriter:
    """Streams sealed blobs into packs of up to ``PACK_BYTES``, each its own object."""

    def __init__(self, store: ObjectStore, backup_id: str, retain_until: datetime) -> None:
        self.store = store
        self.backup_id = backup_id
        self.retain_until = retain_until if store.object_lock else None
        self.packs: list[dict[str, Any]] = []
        self.blobs: list[dict[str, Any]] = []
        self._writer: ObjectWriter | None = None
        self._offset = 0

    def next_blob_place(self) -> tuple[int, int]:
        """(pack index, blob index) of the next blob: both are bound into its GCM tag."""
        return len(self.packs), len(self.blobs)

    def add(self, sealed: bytes, blob: _Blob) -> None:
        if self._writer is None:
            name = f"pack-{len(self.packs):06d}.rbp"
            self._writer = self.store.writer(
                pack_key(self.backup_id, name), retain_until=self.retain_until
            )
            self._name = name
            self._offset = 0
        self._writer.write(sealed)
        self.blobs.append(
            {
                "pack": len(self.packs),
                "offset": self._offset,
                "length": len(sealed),
                "key": blob.key_ref,
                "first": blob.first,
                "last": blob.last,
                "records": blob.records,
            }
        )
        self._offset += len(sealed)
        if self._offset >= PACK_BYTES:
            self._close_pack()

    def _close_pack(self) -> None:
        assert self._writer is not None
        written = self._writer.close()
        self.packs.append({"name": self._name, "size": written.size, "sha256": written.sha256})
        self._writer = None

    def finish(self) -> None:
        if self._writer is not None:
            self._close_pack()

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.abort()
            except Exception as error:  # the original failure matters more
                log.warning("could not abort pack upload: %s", error)
            self._writer = None


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=1, sort_keys=True).encode()
