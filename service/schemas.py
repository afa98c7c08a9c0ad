"""Request and response bodies of the HTTP API, as published in its OpenAPI document.

Requests refuse unknown fields (``extra="forbid"``). Findings are documented
here but checked by ``domain.findings`` (the one authority, shared with the
CLI and the queue consumer), so their limits are written from its constants.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from domain import findings as rules
from domain.application import MAX_ERROR, MAX_NAME, MAX_REASON, MAX_TICKET

T = TypeVar("T")
Severity = Literal["critical", "high", "medium", "low", "informational"]
Status = Literal["FAIL", "PASS", "ERROR", "SKIPPED"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------- requests


class TeamCreate(Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME)


class RoleLink(Strict):
    """Link through a role the customer made, trusting our principal with the team's External ID."""

    method: Literal["role"]
    role_arn: str = Field(
        min_length=1, max_length=2048, examples=["arn:aws:iam::123456789012:role/resultsvc"]
    )


class AccessKeysLink(Strict):
    """Link by handing over an access key pair once: the service creates the role, then forgets
    the keys. They are never stored, logged or echoed, not even in an error answer."""

    method: Literal["access_keys"]
    access_key_id: SecretStr = Field(min_length=16, max_length=128)
    secret_access_key: SecretStr = Field(min_length=16, max_length=128)
    profile: Literal["full", "audit"] = Field(
        default="full",
        description="full: allow * except iam:CreateUser; audit: the AWS managed SecurityAudit",
    )


AccountLink = Annotated[RoleLink | AccessKeysLink, Field(discriminator="method")]


class PlanCreate(Strict):
    team_id: UUID
    account_id: UUID
    name: str = Field(min_length=1, max_length=MAX_NAME)


class Finding(Strict):
    """One result of a plan run, as a scanner reports it."""

    rule_id: str = Field(min_length=1, max_length=rules.MAX_RULE_ID)
    title: str = Field(min_length=1, max_length=rules.MAX_TITLE)
    severity: Severity
    status: Status
    resource_arn: str = Field(min_length=1, max_length=rules.MAX_RESOURCE_ARN)
    region: str = Field(min_length=1, max_length=rules.MAX_REGION)
    message: str = Field(max_length=rules.MAX_MESSAGE)
    observed_at: str = Field(
        description="ISO-8601 date-time with a time zone, e.g. 2026-11-29T20:00:00Z",
        examples=["2026-11-29T20:00:00Z"],
    )
    details: dict[str, Any] | None = Field(
        default=None, description=f"Plain JSON object, at most {rules.MAX_DETAILS_BYTES} bytes"
    )


class ResultsBatch(Strict):
    results: list[Finding] = Field(min_length=1, max_length=rules.MAX_BATCH)


class RunComplete(Strict):
    status: Literal["succeeded", "failed"]
    error: str | None = Field(default=None, min_length=1, max_length=MAX_ERROR)


class ExclusionCreate(Strict):
    reason: str = Field(min_length=1, max_length=MAX_REASON)
    ticket: str | None = Field(default=None, min_length=1, max_length=MAX_TICKET)


class DisplayPurgeCreate(Strict):
    """Exactly one of ``plan_id``, ``team_id`` or ``older_than`` (which ``team_id`` may scope)."""

    plan_id: UUID | None = None
    team_id: UUID | None = None
    older_than: str | None = Field(default=None, examples=["30d"], max_length=16)
    reason: str = Field(default="API request", min_length=1, max_length=MAX_REASON)


# ---------------------------------------------------------------- responses


class Appended(BaseModel):
    position: int = Field(description="Log position reached; pass it as after= to read it")


class TeamOut(BaseModel):
    id: UUID
    name: str
    external_id: str


class TeamCreated(TeamOut, Appended):
    pass


class AccountOut(BaseModel):
    id: UUID
    team_id: UUID
    aws_account_id: str
    role_arn: str
    method: str
    verified: bool
    linked: bool
    linked_at: str
    unlinked_at: str | None
    linked_by: str
    profile: Literal["full", "audit"] | None
    access: Literal["ok", "lost", "unverified"] = Field(
        description="lost: the daily check could not assume the role (see access_reason)"
    )
    access_reason: str | None
    access_changed_at: str | None = Field(description="When access was last lost or restored")


class PlanOut(BaseModel):
    id: UUID
    team_id: UUID
    account_id: UUID
    name: str
    created_at: str
    backup_excluded: bool
    latest_run_id: UUID | None


class PlanCreated(Appended):
    id: UUID
    team_id: UUID
    account_id: UUID
    name: str


class Counts(BaseModel):
    by_severity: dict[str, int]
    by_status: dict[str, int]


class RunOut(BaseModel):
    id: UUID
    plan_id: UUID
    status: Literal["running", "succeeded", "failed"]
    started_at: str
    finished_at: str | None
    total: int
    counts: Counts
    error: str | None


class RunStarted(Appended):
    id: UUID
    plan_id: UUID
    status: Literal["running"]


class RunEnded(Appended):
    id: UUID
    status: Literal["succeeded", "failed"]


class ResultsAccepted(Appended):
    accepted: int
    batch: int


class ResultOut(BaseModel):
    rule_id: str
    title: str
    severity: str
    status: str
    resource_arn: str
    region: str
    message: str
    observed_at: str
    details: dict[str, Any] | None = None


class ExclusionOut(BaseModel):
    plan_id: UUID
    team_id: UUID
    reason: str
    ticket: str | None
    requested_by: str
    requested_at: str
    position: int


class ExclusionAccepted(Appended):
    plan_id: UUID
    copies_destroyed: int = Field(description="Copies of the plan's backup key destroyed")


class BackupCreate(Strict):
    full: bool = False


class BackupOut(BaseModel):
    id: str
    kind: Literal["full", "incremental"]
    parent: str | None
    first_position: int
    last_position: int
    events: int
    bytes_stored: int
    created_at: str
    expires_at: str
    excluded_plans: list[str]


class BackupTaken(BackupOut, Appended):
    pass


class PurgeAccepted(Appended):
    purges: int = Field(description="Purge events recorded (one per team concerned)")


class AccountLinked(Appended):
    id: UUID
    team_id: UUID
    aws_account_id: str
    role_arn: str
    method: Literal["role", "access_keys"]
    profile: Literal["full", "audit"] | None
    verified: bool = Field(description="false when the service has no AWS principal configured")
    notice: str | None = Field(
        description="What the caller must do now (deactivate handed-over keys; verification off)"
    )


class AccountUnlinked(Appended):
    id: UUID


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Cursor of the next page; null at the end")


class DrillCreate(Strict):
    backup_id: str | None = Field(
        default=None,
        pattern=r"^[0-9]{8}T[0-9]{6}([0-9]{6})?Z-[0-9a-f]{8}$",
        description="Default: the latest",
    )


class DrillOut(BaseModel):
    id: UUID
    backup_id: str
    passed: bool
    reason: str
    recorded_at: str
    position: int
    report: dict[str, Any]


class DrillRun(Appended):
    backup_id: str
    passed: bool
    reason: str
    report: dict[str, Any]
