"""Reading backups back: verify every object, decrypt, and yield the records.

Verification checks, in order: the manifest parses and its HMAC holds (which
needs the master key), the chain is continuous (each incremental starts right
after its parent), every pack exists with the size and SHA-256 the manifest
gives, and every blob decrypts (its GCM tag binds backup id, pack, blob index
and key) into records that lie in the blob's declared range.

A blob under a plan key that was shredded is not a failure: that plan was
excluded on request and is unrecoverable by design. It is reported as such.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from retention.catalog import BackupInfo, info, manifest_key, pack_key
from retention.format import (
    KEY_BACKUP,
    FormatError,
    Record,
    blob_aad,
    check_manifest,
    decode_records,
    open_blob,
    parse_manifest,
    unb64,
)
from retention.keyring import Keyring
from retention.keys import MasterKey, MasterKeyError
from retention.stores import ObjectMissing, ObjectStore


class BackupUnreadable(Exception):
    """A backup cannot be read as a whole; the message names the object and the reason."""


@dataclass
class VerifyReport:
    backup_id: str
    chain: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0
    blobs: int = 0
    records: int = 0
    unrecoverable_plans: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class BackupReader:
    def __init__(self, store: ObjectStore, master: MasterKey, keyring: Keyring) -> None:
        self.store = store
        self.master = master
        self.keyring = keyring

    def open(self, backup_id: str) -> tuple[BackupInfo, bytes]:
        """The backup's manifest, authenticated, and its data key."""
        where = manifest_key(backup_id)
        try:
            raw = self.store.get(where)
        except ObjectMissing:
            raise BackupUnreadable(f"{where} is missing: no such complete backup") from None
        try:
            document = parse_manifest(raw, where)
            data_key = self.master.unwrap(
                unb64(str(document["wrapped_data_key"])), {"backup": str(document["id"])}
            )
            check_manifest(document, data_key, where)
            if document["id"] != backup_id:
                raise FormatError(f"{where}: manifest names backup {document['id']}")
        except MasterKeyError as error:
            raise BackupUnreadable(f"{where}: cannot unwrap the data key: {error}") from None
        except (FormatError, KeyError, ValueError) as error:
            raise BackupUnreadable(str(error)) from None
        return info(document), data_key

    def chain(self, backup_id: str) -> list[BackupInfo]:
        """The full and every incremental up to ``backup_id``, checked for continuity."""
        target, _ = self.open(backup_id)
        members = [self.open(member)[0] for member in target.chain] + [target]
        if members[0].kind != "full" or members[0].first_position != 1:
            raise BackupUnreadable(f"chain of {backup_id} does not start with a full backup")
        for before, after in itertools.pairwise(members):
            if after.parent != before.id or after.first_position != before.last_position + 1:
                raise BackupUnreadable(
                    f"broken chain: {after.id} starts at {after.first_position}, its parent"
                    f" {before.id} ends at {before.last_position}"
                )
        return members

    def verify(self, backup_id: str) -> VerifyReport:
        """Check one backup (and that its chain links up) without loading anything."""
        report = VerifyReport(backup_id)
        try:
            report.chain = [member.id for member in self.chain(backup_id)]
            for _ in self.records(backup_id, report):
                pass
        except BackupUnreadable as error:
            report.problems.append(str(error))
        return report

    def records(self, backup_id: str, report: VerifyReport | None = None) -> Iterator[Record]:
        """Every readable record of one backup, in log order; raise on corruption."""
        report = report or VerifyReport(backup_id)
        backup, data_key = self.open(backup_id)
        document = backup.manifest
        blobs_by_pack: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for index, blob in enumerate(document["blobs"]):
            blobs_by_pack.setdefault(int(blob["pack"]), []).append((index, blob))
        report.objects += 1
        for pack_index, pack in enumerate(document["packs"]):
            where = pack_key(backup_id, pack["name"])
            try:
                data = self.store.get(where)
            except ObjectMissing:
                raise BackupUnreadable(f"{where} is missing") from None
            report.objects += 1
            report.bytes += len(data)
            if len(data) != int(pack["size"]):
                raise BackupUnreadable(
                    f"{where}: {len(data)} bytes, the manifest says {pack['size']} (truncated?)"
                )
            if hashlib.sha256(data).hexdigest() != pack["sha256"]:
                raise BackupUnreadable(f"{where}: SHA-256 does not match the manifest (tampered)")
            for index, blob in blobs_by_pack.get(pack_index, []):
                yield from self._blob(
                    backup_id, where, data, pack_index, index, blob, data_key, report
                )

    def _blob(
        self,
        backup_id: str,
        where: str,
        data: bytes,
        pack_index: int,
        index: int,
        blob: dict[str, Any],
        data_key: bytes,
        report: VerifyReport,
    ) -> Iterator[Record]:
        key_ref = str(blob["key"])
        place = f"{where} blob {index} (bytes {blob['offset']}..{blob['offset'] + blob['length']})"
        if key_ref == KEY_BACKUP:
            key: bytes | None = data_key
        else:
            try:
                key = self.keyring.key_for_reading(key_ref.removeprefix("plan:"))
            except MasterKeyError as error:
                raise BackupUnreadable(
                    f"{place}: cannot unwrap the key of {key_ref}: {error}"
                ) from None
        if key is None:
            report.unrecoverable_plans.add(key_ref.removeprefix("plan:"))
            report.blobs += 1
            return
        sealed = data[int(blob["offset"]) : int(blob["offset"]) + int(blob["length"])]
        try:
            plain = open_blob(key, sealed, blob_aad(backup_id, pack_index, index, key_ref), place)
            records = list(decode_records(plain, place))
        except FormatError as error:
            raise BackupUnreadable(str(error)) from None
        if len(records) != int(blob["records"]):
            raise BackupUnreadable(
                f"{place}: {len(records)} records, manifest says {blob['records']}"
            )
        previous = int(blob["first"]) - 1
        for record in records:
            if not previous < record.position <= int(blob["last"]):
                raise BackupUnreadable(
                    f"{place}: record at position {record.position} out of order"
                )
            previous = record.position
        report.blobs += 1
        report.records += len(records)
        yield from records
