"""``resultsvc demo``: the main job on the embedded default, start to end.

It is both a showcase and a smoke test an operator can run on a fresh host:
everything it does goes through the same application commands the API uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from retention.drill import DrillReport
from retention.exclusions import exclude_plan
from service.backups import Backups
from service.runtime import Runtime
from service.samples import batches

DEMO_ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/ResultsvcAudit"
BATCH_SIZE = 500

Progress = Callable[[int], None]


@dataclass
class DemoRun:
    plan: str
    run_id: str
    status: str
    total: int
    by_severity: dict[str, int]
    by_status: dict[str, int]


@dataclass
class DemoReport:
    """What the demo did, for printing as text or JSON."""

    team_id: str = ""
    team_name: str = ""
    account_id: str = ""
    role_arn: str = ""
    role_verified: bool = False
    plans: dict[str, str] = field(default_factory=dict)
    runs: list[DemoRun] = field(default_factory=list)
    events: int = 0
    notes: list[str] = field(default_factory=list)
    backups: list[dict[str, Any]] = field(default_factory=list)
    exclusion: dict[str, Any] = field(default_factory=dict)
    drill: DrillReport | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "team": {"id": self.team_id, "name": self.team_name},
            "account": {
                "id": self.account_id,
                "role_arn": self.role_arn,
                "verified": self.role_verified,
            },
            "plans": self.plans,
            "runs": [run.__dict__ for run in self.runs],
            "events": self.events,
            "notes": self.notes,
            "backups": self.backups,
            "exclusion": self.exclusion,
            "drill": None if self.drill is None else self.drill.as_dict(),
        }


# (plan name, findings per run, run outcomes)
DEMO_PLANS: list[tuple[str, list[tuple[int, str]]]] = [
    ("weekly-cis-audit", [(1800, "succeeded"), (1500, "succeeded")]),
    ("prod-deploy-guardrails", [(1200, "succeeded"), (300, "failed")]),
]


def demo_total_findings() -> int:
    return sum(count for _, runs in DEMO_PLANS for count, _ in runs)


def run_demo(runtime: Runtime, progress: Progress | None = None) -> DemoReport:
    """Record a team, an unverified role link, two plans and four runs with findings.

    The figures reported per run are read back from the display views after
    the projector caught up, so the demo shows the whole path: command, event,
    projection, query.
    """
    app = runtime.app
    report = DemoReport()
    team, _ = app.create_team("Acme Security (demo)")
    report.team_id, report.team_name = str(team.id), team.name
    account, _ = app.link_account_role(team.id, DEMO_ROLE_ARN, verified=False, actor="demo")
    report.account_id, report.role_arn = str(account.id), account.role_arn
    report.notes.append(
        "role link recorded unverified: the demo does not call AWS "
        "(with RESULTSVC_AWS_PRINCIPAL_ARN set, role links are verified by AssumeRole)"
    )
    seed = 1
    recorded: list[tuple[str, str]] = []
    for plan_name, runs in DEMO_PLANS:
        plan, _ = app.create_plan(team.id, account.id, plan_name)
        report.plans[plan_name] = str(plan.id)
        for count, outcome in runs:
            run, _ = app.start_run(team.id, plan.id)
            for batch in batches(count, BATCH_SIZE, aws_account_id="123456789012", seed=seed):
                app.record_results(team.id, run.id, batch)
                if progress is not None:
                    progress(len(batch))
            error = "scanner lost access to eu-central-1 mid-run" if outcome == "failed" else None
            app.complete_run(team.id, run.id, outcome, error)
            seed += 1
            recorded.append((plan_name, str(run.id)))
    report.events = app.head_position()
    runtime.projector.catch_up()
    runtime.queries.wait_for(report.events)
    for plan_name, run_id in recorded:
        view = runtime.queries.get_run(str(team.id), run_id)
        by_severity = {k: v for k, v in view["counts"]["by_severity"].items() if v}
        by_status = {k: v for k, v in view["counts"]["by_status"].items() if v}
        report.runs.append(
            DemoRun(plan_name, run_id, view["status"], view["total"], by_severity, by_status)
        )
    _backup_and_exclude(runtime, report, team.id)
    return report


EXCLUDED_PLAN = "prod-deploy-guardrails"


def _backup_and_exclude(runtime: Runtime, report: DemoReport, team_id: UUID) -> None:
    """A full backup, an exclusion request for one plan, an incremental backup.

    Then each backup is verified, which shows what it still contains: the
    first one holds the excluded plan, but its key is shredded, so that part
    is unrecoverable by design; the second one does not hold it at all.
    """
    backups = Backups.open(runtime)
    first = backups.writer.run(full=True)
    plan_id = UUID(report.plans[EXCLUDED_PLAN])
    done = exclude_plan(
        runtime.app,
        backups.keyring,
        team_id,
        plan_id,
        reason="customer asked that this plan's results leave backups",
        ticket="COMP-1234",
        actor="demo",
    )
    report.exclusion = {
        "plan": EXCLUDED_PLAN,
        "plan_id": str(plan_id),
        "ticket": "COMP-1234",
        "key_copies_destroyed": done.copies_destroyed,
    }
    second = backups.writer.run()
    names = {plan: name for name, plan in report.plans.items()}
    for result in (first, second):
        verified = backups.reader.verify(result.info.id)
        report.backups.append(
            {
                "id": result.info.id,
                "kind": result.info.kind,
                "positions": [result.info.first_position, result.info.last_position],
                "events": result.info.events,
                "plans": sorted(names.get(p, p) for p in result.info.manifest["plans"]),
                "excluded_plans": sorted(names.get(p, p) for p in result.info.excluded_plans),
                "verified": verified.ok,
                "unrecoverable_by_design": sorted(
                    names.get(p, p) for p in verified.unrecoverable_plans
                ),
                "location": runtime.settings.backup_url,
            }
        )
    report.drill, _ = backups.drill(second.info.id)
    runtime.projector.catch_up()
