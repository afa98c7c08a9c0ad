"""The restore drill: prove that a backup restores to what the live store held.

Steps, each timed: choose the backup and its chain; verify every object;
restore (decrypt and load) into a scratch store; rebuild the display views
there; compare with the live store up to the backup's last position, per
aggregate (event count and digest), leaving out excluded plans; check the
exclusions (plans excluded before the backup are absent from it, plans
excluded after it are present but undecryptable: "unrecoverable by design").

The scratch store is a fresh SQLite file in a temporary folder, or a scratch
PostgreSQL database created for the drill; it is always removed, pass or fail.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from domain.application import ResultsApp
from projections.projector import Projector
from projections.sqlstore import ViewDatabase
from retention.reader import BackupReader, BackupUnreadable
from retention.restore import RestoreRefused, aggregate_digests, restore


@dataclass
class DrillReport:
    """What a drill did and found; ``passed`` is the verdict, ``reason`` why not."""

    backup_id: str = ""
    chain: list[str] = field(default_factory=list)
    backup_created_at: str = ""
    rpo_seconds: float = 0.0
    objects_verified: int = 0
    bytes_verified: int = 0
    events_restored: int = 0
    last_position: int = 0
    views_rebuilt: int = 0
    aggregates_compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    excluded_absent: list[str] = field(default_factory=list)
    unrecoverable_by_design: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    rto_seconds: float = 0.0
    scratch: str = ""
    passed: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


OpenScratch = Callable[[], Iterator[tuple[ResultsApp, ViewDatabase, str]]]


class RestoreDrill:
    def __init__(
        self,
        live: ResultsApp,
        reader: BackupReader,
        open_app: Callable[[str], ResultsApp],
        open_views: Callable[[str], ViewDatabase],
        *,
        scratch_server: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``scratch_server``: a PostgreSQL URL to create scratch databases on, else SQLite."""
        self.live = live
        self.reader = reader
        self.open_app = open_app
        self.open_views = open_views
        self.scratch_server = scratch_server
        self.clock = clock

    def run(self, backup_id: str) -> DrillReport:
        """Run the drill on one backup; never raises for a failed drill, reports it."""
        report = DrillReport(backup_id=backup_id)
        started = time.monotonic()
        try:
            self._run(backup_id, report)
            report.passed = not report.mismatches
            if report.mismatches:
                report.reason = f"restored store differs: {report.mismatches[0]}"
        except (BackupUnreadable, RestoreRefused) as error:
            report.reason = str(error)
        except Exception as error:  # the drill must say why, whatever broke
            report.reason = f"{type(error).__name__}: {error}"
        report.rto_seconds = round(time.monotonic() - started, 3)
        return report

    def _run(self, backup_id: str, report: DrillReport) -> None:
        with _timed(report, "choose and fetch chain"):
            chain = self.reader.chain(backup_id)
            target = chain[-1]
            report.chain = [member.id for member in chain]
            report.backup_created_at = target.created_at.isoformat()
            report.rpo_seconds = round((self.clock() - target.created_at).total_seconds(), 3)
            report.last_position = target.last_position
        with _timed(report, "verify objects"):
            for member in chain:
                verified = self.reader.verify(member.id)
                if not verified.ok:
                    raise BackupUnreadable(verified.problems[0])
                report.objects_verified += verified.objects
                report.bytes_verified += verified.bytes
        with self._scratch() as (scratch, views, where):
            report.scratch = where
            with _timed(report, "decrypt and load"):
                restored = restore(self.reader, backup_id, scratch)
            report.events_restored = restored.events
            with _timed(report, "rebuild views"):
                projector = Projector(scratch, views)
                try:
                    projector.ensure_schema()
                    report.views_rebuilt = len(projector.views)
                    for view in projector.views:  # the bulk path: indexes built after the load
                        projector.rebuild(view)
                    statuses = projector.status()
                    failed = [s.view for s in statuses if s.state == "failed"]
                    failed += [
                        f"{s.view} (stopped at {s.position} of {s.head})"
                        for s in statuses
                        if s.state != "failed" and s.lag
                    ]
                finally:
                    projector.close()
                if failed:
                    report.mismatches.append(f"views failed to rebuild: {', '.join(failed)}")
            with _timed(report, "compare with live"):
                self._compare(report, scratch, target.last_position, restored.unrecoverable_plans)

    def _compare(
        self, report: DrillReport, scratch: ResultsApp, up_to: int, unrecoverable: set[str]
    ) -> None:
        excluded = set(self.live.excluded_plans())
        backup = self.reader.chain(report.backup_id)
        in_backup = {plan for member in backup for plan in member.manifest.get("plans", [])}
        for plan in sorted(str(p) for p in excluded):
            if plan in in_backup:
                if plan not in unrecoverable:
                    report.mismatches.append(f"excluded plan {plan} is still decryptable")
                report.unrecoverable_by_design.append(plan)
            else:
                report.excluded_absent.append(plan)
        live = aggregate_digests(self.live, up_to=up_to, leave_out=excluded)
        restored = aggregate_digests(scratch, up_to=scratch.head_position(), leave_out=excluded)
        report.aggregates_compared = len(live)
        for ident in sorted(set(live) | set(restored), key=str):
            if live.get(ident) != restored.get(ident):
                seen, got = live.get(ident), restored.get(ident)
                report.mismatches.append(
                    f"aggregate {ident}: live {seen[0] if seen else 0} events,"
                    f" restored {got[0] if got else 0} (or their digests differ)"
                )
                if len(report.mismatches) >= 20:
                    return

    @contextmanager
    def _scratch(self) -> Iterator[tuple[ResultsApp, ViewDatabase, str]]:
        """A fresh, empty store for the drill, removed afterwards whatever happens."""
        if self.scratch_server is None:
            folder = tempfile.mkdtemp(prefix="resultsvc-drill-")
            url = f"sqlite:///{folder}/scratch.db"
            app = self.open_app(url)
            views = self.open_views(url)
            try:
                yield app, views, f"sqlite scratch file in {folder}"
            finally:
                views.close()
                app.close()
                shutil.rmtree(folder, ignore_errors=True)
            return
        name = f"resultsvc_drill_{secrets.token_hex(6)}"
        server = self.scratch_server
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = _with_database(server, name)
        try:
            app = self.open_app(url)
            views = self.open_views(url)
            try:
                yield app, views, f"scratch PostgreSQL database {name}"
            finally:
                views.close()
                app.close()
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                conn.execute(drop.format(sql.Identifier(name)))


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}"


@contextmanager
def _timed(report: DrillReport, step: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        report.steps[step] = round(time.monotonic() - start, 3)


def scratch_server_for(live_url: str) -> str | None:
    """Drills of a PostgreSQL service use a scratch database on the same server."""
    return live_url.split("?", 1)[0] if live_url.startswith(("postgresql:", "postgres:")) else None
