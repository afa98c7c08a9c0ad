"""The retention sweep: nothing is kept longer than the retention period.

A chain (a full and its incrementals) shares the full's expiry, so it goes as
a whole. Each backup's manifest is deleted first (from then on it is no
longer listed), then its packs. Folders without a manifest (backups that
failed half-way) are removed once their objects may be deleted. On S3 the
Object Lock retain-until date makes early deletion impossible, whatever the
sweeper's clock says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from domain.application import ResultsApp
from retention.catalog import BACKUPS, Catalog, manifest_key
from retention.stores import ObjectStore, StoreError

log = logging.getLogger(__name__)

ORPHAN_AGE = timedelta(days=1)


@dataclass
class SweepReport:
    expired: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dry_run: bool = False


def sweep(
    app: ResultsApp,
    store: ObjectStore,
    now: datetime,
    *,
    dry_run: bool = False,
    actor: str = "retention-sweep",
) -> SweepReport:
    """Delete every backup whose expiry has passed; record the sweep as an event."""
    catalog = Catalog(store)
    report = SweepReport(dry_run=dry_run)
    listed = set()
    for backup in catalog.all():
        listed.add(backup.id)
        if backup.expires_at > now:
            report.kept.append(backup.id)
            continue
        report.expired.append(backup.id)
        if dry_run:
            continue
        try:
            store.delete(manifest_key(backup.id))
            for key in store.list(f"{BACKUPS}{backup.id}/"):  # keys come back whole
                store.delete(key)
        except StoreError as error:
            report.problems.append(f"{backup.id}: {error}")
    for damaged, reason in catalog.damaged.items():
        listed.add(damaged)  # never treated as an orphan: a person must look at it
        report.problems.append(f"{damaged}: unreadable manifest, kept: {reason}")
    for orphan in sorted(catalog.prefixes() - listed):
        # A folder without a manifest is a backup that failed half-way, or one
        # still being written: only folders older than ORPHAN_AGE are removed.
        if dry_run or orphan[:15] >= f"{now - ORPHAN_AGE:%Y%m%dT%H%M%S}":
            continue
        try:
            store.abort_incomplete(f"{BACKUPS}{orphan}/")
            for key in store.list(f"{BACKUPS}{orphan}/"):
                store.delete(key)
            report.orphans_removed.append(orphan)
        except StoreError as error:  # still locked: a later sweep gets it
            log.info("orphan backup folder %s kept for now: %s", orphan, error)
    if not dry_run:
        done = [b for b in report.expired if not any(p.startswith(b) for p in report.problems)]
        app.record_sweep(done, len(report.kept), actor=actor)
    return report
