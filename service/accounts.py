"""Linking and checking customers' AWS accounts: the use cases behind the API, CLI and job.

The domain records what happened (linked, how, by whom, access lost or
restored); ``service.account_link`` talks to AWS. This module puts the two
together in the order that keeps the promises: nothing is recorded for a role
that could not be checked, and a link made with access keys records the role
it made, never the keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.application import ResultsApp
from domain.arn import parse_role_arn
from domain.errors import Conflict, NotFound
from projections.queries import DisplayQueries
from service.account_link import (
    AccessKeys,
    AwsAccountLinker,
    AwsUnavailable,
    LinkRefused,
)

log = logging.getLogger("resultsvc.accounts")

KEYS_NOTICE = (
    "Deactivate and delete the access key pair now (IAM console: Users, Security credentials):"
    " the role is in place, the service did not keep the keys and will never use them again."
)
UNVERIFIED_NOTICE = (
    "Role verification is off (RESULTSVC_AWS_PRINCIPAL_ARN is not set): the link is recorded"
    " unverified; the daily check verifies it once a principal is configured."
)


@dataclass(frozen=True)
class LinkOutcome:
    """What the caller is told after a link."""

    id: UUID
    team_id: UUID
    aws_account_id: str
    role_arn: str
    method: str
    profile: str | None
    verified: bool
    notice: str | None
    position: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AccessCheckReport:
    """One run of the daily role check; ``unchecked`` accounts could not be asked (AWS down)."""

    checked: int = 0
    ok: int = 0
    lost: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    skipped: str | None = None

    def __str__(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return (
            f"{self.checked} checked, {self.ok} ok, {len(self.lost)} newly lost,"
            f" {len(self.restored)} restored, {len(self.unchecked)} not checked"
        )


class AccountLinks:
    """Link accounts by role or by handed-over keys; check every linked role."""

    def __init__(self, app: ResultsApp, queries: DisplayQueries, aws: AwsAccountLinker) -> None:
        self.app = app
        self.queries = queries
        self.aws = aws

    def link_role(self, team_id: UUID, role_arn: str, *, actor: str) -> LinkOutcome:
        """Record a link to a role the customer made, once AWS lets us assume it."""
        team = self.app.get_team(team_id)
        arn = parse_role_arn(role_arn)
        verified = False
        if self.aws.enabled:
            self.aws.assume(arn.arn, team.external_id, f"resultsvc-verify-{team_id}")
            verified = True
        account, position = self.app.link_account_role(
            team_id, arn.arn, verified=verified, actor=actor, method="role"
        )
        return self._outcome(account, position, None if verified else UNVERIFIED_NOTICE)

    def link_with_keys(
        self, team_id: UUID, keys: AccessKeys, profile: str, *, actor: str
    ) -> LinkOutcome:
        """Make the role with the customer's keys, verify it, record it; the keys are dropped."""
        team = self.app.get_team(team_id)
        role_arn = self.aws.create_role(keys, profile, team_id, team.external_id)
        account, position = self.app.link_account_role(
            team_id, role_arn, verified=True, actor=actor, method="access_keys", profile=profile
        )
        return self._outcome(account, position, KEYS_NOTICE)

    def check_all(self, *, actor: str = "scheduler") -> AccessCheckReport:
        """Assume every linked role; record losses and recoveries (changes only).

        An account that AWS could not be asked about is left as it was and
        listed as unchecked: an STS outage must not mark every customer lost.
        """
        report = AccessCheckReport()
        if not self.aws.enabled:
            report.skipped = "RESULTSVC_AWS_PRINCIPAL_ARN is not set"
            return report
        external_ids: dict[str, str] = {}
        for team, account, role_arn in self.queries.linked_accounts():
            if team not in external_ids:
                external_ids[team] = self.app.get_team(UUID(team)).external_id
            report.checked += 1
            try:
                self.aws.assume(role_arn, external_ids[team], f"resultsvc-check-{account}")
                ok, reason = True, ""
            except LinkRefused as refused:
                ok, reason = False, refused.rule
            except AwsUnavailable as error:
                log.warning("account %s not checked: %s", account, error)
                report.unchecked.append(account)
                continue
            try:
                changed = self.app.record_account_access(
                    UUID(team), UUID(account), ok=ok, reason=reason, actor=actor
                )
            except (NotFound, Conflict):
                continue  # unlinked while it was being checked
            if ok:
                report.ok += 1
            if changed is not None and ok:
                report.restored.append(account)
                log.info("account %s: access restored", account)
            elif changed is not None:
                report.lost.append(account)
                log.warning("account %s: access lost: %s", account, reason)
        return report

    def _outcome(self, account: Any, position: int, notice: str | None) -> LinkOutcome:
        return LinkOutcome(
            id=account.id,
            team_id=account.team_id,
            aws_account_id=account.aws_account_id,
            role_arn=account.role_arn,
            method=account.method,
            profile=account.profile,
            verified=account.verified,
            notice=notice,
            position=position,
        )
