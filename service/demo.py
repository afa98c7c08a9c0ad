"""``resultsvc demo``: the main job on the embedded default, start to end.

It is both a showcase and a smoke test an operator can run on a fresh host:
everything it does goes through the same application commands the API uses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from domain.application import ResultsApp
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
        }


# (plan name, findings per run, run outcomes)
DEMO_PLANS: list[tuple[str, list[tuple[int, str]]]] = [
    ("weekly-cis-audit", [(1800, "succeeded"), (1500, "succeeded")]),
    ("prod-deploy-guardrails", [(1200, "succeeded"), (300, "failed")]),
]


def demo_total_findings() -> int:
    return sum(count for _, runs in DEMO_PLANS for count, _ in runs)


def run_demo(app: ResultsApp, progress: Progress | None = None) -> DemoReport:
    """Record a team, an unverified role link, two plans and four runs with findings."""
    report = DemoReport()
    team, _ = app.create_team("Acme Security (demo)")
    report.team_id, report.team_name = str(team.id), team.name
    account, _ = app.link_account_role(team.id, DEMO_ROLE_ARN, verified=False, actor="demo")
    report.account_id, report.role_arn = str(account.id), account.role_arn
    report.notes.append(
        "role link recorded unverified: the demo does not call AWS "
        "(set RESULTSVC_AWS_PRINCIPAL_ARN and use `resultsvc accounts link-role` for real links)"
    )
    seed = 1
    for plan_name, runs in DEMO_PLANS:
        plan, _ = app.create_plan(team.id, account.id, plan_name)
        report.plans[plan_name] = str(plan.id)
        for count, outcome in runs:
            run, _ = app.start_run(team.id, plan.id)
            severity: Counter[str] = Counter()
            status: Counter[str] = Counter()
            for batch in batches(count, BATCH_SIZE, aws_account_id="123456789012", seed=seed):
                app.record_results(team.id, run.id, batch)
                severity.update(f["severity"] for f in batch)
                status.update(f["status"] for f in batch)
                if progress is not None:
                    progress(len(batch))
            error = "scanner lost access to eu-central-1 mid-run" if outcome == "failed" else None
            app.complete_run(team.id, run.id, outcome, error)
            seed += 1
            report.runs.append(
                DemoRun(plan_name, str(run.id), outcome, count, dict(severity), dict(status))
            )
    report.events = app.head_position()
    return report
