"""The AWS side of linking a customer's account: STS to check a role, IAM to make one.

Two rules shape this module.

- Our own access to AWS is one principal (``RESULTSVC_AWS_PRINCIPAL_ARN``)
  whose credentials come from boto3's default chain. A customer's account is
  reached only by assuming the role the customer controls, with the team's
  External ID, so the customer can cut us off by editing one trust policy.
- Access keys a customer hands over live in one boto3 ``Session`` built here
  for one link and dropped after it. They never enter a message: every error
  is rebuilt from safe parts (the AWS error code and the IAM action) and
  raised ``from None``, so neither the text nor the chained traceback of a
  botocore exception reaches a log or an HTTP answer.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from service.logs import quiet_aws_loggers

ROLE_PREFIX = "resultsvc-"
FULL_POLICY_NAME = "resultsvc-full-access"
AUDIT_POLICY_NAME = "SecurityAudit"
PROFILES = ("full", "audit")
SESSION_SECONDS = 900
# IAM is eventually consistent: a role made a moment ago may not be assumable
# for some seconds on AWS. A new role is retried this long before giving up.
PROPAGATION_SECONDS = 60.0

# The permissions handed-over keys need. The product's list names
# iam:GetUser; the account is found with sts:GetCallerIdentity instead, which
# needs no permission. Reading an existing policy needs GetPolicyVersion, and
# checking an existing role's policies the two List actions.
KEY_PERMISSIONS = (
    "iam:CreatePolicy",
    "iam:GetPolicy",
    "iam:GetPolicyVersion",
    "iam:CreateRole",
    "iam:GetRole",
    "iam:AttachRolePolicy",
    "iam:ListAttachedRolePolicies and iam:ListRolePolicies (when the role exists already)",
)

_DENIED = {
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedAccess",
    "AuthorizationError",
}
_BAD_KEYS = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "IncompleteSignature",
    "ExpiredToken",
    "InvalidToken",
    "UnrecognizedClientException",
    "AuthFailure",
}
_PASSING = {
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "RequestTimeout",
}
_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
_SECRET = re.compile(r"[A-Za-z0-9/+=]{16,128}")
_AWS_CONFIG = Config(
    connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 3}
)


class LinkRefused(Exception):
    """The customer's side does not allow the link; the message says what to change."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class LinkNotConfigured(Exception):
    """This deployment has no AWS principal, so it cannot make or check roles."""


class AwsUnavailable(Exception):
    """AWS could not be asked (network, throttling, our own credentials): retry later."""


@dataclass(frozen=True)
class AccessKeys:
    """A customer's access key pair, held in memory for one link; never printed."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)

    def __post_init__(self) -> None:
        # The rules name the field and never echo the value.
        if not _KEY_ID.fullmatch(self.access_key_id):
            raise LinkRefused(
                "access_key_id", "must be 16-128 upper-case letters and digits, as AWS issues them"
            )
        if not _SECRET.fullmatch(self.secret_access_key):
            raise LinkRefused(
                "secret_access_key",
                "must be 16-128 characters of A-Z a-z 0-9 / + =, as AWS issues them",
            )

    def __repr__(self) -> str:
        return "AccessKeys(<redacted>)"


def role_name_for(team_id: UUID) -> str:
    """The role the access-keys method creates: one per team, recognisable in IAM."""
    return f"{ROLE_PREFIX}{team_id}"


def trust_policy(principal_arn: str, external_id: str) -> dict[str, Any]:
    """Who may assume the role: our principal only, and only with the team's External ID."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": principal_arn},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
            }
        ],
    }


def full_access_policy() -> dict[str, Any]:
    """Profile ``full``: everything except creating IAM users, as the product documents.

    The exception is an explicit Deny, so no other policy on the role can undo it.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AllowAll", "Effect": "Allow", "Action": "*", "Resource": "*"},
            {
                "Sid": "NeverCreateUsers",
                "Effect": "Deny",
                "Action": "iam:CreateUser",
                "Resource": "*",
            },
        ],
    }


def _action(service: str, error: ClientError) -> str:
    return f"{service}:{error.operation_name}"


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


@contextmanager
def _customer_call(service: str) -> Iterator[None]:
    """Translate AWS errors on calls made with the customer's keys into safe messages."""
    try:
        yield
    except LinkRefused:
        raise
    except ClientError as error:
        code, action = _code(error), _action(service, error)
        if code in _DENIED:
            raise LinkRefused(
                "access_key_id",
                f"the access keys are not allowed {action} ({code}); they need "
                + ", ".join(KEY_PERMISSIONS),
            ) from None
        if code in _BAD_KEYS:
            raise LinkRefused(
                "access_key_id", f"AWS did not accept the access keys ({code}) on {action}"
            ) from None
        if code in _PASSING or _status(error) >= 500:
            raise AwsUnavailable(f"AWS answered {code} on {action}; retry later") from None
        raise LinkRefused("access_key_id", f"AWS refused {action} ({code})") from None
    except BotoCoreError as error:
        raise AwsUnavailable(
            f"AWS could not be reached for {service} ({type(error).__name__})"
        ) from None


@dataclass
class AwsAccountLinker:
    """Checks roles as our principal and creates them with a customer's keys.

    ``session_factory`` builds our own boto3 session (default chain); tests
    point boto3 at a moto server through ``AWS_ENDPOINT_URL``, not through it.
    """

    principal_arn: str | None
    session_factory: Callable[[], boto3.session.Session] = boto3.session.Session
    propagation_seconds: float = PROPAGATION_SECONDS
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    @property
    def enabled(self) -> bool:
        return self.principal_arn is not None

    # ------------------------------------------------------------ check a role

    def assume(self, role_arn: str, external_id: str, session_name: str) -> None:
        """Assume the role as our principal with the team's External ID, or say why not.

        The credentials AWS answers are dropped at once: the check is that
        AWS grants them, and nothing here acts inside the customer's account.
        """
        try:
            sts = self.session_factory().client("sts", config=_AWS_CONFIG)
            sts.assume_role(
                RoleArn=role_arn,
                RoleSessionName=session_name[:64],
                ExternalId=external_id,
                DurationSeconds=SESSION_SECONDS,
            )
        except NoCredentialsError:
            raise AwsUnavailable(
                "the service has no AWS credentials of its own (boto3 default chain)"
            ) from None
        except ClientError as error:
            code = _code(error)
            if code in _PASSING or _status(error) >= 500:
                raise AwsUnavailable(f"STS answered {code}; retry later") from None
            if code in _BAD_KEYS:
                raise AwsUnavailable(
                    f"STS refused the service's own credentials ({code})"
                ) from None
            raise LinkRefused(
                "role_arn",
                f"{self.principal_arn} cannot assume {role_arn} with this team's External ID"
                f" ({code}): the role's trust policy must allow sts:AssumeRole for that"
                " principal with the condition sts:ExternalId = the team's External ID",
            ) from None
        except BotoCoreError as error:
            raise AwsUnavailable(f"STS could not be reached ({type(error).__name__})") from None

    # ------------------------------------------------------- create with keys

    def create_role(self, keys: AccessKeys, profile: str, team_id: UUID, external_id: str) -> str:
        """Make (or reuse, if exactly ours) the team's role in the keys' account; its ARN.

        Order: find the account, the role (trust policy checked when it is
        already there), the policy, attach, then assume it as our principal,
        waiting out IAM's propagation for a role made just now.

        An error nobody foresaw leaves as ``AwsUnavailable`` naming its type
        and where it was raised, without its message or chained traceback:
        it came from code that held the keys.
        """
        try:
            return self._create_role(keys, profile, team_id, external_id)
        except (LinkRefused, LinkNotConfigured, AwsUnavailable):
            raise
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            raise AwsUnavailable(
                f"linking failed unexpectedly ({type(error).__name__} at"
                f" {Path(where.filename).name}:{where.lineno})"
            ) from None

    def _create_role(self, keys: AccessKeys, profile: str, team_id: UUID, external_id: str) -> str:
        if self.principal_arn is None:
            raise LinkNotConfigured(
                "linking with access keys needs RESULTSVC_AWS_PRINCIPAL_ARN on the service"
            )
        if profile not in PROFILES:
            raise LinkRefused("profile", "must be 'full' or 'audit'")
        # The session and its two clients are the only holders of the keys;
        # they are locals of this call and go with it. botocore must not log
        # at DEBUG meanwhile (it prints the signed Authorization header),
        # whoever configured logging in this process.
        quiet_aws_loggers()
        session = boto3.session.Session(
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key,
            region_name=self.session_factory().region_name or "us-east-1",
        )
        sts = session.client("sts", config=_AWS_CONFIG)
        iam = session.client("iam", config=_AWS_CONFIG)
        with _customer_call("sts"):
            identity = sts.get_caller_identity()
        partition = str(identity["Arn"]).split(":")[1]
        wanted = trust_policy(self.principal_arn, external_id)
        role_arn, created = self._ensure_role(iam, role_name_for(team_id), wanted, team_id)
        policy_arn = self._ensure_policy(iam, profile, partition, str(identity["Account"]))
        if not created:
            self._refuse_other_policies(iam, role_name_for(team_id), policy_arn)
        with _customer_call("iam"):
            iam.attach_role_policy(RoleName=role_name_for(team_id), PolicyArn=policy_arn)
        self._assume_new(role_arn, external_id, f"resultsvc-link-{team_id}", wait=created)
        return role_arn

    def _ensure_role(
        self, iam: Any, name: str, wanted: dict[str, Any], team_id: UUID
    ) -> tuple[str, bool]:
        """The role's ARN and whether it was made now; a foreign role of that name refused."""
        with _customer_call("iam"):
            try:
                role = iam.get_role(RoleName=name)["Role"]
            except ClientError as error:
                if _code(error) != "NoSuchEntity":
                    raise
                try:
                    made = iam.create_role(
                        RoleName=name,
                        AssumeRolePolicyDocument=json.dumps(wanted),
                        Description=f"resultsvc access for team {team_id}",
                        MaxSessionDuration=3600,
                    )
                    return str(made["Role"]["Arn"]), True
                except ClientError as again:
                    if _code(again) != "EntityAlreadyExists":
                        raise
                    role = iam.get_role(RoleName=name)["Role"]  # made meanwhile: check it
        if _document(role.get("AssumeRolePolicyDocument")) != wanted:
            raise LinkRefused(
                "access_key_id",
                f"role {name} already exists in this account with a trust policy that is not"
                " this team's; delete or rename it, or link an existing role with method=role",
            )
        return str(role["Arn"]), False

    def _refuse_other_policies(self, iam: Any, name: str, policy_arn: str) -> None:
        """A reused role must not carry more than the profile asked for (say, full before)."""
        with _customer_call("iam"):
            pages = iam.get_paginator("list_attached_role_policies").paginate(RoleName=name)
            attached = [p["PolicyArn"] for page in pages for p in page["AttachedPolicies"]]
            inline_pages = iam.get_paginator("list_role_policies").paginate(RoleName=name)
            inline = [n for page in inline_pages for n in page["PolicyNames"]]
        others = sorted(arn.rsplit("/", 1)[-1] for arn in attached if arn != policy_arn)
        others += sorted(f"{n} (inline)" for n in inline)
        if others:
            raise LinkRefused(
                "profile",
                f"role {name} already exists with other policies attached ({', '.join(others)});"
                " detach them first, so the role grants only what this profile allows",
            )

    def _ensure_policy(self, iam: Any, profile: str, partition: str, account: str) -> str:
        if profile == "audit":
            return f"arn:{partition}:iam::aws:policy/{AUDIT_POLICY_NAME}"
        wanted = full_access_policy()
        arn = f"arn:{partition}:iam::{account}:policy/{FULL_POLICY_NAME}"
        with _customer_call("iam"):
            try:
                made = iam.create_policy(
                    PolicyName=FULL_POLICY_NAME,
                    PolicyDocument=json.dumps(wanted),
                    Description="resultsvc profile full: allow * except iam:CreateUser",
                )
                return str(made["Policy"]["Arn"])
            except ClientError as error:
                if _code(error) != "EntityAlreadyExists":
                    raise
            policy = iam.get_policy(PolicyArn=arn)["Policy"]
            version = iam.get_policy_version(PolicyArn=arn, VersionId=policy["DefaultVersionId"])[
                "PolicyVersion"
            ]
        if _document(version.get("Document")) != wanted:
            raise LinkRefused(
                "profile",
                f"policy {FULL_POLICY_NAME} already exists in this account with another"
                " document; delete it or choose profile audit",
            )
        return arn

    def _assume_new(self, role_arn: str, external_id: str, session_name: str, wait: bool) -> None:
        deadline = self.clock() + (self.propagation_seconds if wait else 0.0)
        pause = 1.0
        while True:
            try:
                self.assume(role_arn, external_id, session_name)
                return
            except LinkRefused:
                if self.clock() + pause > deadline:
                    raise
                self.sleep(pause)
                pause = min(pause * 2, 10.0)


def _document(raw: Any) -> Any:
    """A policy document as IAM answers it (boto3 decodes it; some servers send text)."""
    if isinstance(raw, str):
        from urllib.parse import unquote

        try:
            return json.loads(unquote(raw))
        except ValueError:
            return None
    return raw
