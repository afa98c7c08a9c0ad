"""Restore drills: pass, exclusions, damage, a live store that differs, records, API, CLI, demo.

Every drill runs the real writer, reader, restore and projector. The live
store is SQLite or PostgreSQL (``database_url``); the scratch store a drill
restores into is then a SQLite file in a ``resultsvc-drill-*`` temporary
folder, or a ``resultsvc_drill_*`` database on the same PostgreSQL server.
Whatever the verdict, no scratch may be left behind: ``ScratchWatch`` lists
both kinds before a drill and checks afterwards that none was added and that
the one the report names is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from domain.application import ResultsApp
from retention.catalog import BackupInfo, Catalog, manifest_key, pack_key
from retention.drill import DrillReport, RestoreDrill, scratch_server_for
from retention.exclusions import exclude_plan, shred_pending
from retention.restore import restore
from retention.stores import FileStore, open_store
from service.backups import Backups, NoBackup
from service.database import open_application, parse_database_url, view_database
from service.runtime import Runtime
from service.samples import batches
from service.settings import Settings

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/Audit"
DRILL_TOPIC = "resultsvc/RestoreDrill/Recorded"
PROBLEM = "application/problem+json"
STEPS = [
    "choose and fetch chain",
    "verify objects",
    "decrypt and load",
    "rebuild views",
    "compare with live",
]
SQLITE_SCRATCH = "sqlite scratch file in "
PG_SCRATCH = "scratch PostgreSQL database "


# --------------------------------------------------------------------- helpers


@dataclass
class Live:
    """The live side: runtime, its backups (folder + key file), the settings' environment."""

    runtime: Runtime
    backups: Backups
    env: dict[str, str]

    @property
    def app(self) -> ResultsApp:
        return self.runtime.app

    @property
    def url(self) -> str:
        return self.runtime.settings.database_url


LiveFactory = Callable[..., Live]


@pytest.fixture
def make_live(tmp_path: Path) -> Iterator[LiveFactory]:
    """Opens runtimes on a database; all share the test's backup folder and (by default) key."""
    opened: list[Runtime] = []

    def make(database_url: str, *, master_path: Path | None = None) -> Live:
        env = {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{master_path or tmp_path / 'keys' / 'master.key'}",
        }
        runtime = Runtime.open(Settings.from_env(env))
        opened.append(runtime)
        return Live(runtime, Backups.open(runtime), env)

    yield make
    for runtime in reversed(opened):
        runtime.close()


@pytest.fixture
def live(database_url: str, make_live: LiveFactory) -> Live:
    """The live store on SQLite and on PostgreSQL."""
    return make_live(database_url)


@pytest.fixture
def other_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second, empty store of the same kind as ``database_url``."""
    if database_url.startswith("sqlite:"):
        yield f"sqlite:///{tmp_path}/other.db"
        return
    schema = f"t_{uuid.uuid4().hex[:16]}"
    parts = urlsplit(database_url)
    yield urlunsplit((parts.scheme, parts.netloc, parts.path, f"schema={schema}", ""))
    config = parse_database_url(database_url)
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@dataclass(frozen=True)
class Team:
    id: UUID
    account: UUID


def new_team(app: ResultsApp) -> Team:
    team, _ = app.create_team(f"team-{uuid.uuid4().hex[:6]}")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=False, actor="test")
    return Team(team.id, account.id)


def add_run(app: ResultsApp, team: Team, plan: UUID, *, seed: int = 1) -> UUID:
    run, _ = app.start_run(team.id, plan)
    for batch in batches(8, 4, seed=seed):
        app.record_results(team.id, run.id, batch)
    app.complete_run(team.id, run.id, "succeeded")
    return run.id


def new_plan(app: ResultsApp, team: Team, name: str, *, seed: int = 1) -> UUID:
    plan, _ = app.create_plan(team.id, team.account, name)
    add_run(app, team, plan.id, seed=seed)
    return plan.id


def full_and_incremental(live: Live) -> tuple[BackupInfo, BackupInfo]:
    app = live.app
    team = new_team(app)
    plan = new_plan(app, team, "nightly")
    full = live.backups.writer.run(full=True).info
    add_run(app, team, plan, seed=2)
    new_plan(app, team, "weekly", seed=3)
    incremental = live.backups.writer.run().info
    assert (incremental.kind, incremental.chain) == ("incremental", [full.id])
    return full, incremental


def notifications(app: ResultsApp, up_to: int) -> list[Any]:
    return list(app.recorder.select_notifications(start=1, limit=100_000, stop=up_to))


def counts_by_aggregate(app: ResultsApp, up_to: int) -> Counter[UUID]:
    return Counter(UUID(str(n.originator_id)) for n in notifications(app, up_to))


def _scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("resultsvc-drill-*"))


class ScratchWatch:
    """The scratch stores that exist before a drill; after it, none may have been added."""

    def __init__(self, live_url: str) -> None:
        self.server = scratch_server_for(live_url)
        self.folders = _scratch_folders()
        self.databases = self.scratch_databases()

    def scratch_databases(self) -> set[str]:
        if self.server is None:
            return set()
        with psycopg.connect(self.server, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'resultsvc\\_drill\\_%'"
            ).fetchall()
        return {str(row[0]) for row in rows}

    def assert_clean(self, scratch: str) -> None:
        """Nothing left; ``scratch`` is the report's, naming the store the drill used."""
        assert _scratch_folders() <= self.folders, "a scratch folder was left behind"
        assert self.scratch_databases() <= self.databases, "a scratch database was left behind"
        if scratch.startswith(SQLITE_SCRATCH):
            folder = Path(scratch.removeprefix(SQLITE_SCRATCH))
            assert folder.name.startswith("resultsvc-drill-"), scratch
            assert not folder.exists(), scratch
        elif scratch:
            name = scratch.removeprefix(PG_SCRATCH)
            assert name.startswith("resultsvc_drill_") and name != scratch, scratch
            assert name not in self.scratch_databases(), scratch
            assert self.server is not None


def assert_scratch_kind(report: DrillReport, live_url: str) -> None:
    """A PostgreSQL service drills on its own server, an embedded one in a SQLite file."""
    prefix = PG_SCRATCH + "resultsvc_drill_" if live_url.startswith("postgres") else SQLITE_SCRATCH
    assert report.scratch.startswith(prefix), report.scratch


def assert_recorded(live: Live, report: DrillReport, position: int) -> dict[str, Any]:
    """The drill is an event at ``position`` and, once projected, an item of list_drills."""
    found = [n for n in notifications(live.app, position) if n.id == position]
    assert found and found[0].topic == DRILL_TOPIC, found
    event = live.app.mapper.to_domain_event(found[0])
    assert (event.backup_id, event.passed, event.reason) == (
        report.backup_id,
        report.passed,
        report.reason,
    )
    live.runtime.projector.catch_up()
    items = {item["position"]: item for item in live.runtime.queries.list_drills(None, 1000).items}
    item = items[position]
    assert item["id"] == str(event.originator_id)
    assert (item["backup_id"], item["passed"], item["reason"]) == (
        report.backup_id,
        report.passed,
        report.reason,
    )
    assert item["report"] == json.loads(json.dumps(report.as_dict()))
    return item


def pack_path(live: Live, backup: BackupInfo) -> tuple[Path, str]:
    store = live.backups.store
    assert isinstance(store, FileStore)
    key = pack_key(backup.id, backup.manifest["packs"][0]["name"])
    return store.path(key), key


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(env)
    return subprocess.run(
        [RESULTSVC, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------ passing


def test_a_drill_passes_after_a_full_and_after_full_plus_incremental(live: Live) -> None:
    app, backups = live.app, live.backups
    team = new_team(app)
    plan = new_plan(app, team, "nightly")
    full = backups.writer.run(full=True).info

    watch = ScratchWatch(live.url)
    report, position = backups.drill(full.id)
    assert report.passed, report.reason
    assert (report.reason, report.mismatches) == ("", [])
    assert report.chain == [full.id]
    assert report.backup_created_at == full.created_at.isoformat()
    assert report.last_position == full.last_position
    assert report.events_restored == full.events == full.last_position  # the whole log
    assert report.objects_verified == 1 + len(full.manifest["packs"])
    assert report.bytes_verified == sum(pack["size"] for pack in full.manifest["packs"])
    assert report.views_rebuilt == 3
    assert report.aggregates_compared == len(counts_by_aggregate(app, full.last_position))
    assert (report.excluded_absent, report.unrecoverable_by_design) == ([], [])
    assert list(report.steps) == STEPS
    assert report.rto_seconds >= sum(report.steps.values()) - 0.01
    assert_scratch_kind(report, live.url)
    watch.assert_clean(report.scratch)
    assert_recorded(live, report, position)

    add_run(app, team, plan, seed=2)
    new_plan(app, team, "weekly", seed=3)
    incremental = backups.writer.run().info
    assert incremental.parent == full.id
    report, position = backups.drill(incremental.id)
    assert report.passed, report.reason
    assert report.chain == [full.id, incremental.id]
    assert report.last_position == incremental.last_position
    assert report.events_restored == full.events + incremental.events
    assert report.objects_verified == 2 + len(full.manifest["packs"]) + len(
        incremental.manifest["packs"]
    )
    assert report.aggregates_compared == len(counts_by_aggregate(app, incremental.last_position))
    assert report.aggregates_compared > len(counts_by_aggregate(app, full.last_position))
    assert_scratch_kind(report, live.url)
    watch.assert_clean(report.scratch)
    assert_recorded(live, report, position)
    # Both drills, newest first.
    items = live.runtime.queries.list_drills(None, 10).items
    assert [(i["backup_id"], i["passed"]) for i in items] == [
        (incremental.id, True),
        (full.id, True),
    ]


def test_the_scratch_exists_while_the_drill_runs_and_is_removed_after(live: Live) -> None:
    """Seen from inside: the drill restores into a new, empty store, not the live one."""
    full_and_incremental(live)
    backup_id = live.backups.catalog.ids()[-1]
    server = scratch_server_for(live.url)
    watch = ScratchWatch(live.url)
    opened: list[tuple[str, int, bool]] = []

    def exists(url: str) -> bool:
        if server is None:
            path = parse_database_url(url).sqlite_path
            return path is not None and path.exists()
        return urlsplit(url).path.lstrip("/") in watch.scratch_databases()

    def open_scratch(url: str) -> ResultsApp:
        scratch = open_application(url)
        opened.append((url, scratch.head_position(), exists(url)))
        return scratch

    head = live.app.head_position()
    drill = RestoreDrill(
        live.app, live.backups.reader, open_scratch, view_database, scratch_server=server
    )
    report = drill.run(backup_id)
    assert report.passed, report.reason
    ((url, scratch_head, existed),) = opened
    assert url != live.url and scratch_head == 0 and existed
    if server is not None:
        name = urlsplit(url).path.lstrip("/")
        assert name.startswith("resultsvc_drill_") and name not in watch.databases
        assert report.scratch == PG_SCRATCH + name
    else:
        assert report.scratch == SQLITE_SCRATCH + str(Path(url.removeprefix("sqlite:///")).parent)
    assert not exists(url)
    watch.assert_clean(report.scratch)
    assert live.app.head_position() == head, "RestoreDrill.run wrote to the live store"


# --------------------------------------------------------------- exclusions


def test_plans_excluded_before_and_after_the_backup_are_reported_and_the_drill_passes(
    live: Live,
) -> None:
    app, backups = live.app, live.backups
    team = new_team(app)
    kept = new_plan(app, team, "kept")
    before = new_plan(app, team, "excluded before", seed=2)
    after = new_plan(app, team, "excluded after", seed=3)
    exclude_plan(app, backups.keyring, team.id, before, reason="asked", ticket="T-1", actor="t")
    full = backups.writer.run(full=True).info
    assert str(before) not in full.manifest["plans"]
    assert {str(kept), str(after)} <= set(full.manifest["plans"])
    watch = ScratchWatch(live.url)

    report, position = backups.drill(full.id)
    assert report.passed, report.reason
    assert report.excluded_absent == [str(before)]
    assert report.unrecoverable_by_design == []
    assert report.events_restored == full.events
    assert_recorded(live, report, position)

    exclude_plan(app, backups.keyring, team.id, after, reason="asked", ticket="T-2", actor="t")
    report, position = backups.drill(full.id)
    assert report.passed, report.reason
    assert report.excluded_absent == [str(before)]
    assert report.unrecoverable_by_design == [str(after)]
    of_after = sum(b["records"] for b in full.manifest["blobs"] if b["key"] == f"plan:{after}")
    assert of_after > 0
    assert report.events_restored == full.events - of_after
    assert_recorded(live, report, position)

    add_run(app, team, kept, seed=4)
    incremental = backups.writer.run().info
    assert not {str(before), str(after)} & set(incremental.manifest["plans"])
    report, position = backups.drill(incremental.id)
    assert report.passed, report.reason
    assert report.chain == [full.id, incremental.id]
    assert report.excluded_absent == [str(before)]
    assert report.unrecoverable_by_design == [str(after)]
    assert report.events_restored == full.events - of_after + incremental.events
    assert_recorded(live, report, position)
    watch.assert_clean(report.scratch)


def test_a_plan_excluded_after_the_backup_whose_key_is_not_shredded_yet_fails_the_drill(
    live: Live,
) -> None:
    """The exclusion check can fail: the shred pending, the plan still decrypts from backups."""
    app, backups = live.app, live.backups
    team = new_team(app)
    new_plan(app, team, "kept")
    plan = new_plan(app, team, "excluded", seed=2)
    full = backups.writer.run(full=True).info
    app.request_backup_exclusion(team.id, plan, reason="asked", ticket=None, actor="t")
    watch = ScratchWatch(live.url)

    report, position = backups.drill(full.id)
    assert not report.passed
    assert report.reason == f"restored store differs: excluded plan {plan} is still decryptable"
    assert report.mismatches == [f"excluded plan {plan} is still decryptable"]
    assert_recorded(live, report, position)
    watch.assert_clean(report.scratch)

    assert shred_pending(app, backups.keyring, actor="t") == [plan]
    report, position = backups.drill(full.id)
    assert report.passed, report.reason
    assert report.unrecoverable_by_design == [str(plan)]
    watch.assert_clean(report.scratch)


# ------------------------------------------------------------------- damage

PACK_DAMAGES = ["tampered pack", "truncated pack", "missing pack", "edited manifest"]


@pytest.mark.parametrize("member", ["target", "parent"])
@pytest.mark.parametrize("damage", PACK_DAMAGES)
def test_a_damaged_backup_fails_the_drill_naming_the_object(
    live: Live, damage: str, member: str
) -> None:
    full, incremental = full_and_incremental(live)
    damaged = incremental if member == "target" else full
    pack, key = pack_path(live, damaged)
    size = pack.stat().st_size
    if damage == "tampered pack":
        flip(pack)
        expected = f"{key}: SHA-256 does not match the manifest (tampered)"
    elif damage == "truncated pack":
        pack.write_bytes(pack.read_bytes()[:-10])
        expected = f"{key}: {size - 10} bytes, the manifest says {size} (truncated?)"
    elif damage == "missing pack":
        pack.unlink()
        expected = f"{key} is missing"
    else:
        path = live.backups.store.path(manifest_key(damaged.id))  # type: ignore[attr-defined]
        document = json.loads(path.read_bytes())
        document["last_position"] += 1
        path.write_text(json.dumps(document))
        expected = f"{manifest_key(damaged.id)}: manifest authentication failed (altered manifest)"
    watch = ScratchWatch(live.url)

    report, position = live.backups.drill(incremental.id)
    assert not report.passed
    assert report.reason == expected
    assert report.scratch == "" and report.events_restored == 0  # stopped before loading
    watch.assert_clean(report.scratch)
    assert_recorded(live, report, position)


def test_a_different_master_key_fails_the_drill(
    live: Live, make_live: LiveFactory, tmp_path: Path
) -> None:
    _, incremental = full_and_incremental(live)
    other = make_live(live.url, master_path=tmp_path / "other" / "master.key")
    assert other.backups.master.ref != live.backups.master.ref  # makes the other key file
    watch = ScratchWatch(live.url)

    report, position = other.backups.drill(incremental.id)
    assert not report.passed
    assert report.reason.startswith(f"{manifest_key(incremental.id)}: cannot unwrap the data key")
    assert report.scratch == ""
    watch.assert_clean(report.scratch)
    assert_recorded(other, report, position)
    # The right key still drills it.
    assert live.backups.drill(incremental.id)[0].passed


def test_a_broken_chain_fails_the_drill(live: Live) -> None:
    full, incremental = full_and_incremental(live)
    path = live.backups.store.path(manifest_key(full.id))  # type: ignore[attr-defined]
    path.unlink()
    watch = ScratchWatch(live.url)

    report, position = live.backups.drill(incremental.id)
    assert not report.passed
    assert report.reason == f"{manifest_key(full.id)} is missing: no such complete backup"
    assert report.scratch == ""
    watch.assert_clean(report.scratch)
    assert_recorded(live, report, position)


# ----------------------------------------------- the live store differs


def test_a_live_store_missing_events_the_backup_holds_fails_the_drill(
    live: Live, other_url: str, make_live: LiveFactory
) -> None:
    """The live database was rolled back to what the full held, the backups went on.

    The rolled-back store is a faithful copy of the source up to the full
    (restored from it), so a drill of the full passes there; a drill of the
    incremental finds, aggregate by aggregate, the events the store lost.
    """
    app = live.app
    team = new_team(app)
    plan = new_plan(app, team, "nightly")
    full = live.backups.writer.run(full=True).info
    rolled = make_live(other_url)
    assert restore(live.backups.reader, full.id, rolled.app).events == full.last_position
    add_run(app, team, plan, seed=2)
    incremental = live.backups.writer.run().info

    control = RestoreDrill(
        rolled.app,
        rolled.backups.reader,
        open_application,
        view_database,
        scratch_server=scratch_server_for(rolled.url),
    ).run(full.id)
    assert control.passed, control.reason

    watch = ScratchWatch(rolled.url)
    report, position = rolled.backups.drill(incremental.id)
    assert not report.passed
    had = counts_by_aggregate(app, full.last_position)
    holds = counts_by_aggregate(app, incremental.last_position)
    lost = sorted((ident for ident in holds if holds[ident] != had[ident]), key=str)
    assert lost and len(lost) < 20
    assert report.mismatches == [
        f"aggregate {ident}: live {had[ident]} events, restored {holds[ident]}"
        " (or their digests differ)"
        for ident in lost
    ]
    assert report.reason == f"restored store differs: {report.mismatches[0]}"
    assert report.events_restored == incremental.last_position  # it did load everything
    assert report.views_rebuilt == 3
    assert_scratch_kind(report, rolled.url)
    watch.assert_clean(report.scratch)
    assert_recorded(rolled, report, position)


# -------------------------------------------------------------------- the API


def ops_headers(runtime: Runtime) -> dict[str, str]:
    return {"Authorization": f"Bearer {runtime.tokens.create(None, frozenset({'ops'}))}"}


def gauge(api: Any, name: str) -> float | None:
    text = api.get("/metrics").text
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
    assert len(values) <= 1, values
    return values[0] if values else None


def test_post_restore_drill_without_a_backup_is_a_409_problem(api: Any, runtime: Runtime) -> None:
    headers = ops_headers(runtime)
    new_team(runtime.app)
    head = runtime.app.head_position()
    response = api.post("/v1/restore-drills", json={}, headers=headers)
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["status"], body["title"]) == (409, "No backup")
    assert "there is no backup to drill" in body["detail"]
    assert runtime.app.head_position() == head, "a drill without a backup was recorded"
    listed = api.get("/v1/restore-drills", headers=headers)
    assert listed.json() == {"items": [], "next_cursor": None}
    assert gauge(api, "resultsvc_restore_drill_passed") is None


def test_post_restore_drill_answers_201_records_it_and_drives_the_metrics(
    api: Any, runtime: Runtime
) -> None:
    headers = ops_headers(runtime)
    team = new_team(runtime.app)
    new_plan(runtime.app, team, "nightly")
    taken = api.post("/v1/backups", json={"full": True}, headers=headers)
    assert taken.status_code == 201, taken.text
    backup_id = taken.json()["id"]
    watch = ScratchWatch(runtime.settings.database_url)

    keyed = {**headers, "Idempotency-Key": "drill-1"}
    response = api.post("/v1/restore-drills", json={}, headers=keyed)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["backup_id"], body["passed"], body["reason"]) == (backup_id, True, "")
    assert body["position"] == runtime.app.head_position()
    assert body["report"]["chain"] == [backup_id]
    assert body["report"]["events_restored"] > 0
    assert_scratch_kind(DrillReport(**body["report"]), runtime.settings.database_url)
    watch.assert_clean(body["report"]["scratch"])
    again = api.post("/v1/restore-drills", json={}, headers=keyed)
    assert (again.status_code, again.json()) == (201, body)
    assert runtime.app.head_position() == body["position"], "the replay ran another drill"

    listed = api.get(f"/v1/restore-drills?after={body['position']}", headers=headers).json()
    # The drill's own event, then (same transaction, keyed request) the key's receipt.
    assert [(i["position"], i["passed"]) for i in listed["items"]] == [(body["position"] - 1, True)]
    assert gauge(api, "resultsvc_restore_drill_passed") == 1.0
    assert "\nresultsvc_restore_drill_passed 1.0\n" in api.get("/metrics").text
    recorded = datetime.fromisoformat(listed["items"][0]["recorded_at"].replace("Z", "+00:00"))
    assert gauge(api, "resultsvc_restore_drill_timestamp_seconds") == recorded.timestamp()
    assert abs(recorded.timestamp() - datetime.now(UTC).timestamp()) < 300

    store = open_store(runtime.settings.backup_url)
    assert isinstance(store, FileStore)
    key = pack_key(backup_id, Catalog(store).get(backup_id).manifest["packs"][0]["name"])
    flip(store.path(key))
    failed = api.post("/v1/restore-drills", json={"backup_id": backup_id}, headers=headers)
    assert failed.status_code == 201, failed.text
    verdict = failed.json()
    assert verdict["passed"] is False
    assert verdict["reason"] == f"{key}: SHA-256 does not match the manifest (tampered)"
    watch.assert_clean(verdict["report"]["scratch"])
    assert gauge(api, "resultsvc_restore_drill_passed") == 0.0
    items = api.get("/v1/restore-drills", headers=headers).json()["items"]
    assert [(i["position"], i["passed"]) for i in items] == [
        (verdict["position"], False),  # no Idempotency-Key: no receipt after it
        (body["position"] - 1, True),
    ]
    assert items[0]["reason"] == verdict["reason"]


@pytest.mark.parametrize(
    "database_url",
    [
        "sqlite",
        pytest.param("postgresql", marks=[pytest.mark.postgres]),
    ],
    indirect=True,
)
def test_a_backup_id_with_a_nul_character_does_not_stop_the_drills_view(
    api: Any, runtime: Runtime
) -> None:
    headers = ops_headers(runtime)
    new_team(runtime.app)
    assert api.post("/v1/backups", json={"full": True}, headers=headers).status_code == 201
    response = api.post("/v1/restore-drills", json={"backup_id": "\u0000"}, headers=headers)
    assert response.status_code == 422, response.text  # not a backup id: refused, not recorded
    good = api.post("/v1/restore-drills", json={}, headers=headers)
    assert good.status_code == 201 and good.json()["passed"], good.text
    listed = api.get("/v1/restore-drills", headers=headers)
    failed = [s.view for s in runtime.projector.status() if s.state == "failed"]
    assert failed == []
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"][0]["position"] == good.json()["position"]
    assert gauge(api, "resultsvc_restore_drill_passed") == 1.0


# -------------------------------------------------------------------- the CLI


def test_choose_names_the_given_the_latest_or_any_backup_at_random(
    tmp_path: Path, make_live: LiveFactory
) -> None:
    live = make_live(f"sqlite:///{tmp_path}/choose.db")
    with pytest.raises(NoBackup, match="there is no backup to drill"):
        live.backups.choose(pick="random")
    full, incremental = full_and_incremental(live)
    assert live.backups.choose() == incremental.id
    assert live.backups.choose(full.id, pick="random") == full.id
    # Each draw misses the full with probability 1/2: all 200 do with 2**-200.
    picks = Counter(live.backups.choose(pick="random") for _ in range(200))
    assert set(picks) == {full.id, incremental.id}


def test_cli_restore_drill_exits_0_only_when_it_passes(
    tmp_path: Path, make_live: LiveFactory
) -> None:
    live = make_live(f"sqlite:///{tmp_path}/cli.db")
    none = run_cli(["restore-drill", "--json"], tmp_path, live.env)
    assert_one_line_failure(none, "there is no backup to drill")

    full, incremental = full_and_incremental(live)
    watch = ScratchWatch(live.url)
    latest = run_cli(["restore-drill", "--json"], tmp_path, live.env)
    assert latest.returncode == 0, latest.stderr
    report = json.loads(latest.stdout)
    assert (report["backup_id"], report["passed"]) == (incremental.id, True)
    assert report["chain"] == [full.id, incremental.id]
    watch.assert_clean(report["scratch"])

    chains = {full.id: [full.id], incremental.id: [full.id, incremental.id]}
    chosen = run_cli(["restore-drill", "--random", "--json"], tmp_path, live.env)
    assert chosen.returncode == 0, chosen.stderr
    report = json.loads(chosen.stdout)
    assert report["passed"] is True
    assert report["chain"] == chains[report["backup_id"]]

    named = run_cli(["restore-drill", "--backup", full.id], tmp_path, live.env)
    assert named.returncode == 0, named.stderr
    assert f"restore drill of {full.id}: PASSED" in named.stdout

    pack, key = pack_path(live, full)
    flip(pack)
    broken = run_cli(["restore-drill", "--json"], tmp_path, live.env)
    assert_one_line_failure(broken, f"drill of {incremental.id} FAILED", key, "SHA-256")
    report = json.loads(broken.stdout)
    assert report["passed"] is False and key in report["reason"]
    watch.assert_clean(report["scratch"])

    live.runtime.projector.catch_up()
    items = live.runtime.queries.list_drills(None, 10).items
    assert [i["passed"] for i in items] == [False, True, True, True]
    assert items[0]["backup_id"] == incremental.id and key in items[0]["reason"]


def test_the_demo_drill_passes(tmp_path: Path) -> None:
    watch = ScratchWatch("sqlite:///unused.db")
    result = run_cli(["demo", "--json"], tmp_path, {})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    drill = report["drill"]
    assert drill["passed"] is True, drill["reason"]
    assert (drill["reason"], drill["mismatches"]) == ("", [])
    assert drill["chain"] == [backup["id"] for backup in report["backups"]]
    assert drill["backup_id"] == report["backups"][-1]["id"]
    assert drill["unrecoverable_by_design"] == [report["exclusion"]["plan_id"]]
    assert drill["events_restored"] > 0 and drill["views_rebuilt"] == 3
    assert (tmp_path / "var").is_dir()  # the embedded default, in the working folder
    watch.assert_clean(drill["scratch"])
