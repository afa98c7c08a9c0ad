"""Which backups exist: the manifests in the store are the catalog.

A backup exists when its manifest exists; the manifest is written last, so a
backup that failed half-way is never listed (its packs are orphans that the
retention sweep removes once their lock expires).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from retention.format import FormatError, parse_manifest
from retention.stores import ObjectStore

BACKUPS = "backups/"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BackupInfo:
    """A backup as its manifest describes it."""

    id: str
    kind: str
    parent: str | None
    chain: list[str]
    first_position: int
    last_position: int
    created_at: datetime
    expires_at: datetime
    events: int
    bytes_stored: int
    excluded_plans: list[str]
    manifest: dict[str, Any]


def manifest_key(backup_id: str) -> str:
    return f"{BACKUPS}{backup_id}/{MANIFEST}"


def pack_key(backup_id: str, name: str) -> str:
    return f"{BACKUPS}{backup_id}/{name}"


def info(document: dict[str, Any]) -> BackupInfo:
    return BackupInfo(
        id=str(document["id"]),
        kind=str(document["kind"]),
        parent=document.get("parent"),
        chain=list(document.get("chain", [])),
        first_position=int(document["first_position"]),
        last_position=int(document["last_position"]),
        created_at=datetime.fromisoformat(document["created_at"]),
        expires_at=datetime.fromisoformat(document["expires_at"]),
        events=int(document["stats"]["events"]),
        bytes_stored=int(document["stats"]["bytes_stored"]),
        excluded_plans=list(document.get("excluded_plans", [])),
        manifest=document,
    )


class Catalog:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.damaged: dict[str, str] = {}

    def ids(self) -> list[str]:
        """Ids of complete backups, oldest first (ids sort by creation time)."""
        return sorted(
            key[len(BACKUPS) : -len(MANIFEST) - 1]
            for key in self.store.list(BACKUPS)
            if key.endswith("/" + MANIFEST)
        )

    def get(self, backup_id: str) -> BackupInfo:
        return info(
            parse_manifest(self.store.get(manifest_key(backup_id)), manifest_key(backup_id))
        )

    def all(self) -> list[BackupInfo]:
        """Every readable backup; unreadable manifests are set aside in ``damaged``.

        One damaged manifest must not stop every later backup and sweep: it is
        reported (``backup verify`` names it) and skipped.
        """
        found = []
        self.damaged = {}
        for backup_id in self.ids():
            try:
                found.append(self.get(backup_id))
            except (FormatError, KeyError, ValueError, TypeError) as error:
                self.damaged[backup_id] = str(error) or type(error).__name__
        return found

    def prefixes(self) -> set[str]:
        """Every backup folder, complete or not (orphans of failed runs included)."""
        return {key[len(BACKUPS) :].split("/", 1)[0] for key in self.store.list(BACKUPS)}
