"""Composition of the backup side: master key, store, keyring, writer, reader.

Opened on demand (the display side needs none of it), from the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from retention.keys import MasterKey, open_master_key
from retention.stores import ObjectStore, open_store

from retention.backup import BackupWriter
from retention.catalog import Catalog
from retention.keyring import Keyring
from retention.reader import BackupReader
from service.runtime import Runtime


@dataclass
class Backups:
    runtime: Runtime
    store: ObjectStore
    master: MasterKey
    keyring: Keyring
    writer: BackupWriter
    reader: BackupReader
    catalog: Catalog

    @classmethod
    def open(
        cls, runtime: Runtime, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> Backups:
        settings = runtime.settings
        store = open_store(settings.backup_url)
        master = open_master_key(settings.master_key)
        keyring = Keyring(store, master, runtime.views)
        keyring.ensure_schema()
        writer = BackupWriter(
            runtime.app,
            store,
            master,
            keyring,
            retention=settings.backup_retention,
            clock=clock,
        )
        return cls(
            runtime,
            store,
            master,
            keyring,
            writer,
            BackupReader(store, master, keyring),
            Catalog(store),
        )
