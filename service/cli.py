"""The ``resultsvc`` command line.

Every command explains itself with ``--help``, exits 0 on success and, on
failure, prints one line saying why and exits non-zero: operators read this
at 3 a.m., a traceback helps nobody.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from domain.application import ResultsApp
from domain.errors import DomainError
from service.database import BadDatabaseUrl, DatabaseUnavailable, open_application
from service.demo import demo_total_findings, run_demo
from service.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1


class _OneLineErrors(click.Group):
    """Turns the service's own refusals into ``Error: <reason>`` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DomainError, DatabaseUnavailable, BadDatabaseUrl) as error:
            raise click.ClickException(str(error)) from None


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except DomainError as error:
        raise click.ClickException(f"configuration: {error}") from None


def _open_app() -> ResultsApp:
    return open_application(_settings().database_url)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="resultsvc")
def cli() -> None:
    """Event-sourced results and retention service.

    Keeps plan run results for display, backs them up encrypted for up to five
    years and keeps excluded plans out of backups. Configured by RESULTSVC_*
    environment variables (or a .env file); without any, it runs embedded on
    SQLite under ./var.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(as_json: bool) -> None:
    """Run the main job on the configured store and print what it did.

    Creates a team, links an account (unverified, no AWS call), records two
    plans with four runs and a few thousand realistic findings.
    """
    settings = _settings()
    app = open_application(settings.database_url)
    console = Console(stderr=True)
    try:
        with Progress(
            TextColumn("recording findings"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=as_json or not console.is_terminal,
        ) as progress:
            task = progress.add_task("findings", total=demo_total_findings())
            report = run_demo(app, lambda n: progress.advance(task, n))
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    out = Console(width=None if sys.stdout.isatty() else 120)
    out.print(f"[bold]resultsvc demo[/] on {settings.database_url}")
    out.print(f"team      {report.team_name}  id={report.team_id}")
    out.print(f"account   {report.role_arn}  id={report.account_id}")
    for note in report.notes:
        out.print(f"note      {note}")
    table = Table(title="plan runs recorded")
    for column in ("plan", "run", "status", "findings", "critical", "high", "FAIL", "PASS"):
        table.add_column(column)
    for run in report.runs:
        table.add_row(
            run.plan,
            run.run_id[:8],
            run.status,
            str(run.total),
            str(run.by_severity.get("critical", 0)),
            str(run.by_severity.get("high", 0)),
            str(run.by_status.get("FAIL", 0)),
            str(run.by_status.get("PASS", 0)),
        )
    out.print(table)
    out.print(f"events in the log: {report.events}")


@cli.group()
def teams() -> None:
    """Teams: the unit of isolation for accounts, plans and results."""


@teams.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the team as JSON.")
def teams_create(name: str, as_json: bool) -> None:
    """Create a team named NAME and print its id and External ID.

    The External ID goes into the trust policy of the role the customer
    creates for us; it is random, 43 characters, and unique.
    """
    app = _open_app()
    try:
        team, position = app.create_team(name)
    finally:
        app.close()
    record = {
        "id": str(team.id),
        "name": team.name,
        "external_id": team.external_id,
        "position": position,
    }
    if as_json:
        click.echo(json.dumps(record))
    else:
        click.echo(f"team {record['id']} {team.name!r} external_id={team.external_id}")


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="resultsvc"))
