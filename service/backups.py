"""Composition of the backup side: master key, store, keyring, writer, reader.

Opened on demand (the display side needs none of it), from the settings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from domain.errors import InvalidInput
from retention.backup import BackupWriter
from retention.catalog import Catalog
from retention.drill import DrillReport, RestoreDrill, scratch_server_for
from retention.keyring import Keyring
from retention.keys import MasterKey, open_master_key
from retention.reader import BackupReader
from retention.stores import ObjectStore, open_store
from service.database import open_application, view_database
from service.runtime import Runtime

BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}([0-9]{6})?Z-[0-9a-f]{8}")


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

    def choose(self, backup_id: str | None = None, *, pick: str = "latest") -> str:
        """The backup a drill is about: named, the latest, or one at random."""
        if backup_id is not None:
            if not BACKUP_ID.fullmatch(backup_id):
                raise InvalidInput("backup_id", "is not a backup id (see `resultsvc backup list`)")
            return backup_id
        ids = self.catalog.ids()
        if not ids:
            raise NoBackup("there is no backup to drill: run `resultsvc backup run` first")
        return random.choice(ids) if pick == "random" else ids[-1]

    def drill(self, backup_id: str) -> tuple[DrillReport, int]:
        """Run a restore drill, record it as an event; return the report and its position."""
        drill = RestoreDrill(
            self.runtime.app,
            self.reader,
            open_application,
            view_database,
            scratch_server=scratch_server_for(self.runtime.settings.database_url),
        )
        report = drill.run(backup_id)
        position = self.runtime.app.record_drill(
            backup_id, report.passed, report.reason, report.as_dict()
        )
        return report, position


class NoBackup(Exception):
    """A drill was asked for, but the store holds no backup."""
