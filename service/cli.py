"""The ``resultsvc`` command line.

Every command explains itself with ``--help``, exits 0 on success and, on
failure, prints one line saying why and exits non-zero: operators read this
at 3 a.m., a traceback helps nobody.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from domain.application import ResultsApp
from domain.durations import parse_duration
from domain.errors import DomainError
from projections.projector import Projector
from projections.purge import purge_older_than
from projections.views import ALL_VIEWS
from retention.backup import BackupFailed
from retention.drill import DrillReport
from retention.exclusions import exclude_plan
from retention.format import FormatError
from retention.keys import MasterKeyError
from retention.reader import BackupUnreadable
from retention.restore import RestoreRefused
from retention.restore import restore as restore_chain
from retention.stores import StoreError
from retention.sweeper import sweep
from service import queue_messages as messages
from service.account_link import AccessKeys, AwsUnavailable, LinkNotConfigured, LinkRefused
from service.accounts import LinkOutcome
from service.backups import Backups, NoBackup
from service.database import (
    BadDatabaseUrl,
    DatabaseUnavailable,
    open_application,
    view_database,
)
from service.demo import demo_total_findings, run_demo
from service.logs import LEVELS, configure_logging
from service.queue_consumer import NoDeadLetterQueue, QueueConsumer
from service.queue_sender import QueueSender, QueueUnavailable
from service.runtime import Runtime
from service.scheduler import JOBS, JobRunner, job_status, start_scheduler
from service.settings import Settings
from service.tokens import parse_scopes

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
LOG_LEVEL = click.option(
    "--log-level",
    type=click.Choice(LEVELS),
    default="info",
    show_default=True,
    help="Log level (AWS libraries stay at warning: they would print credentials).",
)


class _OneLineErrors(click.Group):
    """Turns the service's own refusals into ``Error: <reason>`` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (
            DomainError,
            DatabaseUnavailable,
            BadDatabaseUrl,
            MasterKeyError,
            StoreError,
            FormatError,
            BackupFailed,
            BackupUnreadable,
            RestoreRefused,
            NoBackup,
            LinkRefused,
            LinkNotConfigured,
            AwsUnavailable,
            NoDeadLetterQueue,
            QueueUnavailable,
            messages.MessageRefused,
        ) as error:
            raise click.ClickException(
                str(error).splitlines()[0] if str(error) else repr(error)
            ) from None


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
    console = Console(stderr=True)
    with (
        Runtime.open(settings) as runtime,
        Progress(
            TextColumn("recording findings"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=as_json or not console.is_terminal,
        ) as progress,
    ):
        task = progress.add_task("findings", total=demo_total_findings())
        report = run_demo(runtime, lambda n: progress.advance(task, n))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    out = Console(width=None if sys.stdout.isatty() else 120)
    out.print(f"[bold]resultsvc demo[/] on {settings.database_url}")
    out.print(f"team      {report.team_name}  id={report.team_id}")
    out.print(f"account   {report.role_arn}  id={report.account_id}")
    for note in report.notes:
        out.print(f"note      {note}")
    table = Table(title="plan runs, as the display views show them")
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
    out.print(f"events in the log after the runs: {report.events}")
    for backup in report.backups:
        out.print(
            f"backup    {backup['id']} ({backup['kind']}, positions"
            f" {backup['positions'][0]}..{backup['positions'][1]}, {backup['events']} events)"
            f" holds plans: {', '.join(backup['plans']) or 'none'};"
            f" verified: {'OK' if backup['verified'] else 'FAILED'}"
        )
        if backup["unrecoverable_by_design"]:
            out.print(
                f"          unrecoverable by design (key shredded):"
                f" {', '.join(backup['unrecoverable_by_design'])}"
            )
        if backup["excluded_plans"]:
            out.print(f"          left out (excluded): {', '.join(backup['excluded_plans'])}")
    if report.exclusion:
        out.print(
            f"exclusion {report.exclusion['plan']} (ticket {report.exclusion['ticket']}):"
            f" key shredded, {report.exclusion['key_copies_destroyed']} copies destroyed"
        )
    if report.drill is not None:
        print_drill(out, report.drill)


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


@cli.group()
def accounts() -> None:
    """Customers' AWS accounts: link by role, or with access keys used once and forgotten."""


def _print_link(outcome: LinkOutcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.as_dict(), default=str))
        return
    state = "verified" if outcome.verified else "NOT verified"
    click.echo(
        f"account {outcome.id} aws={outcome.aws_account_id} {outcome.role_arn}"
        f" method={outcome.method} ({state})"
    )
    if outcome.notice:
        click.echo(outcome.notice)


@accounts.command("link-role")
@click.argument("team_id", type=click.UUID)
@click.argument("role_arn")
@click.option("--json", "as_json", is_flag=True, help="Print the link as JSON.")
def accounts_link_role(team_id: UUID, role_arn: str, as_json: bool) -> None:
    """Link the role ROLE_ARN, which the customer made, to team TEAM_ID.

    The role must trust RESULTSVC_AWS_PRINCIPAL_ARN with the condition
    sts:ExternalId = the team's External ID (`teams create` prints it). The
    service assumes it once to check; without a principal configured the link
    is recorded unverified and the command says so.
    """
    with _runtime() as runtime:
        _print_link(runtime.accounts.link_role(team_id, role_arn, actor="cli"), as_json)


@accounts.command("link-keys")
@click.argument("team_id", type=click.UUID)
@click.option(
    "--profile",
    type=click.Choice(["full", "audit"]),
    default="full",
    show_default=True,
    help="full: allow * except iam:CreateUser; audit: the AWS managed SecurityAudit policy.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the link as JSON.")
def accounts_link_keys(team_id: UUID, profile: str, as_json: bool) -> None:
    """Create the team's role in a customer's account with their access keys, then forget them.

    The key pair is asked for on the terminal (hidden) or read from stdin,
    two lines: access key id, then secret. Never pass keys as arguments:
    they would show in the process list and the shell history.
    """
    if sys.stdin.isatty():
        key_id = click.prompt("Access key id", hide_input=True)
        secret = click.prompt("Secret access key", hide_input=True)
    else:
        key_id, secret = (sys.stdin.readline().strip() for _ in range(2))
    keys = AccessKeys(key_id, secret)
    del key_id, secret
    with _runtime() as runtime:
        _print_link(runtime.accounts.link_with_keys(team_id, keys, profile, actor="cli"), as_json)


@accounts.command("list")
@click.argument("team_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print the accounts as JSON lines.")
def accounts_list(team_id: UUID, as_json: bool) -> None:
    """List team TEAM_ID's accounts with their access state (ok, lost, unverified)."""
    with _runtime() as runtime:
        runtime.projector.catch_up()
        cursor: str | None = None
        while True:
            page = runtime.queries.list_accounts(None, str(team_id), cursor, 500)
            for item in page.items:
                if as_json:
                    click.echo(json.dumps(item))
                else:
                    linked = "linked" if item["linked"] else "unlinked"
                    reason = f" ({item['access_reason']})" if item["access_reason"] else ""
                    click.echo(
                        f"{item['id']} aws={item['aws_account_id']} {item['method']}"
                        f" {linked} access={item['access']}{reason}"
                    )
            cursor = page.next_cursor
            if cursor is None:
                return


@accounts.command("unlink")
@click.argument("account_id", type=click.UUID)
def accounts_unlink(account_id: UUID) -> None:
    """Unlink ACCOUNT_ID: recorded; new runs against it are refused from now on."""
    with _runtime() as runtime:
        team = runtime.app.team_of_account(account_id)
        done = runtime.app.unlink_account(team, account_id, actor="cli")
        click.echo(f"account {account_id} unlinked (position {done.position})")


@accounts.command("check")
def accounts_check() -> None:
    """Assume every linked role now, as the daily job does; record losses and recoveries.

    Exits non-zero when an account lost access or AWS could not be asked.
    """
    with _runtime() as runtime:
        runtime.projector.catch_up()
        report = runtime.accounts.check_all(actor="cli")
        click.echo(str(report))
        if report.lost or report.unchecked:
            raise click.ClickException(
                f"access lost: {', '.join(report.lost) or 'none'};"
                f" not checked: {', '.join(report.unchecked) or 'none'}"
            )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--no-projector",
    is_flag=True,
    help="Serve the API alone (run `resultsvc projections run` elsewhere).",
)
@click.option("--no-scheduler", is_flag=True, help="Do not run the scheduled jobs in this process.")
@click.option(
    "--consume",
    "consume_url",
    metavar="QUEUE_URL",
    help="Also apply messages from this SQS queue (see `resultsvc consume`).",
)
@click.option(
    "--dead-letter-queue",
    "dead_letter_url",
    metavar="URL",
    help="With --consume: where refused messages go (default: the redrive policy's).",
)
@LOG_LEVEL
def serve(
    host: str,
    port: int,
    no_projector: bool,
    no_scheduler: bool,
    consume_url: str | None,
    dead_letter_url: str | None,
    log_level: str,
) -> None:
    """Run the HTTP API (OpenAPI at /openapi.json) with the projector and the scheduler.

    Requests are not logged one by one (no access log, never a body); errors
    and job outcomes are.
    """
    configure_logging(log_level)
    from service.server import serve as run_server  # the web stack loads only for serve

    run_server(
        _settings(),
        host,
        port,
        projector=not no_projector,
        scheduler=not no_scheduler,
        log_level=log_level,
        consume=consume_url,
        dead_letter_queue=dead_letter_url,
    )


@cli.command()
@click.option(
    "--run-now",
    "run_now",
    type=click.Choice([spec.name for spec in JOBS]),
    help="Run this job once (for its current slot) and exit.",
)
@LOG_LEVEL
def scheduler(run_now: str | None, log_level: str) -> None:
    """Run the scheduled jobs alone, without the API (until SIGTERM).

    Backups daily (full once the chain's full is a week old), retention sweep,
    display retention, pending key shredding, the daily check of every linked
    account's role. Several replicas may run this: each job runs once per slot.
    """
    configure_logging(log_level)
    with _runtime() as runtime:
        if run_now is not None:
            spec = next(spec for spec in JOBS if spec.name == run_now)
            outcome = JobRunner(runtime).run(spec)
            click.echo(f"{run_now}: {outcome}")
            if outcome == "failed":
                error = next(j for j in job_status(runtime.views) if j["job"] == run_now)
                raise click.ClickException(f"{run_now} failed: {error['last_error']}")
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        jobs = start_scheduler(runtime)
        try:
            stop.wait()
        finally:
            jobs.shutdown(wait=True)


# ------------------------------------------------------------------------- queue


@cli.command()
@click.option("--queue", "queue_url", required=True, help="SQS queue URL to consume.")
@click.option(
    "--dead-letter-queue",
    "dead_letter_url",
    help="Where refused messages go; default: the queue's redrive policy target.",
)
@click.option("--until-empty", is_flag=True, help="Stop once a poll finds the queue empty.")
@click.option(
    "--wait-seconds",
    default=10,
    show_default=True,
    type=click.IntRange(0, 20),
    help="Long-poll time; also the longest SIGTERM waits on an empty queue.",
)
@click.option(
    "--visibility-seconds",
    default=60,
    show_default=True,
    type=click.IntRange(5, 43200),
    help="Lease on a received message, renewed while it is applied; after a crash the"
    " messages in hand come back after this.",
)
@LOG_LEVEL
def consume(
    queue_url: str,
    dead_letter_url: str | None,
    until_empty: bool,
    wait_seconds: int,
    visibility_seconds: int,
    log_level: str,
) -> None:
    """Apply plan-run messages from an SQS queue (docs/queue-ingest.md) until SIGTERM.

    Each message is deleted only after its events are committed; a message
    delivered twice appends once (its idempotency key is recorded with its
    events); refused messages go to the dead-letter queue with their reason;
    messages that failed for a passing reason (database down) come back.
    SIGTERM finishes the message in hand and stops.
    """
    configure_logging(log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with _runtime() as runtime:
        consumer = QueueConsumer(
            runtime,
            queue_url,
            dead_letter_url,
            wait_seconds=wait_seconds,
            visibility_seconds=visibility_seconds,
        )
        report = consumer.run(stop, until_empty=until_empty)
    click.echo(str(report))


@cli.command("send-results")
@click.option("--queue", "queue_url", required=True, help="SQS queue URL to send to.")
@click.option("--team", "team_id", required=True, type=click.UUID, help="The run's team.")
@click.option("--run", "run_id", required=True, type=click.UUID, help="The run's id.")
@click.option(
    "--token-file",
    required=True,
    envvar="RESULTSVC_TOKEN_FILE",
    type=click.File("r"),
    help="File holding the team's ingest token (never pass tokens as arguments).",
)
@click.option(
    "--start-plan",
    type=click.UUID,
    help="First send a start_run of this plan, with --run as the new run's id.",
)
@click.option(
    "--complete",
    type=click.Choice(["succeeded", "failed"]),
    help="After the results, send a complete_run with this status.",
)
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 1000))
@click.argument("findings_file", type=click.File("rb"))
def send_results(
    queue_url: str,
    team_id: UUID,
    run_id: UUID,
    token_file: Any,
    start_plan: UUID | None,
    complete: str | None,
    batch_size: int,
    findings_file: Any,
) -> None:
    """Put the findings of FINDINGS_FILE (JSON lines) on a queue as a plan run's messages.

    Every line is read and checked as JSON before anything is sent. Batches
    are split to fit SQS's 256 KiB; idempotency keys derive from the run and
    the file's digest, so sending the same file again appends nothing twice.
    """
    if (start_plan or complete) and not queue_url.endswith(".fifo"):
        raise click.ClickException(
            "--start-plan and --complete need a FIFO queue: a standard queue does not keep"
            " order (start and complete the run over HTTP, or send to a .fifo queue)"
        )
    raw = findings_file.read()
    findings = _json_lines(raw)
    token = token_file.read().strip()
    prefix = f"{run_id}/{hashlib.sha256(raw).hexdigest()[:16]}"
    bodies: list[str] = []
    if start_plan is not None:
        bodies.append(messages.start_run(team_id, start_plan, run_id, f"{run_id}/start"))
    bodies.extend(messages.record_results(team_id, run_id, findings, prefix, batch_size))
    if complete is not None:
        bodies.append(messages.complete_run(team_id, run_id, f"{run_id}/complete", complete))
    sender = QueueSender(queue_url, token, group=str(run_id))
    with _progress("sending messages", len(bodies)) as advance:
        for number, body in enumerate(bodies, 1):
            sender.send(body)
            advance(number)
    click.echo(f"sent {len(bodies)} messages ({len(findings)} findings) for run {run_id}")


def _json_lines(raw: bytes) -> list[Any]:
    findings: list[Any] = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            findings.append(json.loads(line))
        except ValueError:
            raise click.ClickException(f"line {number}: not valid JSON; nothing sent") from None
    if not findings:
        raise click.ClickException("the file holds no findings; nothing sent")
    return findings


# ------------------------------------------------------------------------ tokens


@cli.group()
def tokens() -> None:
    """API tokens: printed once at creation; only a hash is stored."""


@tokens.command("create")
@click.option("--team", "team_id", help="The team the token acts for (not with ops).")
@click.option(
    "--scope",
    "scope",
    required=True,
    help="Comma-separated: ingest, read, compliance; or ops alone (no team).",
)
def tokens_create(team_id: str | None, scope: str) -> None:
    """Create a token and print it once. Keep it secret: it cannot be shown again."""
    with _runtime() as runtime:
        team = str(_uuid(team_id, "--team")) if team_id else None
        scopes = parse_scopes(scope, team)
        if team is not None:
            runtime.queries.get_team(None, team)  # refuses unknown teams
        token = runtime.tokens.create(team, scopes)
    click.echo(token)


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Refuse the token TOKEN_ID (the part after rsvc_, before the next _) from now on."""
    with _runtime() as runtime:
        if not runtime.tokens.revoke(token_id):
            raise click.ClickException(f"no token {token_id!r}")
    click.echo(f"token {token_id} revoked")


# ----------------------------------------------------------------------- backups


@cli.group()
def backup() -> None:
    """Encrypted backups of the event log: take, list, verify."""


@backup.command("run")
@click.option("--full", "full", flag_value=True, default=None, help="Force a full backup.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def backup_run(full: bool | None, as_json: bool) -> None:
    """Take a backup: incremental after the last one, or full (weekly, or with --full).

    The manifest is written last: a backup that fails half-way is never listed.
    """
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        head = runtime.app.head_position()
        with _progress("backing up", head) as advance:
            result = backups.writer.run(full=full, progress=advance)
    done = result.info
    record = {
        "id": done.id,
        "kind": done.kind,
        "parent": done.parent,
        "first_position": done.first_position,
        "last_position": done.last_position,
        "events": done.events,
        "skipped_excluded": result.skipped_excluded,
        "bytes_stored": done.bytes_stored,
        "expires_at": done.expires_at.isoformat(),
        "duration_seconds": round(result.duration_seconds, 3),
    }
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(
        f"backup {done.id} ({done.kind}): positions {done.first_position}..{done.last_position},"
        f" {done.events} events, {result.skipped_excluded} of excluded plans left out,"
        f" {done.bytes_stored} bytes, expires {done.expires_at:%Y-%m-%d}"
    )


@backup.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def backup_list(as_json: bool) -> None:
    """List complete backups with their chain and expiry, and the scheduler's last runs."""
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        found = backups.catalog.all()
        damaged = dict(backups.catalog.damaged)
        jobs = job_status(runtime.views)
    rows: list[dict[str, Any]] = [
        {
            "id": b.id,
            "kind": b.kind,
            "parent": b.parent,
            "positions": [b.first_position, b.last_position],
            "events": b.events,
            "bytes_stored": b.bytes_stored,
            "created_at": b.created_at.isoformat(),
            "expires_at": b.expires_at.isoformat(),
            "excluded_plans": len(b.excluded_plans),
        }
        for b in found
    ]
    if as_json:
        click.echo(json.dumps({"backups": rows, "jobs": jobs, "damaged": damaged}, indent=2))
        _fail_if_damaged(damaged)
        return
    table = Table(title="backups")
    for column in ("id", "kind", "positions", "events", "bytes", "expires", "excluded plans"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"],
            row["kind"],
            f"{row['positions'][0]}..{row['positions'][1]}",
            str(row["events"]),
            str(row["bytes_stored"]),
            row["expires_at"][:10],
            str(row["excluded_plans"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for job in jobs:
        console.print(
            f"job {job['job']}: last success {job['last_success'] or '-'},"
            f" last failure {job['last_failure'] or '-'} {job['last_error'] or ''}"
        )
    _fail_if_damaged(damaged)


def _fail_if_damaged(damaged: dict[str, str]) -> None:
    """A backup whose manifest cannot be read is listed nowhere else: say so, exit non-zero."""
    if damaged:
        backup_id, reason = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise click.ClickException(f"backup {backup_id} is damaged: {reason}{more}")


@backup.command("verify")
@click.argument("backup_id")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def backup_verify(backup_id: str, as_json: bool) -> None:
    """Check every object of a backup: checksums, GCM tags, manifest, chain.

    Plans excluded on request are reported as unrecoverable by design, not as failures.
    """
    with _runtime() as runtime:
        report = Backups.open(runtime).reader.verify(backup_id)
    record = {
        "backup": backup_id,
        "ok": report.ok,
        "chain": report.chain,
        "objects": report.objects,
        "bytes": report.bytes,
        "blobs": report.blobs,
        "records": report.records,
        "unrecoverable_by_design": sorted(report.unrecoverable_plans),
        "problems": report.problems,
    }
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        state = "OK" if report.ok else "FAILED"
        click.echo(
            f"backup {backup_id}: {state}; {report.objects} objects, {report.bytes} bytes,"
            f" {report.blobs} blobs, {report.records} records;"
            f" {len(report.unrecoverable_plans)} plan(s) unrecoverable by design"
        )
    if not report.ok:
        raise click.ClickException(report.problems[0])


@cli.command()
@click.option("--backup", "backup_id", required=True, help="The backup to restore (its chain).")
@click.option(
    "--until-position",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this log position (point in time, to the event).",
)
@click.option("--into", "into", required=True, help="DATABASE_URL of an EMPTY database.")
def restore(backup_id: str, until_position: int | None, into: str) -> None:
    """Load a backup chain into an empty database and rebuild its display views.

    Needs the master key, the keyring and the backup objects (the configured
    RESULTSVC_MASTER_KEY and RESULTSVC_BACKUP_URL). Plans excluded from
    backups cannot be restored, by design.
    """
    target = open_application(into)
    try:
        with _runtime() as runtime:
            backups = Backups.open(runtime)
            with _progress("restoring", until_position or 0) as advance:
                result = restore_chain(
                    backups.reader,
                    backup_id,
                    target,
                    until_position=until_position,
                    progress=advance,
                )
        projector = Projector(target, view_database(into))
        try:
            projector.ensure_schema()
            projector.catch_up()
        finally:
            projector.close()
    finally:
        target.close()
    click.echo(
        f"restored {result.events} events of {len(result.chain)} backup(s) up to position"
        f" {result.last_position}; views rebuilt;"
        f" {len(result.unrecoverable_plans)} plan(s) unrecoverable by design"
    )


@cli.command("restore-drill")
@click.option("--backup", "backup_id", default=None, help="Drill this backup.")
@click.option("--latest", "pick", flag_value="latest", default=True, help="The latest (default).")
@click.option("--random", "pick", flag_value="random", help="A backup chosen at random.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def restore_drill(backup_id: str | None, pick: str, as_json: bool) -> None:
    """Prove a backup restores: verify, load into a scratch store, rebuild views, compare.

    Exit 0 only when the drill passed. The drill is recorded as an event; the
    scratch store is always removed.
    """
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        report, _ = backups.drill(backups.choose(backup_id, pick=pick))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        print_drill(Console(width=None if sys.stdout.isatty() else 120), report)
    if not report.passed:
        raise click.ClickException(f"drill of {report.backup_id} FAILED: {report.reason}")


def print_drill(out: Console, report: DrillReport) -> None:
    """The drill report as an operator reads it."""
    verdict = "PASSED" if report.passed else f"FAILED: {report.reason}"
    out.print(f"restore drill of {report.backup_id}: {verdict}")
    out.print(f"  chain              {' -> '.join(report.chain)}")
    out.print(f"  backup age (RPO)   {report.rpo_seconds:.0f} s")
    out.print(
        f"  verified           {report.objects_verified} objects, {report.bytes_verified} bytes"
    )
    out.print(
        f"  restored           {report.events_restored} events up to position"
        f" {report.last_position}, {report.views_rebuilt} views rebuilt ({report.scratch})"
    )
    out.print(
        f"  compared           {report.aggregates_compared} aggregates,"
        f" {len(report.mismatches)} mismatch(es)"
    )
    for plan in report.excluded_absent:
        out.print(f"  excluded plan      {plan}: absent from the backup")
    for plan in report.unrecoverable_by_design:
        out.print(f"  excluded plan      {plan}: in the backup, unrecoverable by design")
    steps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report.steps.items())
    out.print(f"  steps              {steps}")
    out.print(f"  total (RTO)        {report.rto_seconds:.2f} s")


# -------------------------------------------------------------------- exclusions


@cli.group()
def exclusions() -> None:
    """Keep plans out of backups (compliance): request and list."""


@exclusions.command("request")
@click.argument("plan_id")
@click.option("--reason", required=True, help="Why (recorded).")
@click.option("--ticket", default=None, help="The compliance ticket reference (recorded).")
@click.option("--actor", default="cli", show_default=True, help="Who (recorded).")
def exclusions_request(plan_id: str, reason: str, ticket: str | None, actor: str) -> None:
    """Exclude PLAN_ID from backups: new backups leave it out, and its key is shredded.

    Backups taken before can no longer decrypt that plan; the rest of them
    still verifies and restores. This cannot be undone.
    """
    plan = _uuid(plan_id, "PLAN_ID")
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        team = runtime.app.team_of_plan(plan)
        done = exclude_plan(
            runtime.app, backups.keyring, team, plan, reason=reason, ticket=ticket, actor=actor
        )
        runtime.projector.catch_up()
    click.echo(
        f"plan {plan} excluded from backups (position {done.requested_at_position});"
        f" key shredded, {done.copies_destroyed} cop(ies) destroyed"
        f" (position {done.shredded_at_position})"
    )


@exclusions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def exclusions_list(as_json: bool) -> None:
    """List the plans excluded from backups: who asked, when, why, which ticket."""
    with _runtime() as runtime:
        runtime.projector.catch_up()
        items = []
        cursor = None
        while True:
            page = runtime.queries.list_exclusions(None, cursor, 1000)
            items.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    for item in items:
        click.echo(
            f"{item['plan_id']} team={item['team_id']} at={item['requested_at']}"
            f" by={item['requested_by']} ticket={item['ticket'] or '-'} reason={item['reason']}"
        )
    if not items:
        click.echo("no plan is excluded from backups")


# --------------------------------------------------------------------- retention


@cli.group()
def retention() -> None:
    """Backup retention: delete what is older than RESULTSVC_BACKUP_RETENTION."""


@retention.command("sweep")
@click.option("--dry-run", is_flag=True, help="Say what would go, delete nothing.")
def retention_sweep(dry_run: bool) -> None:
    """Delete expired backups (a chain goes as a whole once its full expires)."""
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        report = sweep(runtime.app, backups.store, datetime.now(UTC), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    listed = f": {', '.join(report.expired)}" if report.expired else ""
    click.echo(
        f"{verb} {len(report.expired)} backup(s){listed}; kept {len(report.kept)};"
        f" removed {len(report.orphans_removed)} incomplete folder(s)"
    )
    if report.problems:
        raise click.ClickException(report.problems[0])


# -------------------------------------------------------------------------- keys


@cli.group()
def keys() -> None:
    """The master key that wraps backup and plan keys."""


@keys.command("rotate")
def keys_rotate() -> None:
    """Start a new master key version: new backups use it, old ones stay readable.

    Plan keys in the keyring are re-wrapped under the new version.
    """
    with _runtime() as runtime:
        backups = Backups.open(runtime)
        ref = backups.master.rotate()
        rewrapped = backups.keyring.rewrap(backups.master)
    click.echo(f"master key rotated: new version {ref}; {rewrapped} plan key(s) re-wrapped")


def _runtime() -> Runtime:
    return Runtime.open(_settings())


# ------------------------------------------------------------------ projections


@cli.group()
def projections() -> None:
    """Display views: run the projector, see where each view stands, rebuild them."""


@projections.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def projections_status(as_json: bool) -> None:
    """Show, per view: position, head of the log, lag, state and last error."""
    with _runtime() as runtime:
        statuses = runtime.projector.status()
    if as_json:
        rows = [{**status.__dict__, "lag": status.lag} for status in statuses]
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="display views")
    for column in ("view", "position", "head", "lag", "state", "last error"):
        table.add_column(column)
    for status in statuses:
        table.add_row(
            status.view,
            str(status.position),
            str(status.head),
            str(status.lag),
            status.state,
            status.last_error or "",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@projections.command("run")
@click.option("--once", is_flag=True, help="Catch up with the log, then exit.")
def projections_run(once: bool) -> None:
    """Run the projector alone (``serve`` runs one too), until SIGTERM or Ctrl-C."""
    with _runtime() as runtime:
        if once:
            count = runtime.projector.catch_up()
            click.echo(f"projected {count} notifications")
            _exit_if_failed(runtime)
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        runtime.projector.run(stop)


@projections.command("rebuild")
@click.option(
    "--view",
    "names",
    multiple=True,
    type=click.Choice([view.name for view in ALL_VIEWS]),
    help="Rebuild only this view (repeatable); default: all.",
)
def projections_rebuild(names: tuple[str, ...]) -> None:
    """Build fresh view tables from the whole log and swap them in atomically.

    The old tables stay readable until the swap. Also clears a failed state.
    """
    with _runtime() as runtime:
        for view in runtime.projector.views:
            if names and view.name not in names:
                continue
            head = runtime.app.head_position()
            with _progress(f"rebuilding {view.name}", head) as advance:
                position = runtime.projector.rebuild(view, progress=advance)
            click.echo(f"{view.name}: rebuilt up to position {position}")


@projections.command("retry")
def projections_retry() -> None:
    """Put failed views back to running: they retry the event that stopped them."""
    with _runtime() as runtime:
        names = runtime.projector.restart_failed()
        runtime.projector.catch_up()
        click.echo(f"retried: {', '.join(names) if names else 'no failed view'}")
        _exit_if_failed(runtime)


def _exit_if_failed(runtime: Runtime) -> None:
    failed = [s for s in runtime.projector.status() if s.state == "failed"]
    if failed:
        first = failed[0]
        raise click.ClickException(f"view {first.view} stopped: {first.last_error}")


# ---------------------------------------------------------------------- display


@cli.group()
def display() -> None:
    """Display data (what the web UI shows): purge it. Backups are never touched."""


@display.command("purge")
@click.option("--older-than", "older_than", help="Runs started longer ago than this (e.g. 30d).")
@click.option("--plan", "plan_id", help="Every run of this plan.")
@click.option("--team", "team_id", help="Every run of this team (or, with --older-than, scope).")
@click.option("--reason", default="operator request", show_default=True, help="Why; recorded.")
@click.option("--actor", default="cli", show_default=True, help="Who; recorded.")
def display_purge(
    older_than: str | None, plan_id: str | None, team_id: str | None, reason: str, actor: str
) -> None:
    """Purge results from display: --older-than 30d, --plan ID or --team ID.

    The purge is recorded as an event, so a rebuild or a restore never shows
    the purged results again. Backups keep what they hold.
    """
    chosen = [name for name, value in (("--older-than", older_than), ("--plan", plan_id)) if value]
    if len(chosen) > 1 or (not chosen and team_id is None):
        raise click.UsageError("give exactly one of --older-than, --plan or --team")
    with _runtime() as runtime:
        if older_than is not None:
            age = parse_duration(older_than, "--older-than")
            team = str(_uuid(team_id, "--team")) if team_id else None
            positions = purge_older_than(
                runtime.app, runtime.queries, age, actor=actor, reason=reason, team=team
            )
        elif plan_id is not None:
            plan = _uuid(plan_id, "--plan")
            owner = runtime.queries.plan_owner(str(plan))
            appended = runtime.app.purge_display(
                UUID(owner), plan_id=plan, actor=actor, reason=reason
            )
            positions = [appended.position]
        else:
            team_uuid = _uuid(team_id, "--team")
            appended = runtime.app.purge_display(team_uuid, actor=actor, reason=reason)
            positions = [appended.position]
        runtime.projector.catch_up()
        _exit_if_failed(runtime)
    if not positions:
        click.echo("nothing to purge")
    else:
        click.echo(f"purged: {len(positions)} purge event(s), last at position {positions[-1]}")


def _uuid(value: str | None, option: str) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an id", param_hint=option) from None


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr), nothing otherwise."""
    console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda position: progress.update(task, completed=position)


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="resultsvc"))
