"""The command line as an operator meets it: a real process, its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.database import open_application
from service.demo import DEMO_PLANS, demo_total_findings

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(env)
    return subprocess.run(
        [RESULTSVC, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = _run(["--help"], tmp_path)
    assert result.returncode == 0
    for command in ("demo", "teams"):
        assert command in result.stdout


def test_demo_on_the_embedded_default_records_what_it_reports(tmp_path: Path) -> None:
    result = _run(["demo", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    database = tmp_path / "var" / "resultsvc.db"
    assert database.is_file(), "the default store is SQLite under ./var"
    assert sum(run["total"] for run in report["runs"]) == demo_total_findings()
    assert len(report["runs"]) == sum(len(runs) for _, runs in DEMO_PLANS)
    assert report["account"]["verified"] is False
    assert any("does not call AWS" in note for note in report["notes"])
    # What the report claims is what the store holds.
    app = open_application(f"sqlite:///{database}")
    try:
        from uuid import UUID

        team_id = UUID(report["team"]["id"])
        for run in report["runs"]:
            stored = app.get_run(team_id, UUID(run["run_id"]))
            assert stored.total == run["total"]
            assert stored.status == run["status"]
            severities: dict[str, int] = {}
            for finding in app.run_results(team_id, stored.id):
                severities[finding["severity"]] = severities.get(finding["severity"], 0) + 1
            assert severities == run["by_severity"]
        # The runs, then two backups and the exclusion (request + shredding) were recorded.
        assert report["events"] < app.head_position()
        backups = report["backups"]
        assert [b["kind"] for b in backups] == ["full", "incremental"]
        assert all(b["verified"] for b in backups)
        assert backups[0]["unrecoverable_by_design"] == [report["exclusion"]["plan"]]
        assert backups[1]["excluded_plans"] == [report["exclusion"]["plan"]]
        assert report["exclusion"]["plan"] not in backups[1]["plans"]
    finally:
        app.close()


@pytest.mark.postgres
def test_demo_runs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    result = _run(["demo"], tmp_path, RESULTSVC_DATABASE_URL=pg_url)
    assert result.returncode == 0, result.stderr
    assert "plan runs, as the display views show them" in result.stdout
    assert not (tmp_path / "var" / "resultsvc.db").exists()


def test_teams_create_prints_the_external_id(tmp_path: Path) -> None:
    result = _run(["teams", "create", "Blue Team", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    team = json.loads(result.stdout)
    assert team["name"] == "Blue Team"
    assert len(team["external_id"]) >= 32


@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        (["teams", "create", "  "], {}, "name: must not be empty"),
        (
            ["teams", "create", "x"],
            {"RESULTSVC_DATABASE_URL": "postgresql://u:hunter2pw@127.0.0.1:1/db"},
            "cannot reach database postgresql://u@127.0.0.1:1/db",
        ),
        (["teams", "create", "x"], {"RESULTSVC_DATABASE_URL": "mysql://h/db"}, "unsupported"),
        (["demo"], {"RESULTSVC_DISPLAY_RETENTION": "ninety days"}, "RESULTSVC_DISPLAY_RETENTION"),
    ],
)
def test_failures_are_one_line_and_non_zero(
    tmp_path: Path, args: list[str], env: dict[str, str], reason: str
) -> None:
    result = _run(args, tmp_path, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0]
    assert "Traceback" not in result.stderr
    assert "hunter2pw" not in result.stderr + result.stdout


def test_tokens_revoke_refuses_the_token_from_then_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/resultsvc.db"
    created = _run(["tokens", "create", "--scope", "ops"], tmp_path, RESULTSVC_DATABASE_URL=url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    token_id = token.split("_")[1]
    from service.runtime import Runtime
    from service.settings import Settings

    with Runtime.open(Settings.from_env({"RESULTSVC_DATABASE_URL": url})) as runtime:
        assert runtime.tokens.authenticate(token) is not None
        revoked = _run(["tokens", "revoke", token_id], tmp_path, RESULTSVC_DATABASE_URL=url)
        assert revoked.returncode == 0, revoked.stderr
        assert runtime.tokens.authenticate(token) is None
    unknown = _run(["tokens", "revoke", "0" * 12], tmp_path, RESULTSVC_DATABASE_URL=url)
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines()[-1] == f"Error: no token {'0' * 12!r}"
