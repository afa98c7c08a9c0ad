"""Linking customers' AWS accounts (issue 7): over HTTP, the CLI and the daily job, to moto.

Everything reaches AWS over HTTP: moto's session server, through the recording
proxy of ``tests/aws_proxy.py`` where a test needs to see what was sent (moto
ignores the External ID, so the ExternalId of each AssumeRole is read at the
proxy) or to make STS refuse or fail. Missing IAM permissions are real: a
separate moto server with authentication on enforces the customer's policies.

Customer accounts are random 12-digit ids on the shared moto server. Most
tests share one (their roles are named per team or per test, and a new moto
account costs a second); a test that depends on account-wide state (the policy
``resultsvc-full-access``) gets its own. Documents are compared with the
literal documents the product promises, not with the module's own functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
import zstandard
from fastapi.testclient import TestClient

from service.account_link import AwsAccountLinker
from service.api import create_app
from service.database import open_application
from service.logs import QUIET
from service.runtime import Runtime
from service.scheduler import JOBS, JobRunner, job_status
from service.settings import Settings
from tests.aws_proxy import AwsProxy, Fault, Recorded, aws_proxy
from tests.conftest import free_port

PRINCIPAL = "arn:aws:iam::123456789012:role/resultsvc-platform"
PROBLEM = "application/problem+json"
RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
CHECK_JOB = next(spec for spec in JOBS if spec.name == "account-verification")
JOB_DAY = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)

# What the product promises to create, written out (README, docs/operations.md).
FULL_ACCESS_DOCUMENT = {
    "Version": "2012-10-17",
    "Statement": [
        {"Sid": "AllowAll", "Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Sid": "NeverCreateUsers", "Effect": "Deny", "Action": "iam:CreateUser", "Resource": "*"},
    ],
}
SECURITY_AUDIT = "arn:aws:iam::aws:policy/SecurityAudit"
# docs/operations.md: "the keys need iam:CreatePolicy, iam:GetPolicy,
# iam:GetPolicyVersion, iam:CreateRole, iam:GetRole, iam:AttachRolePolicy, and
# iam:ListAttachedRolePolicies, iam:ListRolePolicies when the role exists already".
DOCUMENTED_KEY_PERMISSIONS = [
    "iam:CreatePolicy",
    "iam:GetPolicy",
    "iam:GetPolicyVersion",
    "iam:CreateRole",
    "iam:GetRole",
    "iam:AttachRolePolicy",
    "iam:ListAttachedRolePolicies",
    "iam:ListRolePolicies",
]


def expected_trust(external_id: str, principal: str = PRINCIPAL) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
            }
        ],
    }


def allow(*actions: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}],
        }
    )


def random_account_id() -> str:
    return str(10**11 + secrets.randbelow(9 * 10**11))


def deny_assume(role_arn: str | None = None) -> Callable[[Recorded], Fault | None]:
    """A proxy rule: STS refuses AssumeRole (of one role, or of all) as AWS does."""

    def rule(request: Recorded) -> Fault | None:
        if request.action == "AssumeRole" and role_arn in (None, request.form.get("RoleArn")):
            return Fault(403, "AccessDenied", "not authorized to perform sts:AssumeRole")
        return None

    return rule


def sts_answers(fault: Fault) -> Callable[[Recorded], Fault | None]:
    return lambda request: fault if request.action == "AssumeRole" else None


def assert_no_keys(blob: bytes | str, *keys: str) -> None:
    """Neither key, raw or URL-encoded, anywhere in ``blob``."""
    data = blob.encode() if isinstance(blob, str) else blob
    for key in keys:
        for form in {key, quote(key, safe="")}:
            assert form.encode() not in data, "a handed-over key leaked"


def gauge(metrics_text: str, state: str) -> float:
    found = re.search(
        rf'^resultsvc_accounts_linked\{{access="{state}"\}} (\S+)$', metrics_text, re.MULTILINE
    )
    assert found is not None, metrics_text
    return float(found[1])


def topics_after(runtime: Runtime, position: int) -> list[str]:
    notifications = runtime.app.recorder.select_notifications(
        start=position, limit=1000, inclusive_of_start=False
    )
    return [n.topic for n in notifications]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# ------------------------------------------------------------------ customers on moto


@dataclass
class Customer:
    """A customer's AWS account on a moto server, driven with credentials inside it."""

    account_id: str
    iam: Any

    def keys(self, name: str | None = None, policy: str | None = None) -> tuple[str, str]:
        """A new IAM user's long-term access key pair (moto maps it to this account)."""
        user = name or f"cust-{secrets.token_hex(4)}"
        self.iam.create_user(UserName=user)
        if policy is not None:
            self.iam.put_user_policy(UserName=user, PolicyName="keys", PolicyDocument=policy)
        key = self.iam.create_access_key(UserName=user)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def role(self, name: str, trust: dict[str, Any]) -> str:
        made = self.iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        return str(made["Role"]["Arn"])

    def trust_of(self, name: str) -> Any:
        return self.iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]

    def attached(self, name: str) -> list[str]:
        answer = self.iam.list_attached_role_policies(RoleName=name)
        return sorted(p["PolicyArn"] for p in answer["AttachedPolicies"])

    def document(self, policy_arn: str) -> Any:
        version = self.iam.get_policy(PolicyArn=policy_arn)["Policy"]["DefaultVersionId"]
        answer = self.iam.get_policy_version(PolicyArn=policy_arn, VersionId=version)
        return answer["PolicyVersion"]["Document"]


def open_customer(endpoint: str, account_id: str | None = None) -> Customer:
    """Assume into a fresh account (moto, no auth) and act there as an administrator."""
    account = account_id or random_account_id()
    sts = boto3.client(
        "sts",
        endpoint_url=endpoint,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_session_token="testing",
    )
    answer = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/admin", RoleSessionName="setup")
    creds = answer["Credentials"]
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="eu-west-1",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    return Customer(account, iam)


@pytest.fixture(scope="module")
def shared_account(moto_endpoint: str) -> Customer:
    """One customer account for the tests whose roles are named per team or per test.

    The first IAM call in a new moto account loads every AWS managed policy (about a
    second), so only tests that depend on account-wide state get an account of their own.
    """
    return open_customer(moto_endpoint)


@pytest.fixture
def customer(aws: str, shared_account: Customer) -> Customer:
    return shared_account


@pytest.fixture
def fresh_customer(aws: str) -> Customer:
    """An account of this test's own (the policy resultsvc-full-access is per account)."""
    return open_customer(aws)


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def module_proxy(moto_endpoint: str) -> Iterator[AwsProxy]:
    """One proxy for the module: stopping one waits out its 0.5 s poll, per test that adds up."""
    with aws_proxy(moto_endpoint) as running:
        yield running


@pytest.fixture
def proxy(aws: str, module_proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch) -> AwsProxy:
    """The service's STS and IAM calls go through the recording proxy to moto.

    Each test starts with no recorded request and no fault rule.
    """
    with module_proxy.lock:
        module_proxy.requests.clear()
        module_proxy.rules.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", module_proxy.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", module_proxy.url)
    return module_proxy


# ------------------------------------------------------------------ the service


@dataclass
class Team:
    id: str
    external_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def actor(self) -> str:
        return "token:" + self.token.removeprefix("rsvc_").partition("_")[0]


@dataclass
class Service:
    runtime: Runtime
    client: TestClient

    def team(self, name: str = "Blue Team") -> Team:
        team, _ = self.runtime.app.create_team(name)
        token = self.runtime.tokens.create(str(team.id), frozenset({"ingest", "read"}))
        return Team(str(team.id), team.external_id, token)

    def ops(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.runtime.tokens.create(None, frozenset({'ops'}))}"}

    def head(self) -> int:
        return self.runtime.app.head_position()

    def link_role(self, team: Team, role_arn: str, **headers: str) -> Any:
        return self.client.post(
            f"/v1/teams/{team.id}/accounts",
            json={"method": "role", "role_arn": role_arn},
            headers={**team.headers, **headers},
        )

    def link_keys(
        self, team: Team, key_id: str, secret: str, profile: str = "full", **headers: str
    ) -> Any:
        body = {
            "method": "access_keys",
            "access_key_id": key_id,
            "secret_access_key": secret,
            "profile": profile,
        }
        return self.client.post(
            f"/v1/teams/{team.id}/accounts", json=body, headers={**team.headers, **headers}
        )

    def accounts(self, team: Team) -> list[dict[str, Any]]:
        answer = self.client.get(f"/v1/teams/{team.id}/accounts", headers=team.headers)
        assert answer.status_code == 200, answer.text
        return list(answer.json()["items"])


def _client(runtime: Runtime) -> TestClient:
    class CatchingUpClient(TestClient):
        """Like conftest's ``api``: the views catch up before each GET."""

        def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
            if method.upper() == "GET":
                runtime.projector.catch_up()
            return super().request(method, url, *args, **kwargs)

    return CatchingUpClient(create_app(runtime), raise_server_exceptions=False)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[str, str | None], Service]]:
    """Opens the service (runtime + in-process HTTP client) on a store, with a principal or not."""
    with ExitStack() as stack:

        def make(database_url: str, principal: str | None) -> Service:
            env = {
                "RESULTSVC_DATABASE_URL": database_url,
                "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
                "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
            }
            if principal is not None:
                env["RESULTSVC_AWS_PRINCIPAL_ARN"] = principal
            runtime = Runtime.open(Settings.from_env(env))
            stack.callback(runtime.close)
            client = stack.enter_context(_client(runtime))
            return Service(runtime, client)

        yield make


@pytest.fixture
def svc(
    services: Callable[[str, str | None], Service], database_url: str, proxy: AwsProxy
) -> Service:
    """The service with a principal, on SQLite and on PostgreSQL."""
    return services(database_url, PRINCIPAL)


@pytest.fixture
def lite(
    services: Callable[[str, str | None], Service], tmp_path: Path, proxy: AwsProxy
) -> Service:
    """The service with a principal on SQLite, where the store does not matter."""
    return services(f"sqlite:///{tmp_path}/lite.db", PRINCIPAL)


# ====================================================================== method role


def test_a_role_link_is_verified_by_assuming_it_with_the_teams_external_id(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    role_arn = cust.role(unique("resultsvc-audit"), expected_trust(team.external_id))
    before = svc.head()

    answer = svc.link_role(team, role_arn)

    assert answer.status_code == 201, answer.text
    linked = answer.json()
    assert {k: v for k, v in linked.items() if k not in ("id", "position")} == {
        "team_id": team.id,
        "aws_account_id": cust.account_id,
        "role_arn": role_arn,
        "method": "role",
        "profile": None,
        "verified": True,
        "notice": None,
    }
    assert linked["position"] == svc.head() > before
    assert topics_after(svc.runtime, before) == ["resultsvc/CloudAccount/Linked"]
    # What STS was asked: the role, with the team's External ID, as our principal.
    [call] = proxy.actions("AssumeRole")
    assert call.form["RoleArn"] == role_arn
    assert call.form["ExternalId"] == team.external_id
    assert call.form["RoleSessionName"].startswith("resultsvc-")
    assert call.form["RoleSessionName"] == f"resultsvc-verify-{team.id}"
    authorization = {k.lower(): v for k, v in call.headers.items()}["authorization"]
    assert "Credential=testing/" in authorization  # our default-chain credentials
    [item] = svc.accounts(team)
    assert item["id"] == linked["id"]
    assert item["access"] == "ok"
    assert item["verified"] is True and item["linked"] is True
    assert item["linked_by"] == team.actor
    assert item["access_reason"] is None
    assert item["aws_account_id"] == cust.account_id


@pytest.mark.parametrize(
    "role_arn",
    [
        "arn:aws:iam::12345678901:role/short-account",
        "arn:aws:iam::123456789012:user/not-a-role",
        "arn:aws:iam::123456789012:role/",
        "not an arn",
    ],
)
def test_a_malformed_role_arn_is_refused_before_aws_and_appends_nothing(
    svc: Service, proxy: AwsProxy, role_arn: str
) -> None:
    team = svc.team()
    before = svc.head()
    answer = svc.link_role(team, role_arn)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert [e["field"] for e in answer.json()["errors"]] == ["role_arn"]
    assert svc.head() == before
    assert proxy.requests == []
    assert svc.accounts(team) == []


def test_a_role_sts_will_not_let_us_assume_is_refused_naming_role_arn(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    role_arn = cust.role(unique("resultsvc-other"), expected_trust("someone else's external id"))
    proxy.rules.append(deny_assume(role_arn))
    before = svc.head()

    answer = svc.link_role(team, role_arn)

    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["title"] == "Link refused"
    [error] = problem["errors"]
    assert error["field"] == "role_arn"
    assert role_arn in error["rule"] and "External ID" in error["rule"]
    assert "AccessDenied" in error["rule"]
    assert len(proxy.actions("AssumeRole")) == 1
    assert svc.head() == before
    assert svc.accounts(team) == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault(503, "ServiceUnavailable"),
        # Our own credentials refused is our problem: never blamed on the customer.
        Fault(403, "InvalidClientTokenId"),
    ],
    ids=["sts-down", "own-credentials-refused"],
)
def test_sts_unavailable_answers_503_with_retry_after_and_records_nothing(
    svc: Service, proxy: AwsProxy, customer: Customer, fault: Fault
) -> None:
    team, cust = svc.team(), customer
    role_arn = cust.role(unique("resultsvc-audit"), expected_trust(team.external_id))
    proxy.rules.append(sts_answers(fault))
    before = svc.head()

    answer = svc.link_role(team, role_arn, **{"Idempotency-Key": "sts-down-1"})

    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["title"] == "AWS unavailable"
    assert int(answer.headers["Retry-After"]) > 0
    assert svc.head() == before
    assert svc.accounts(team) == []
    # A passing failure releases the Idempotency-Key: the retry runs once STS is back.
    proxy.rules.clear()
    retried = svc.link_role(team, role_arn, **{"Idempotency-Key": "sts-down-1"})
    assert retried.status_code == 201, retried.text
    assert [a["access"] for a in svc.accounts(team)] == ["ok"]


def test_linking_needs_an_ingest_or_ops_token(lite: Service, proxy: AwsProxy) -> None:
    team = lite.team()
    role_arn = f"arn:aws:iam::{random_account_id()}:role/{unique('resultsvc')}"
    reader = lite.runtime.tokens.create(team.id, frozenset({"read"}))
    url, body = f"/v1/teams/{team.id}/accounts", {"method": "role", "role_arn": role_arn}
    before = lite.head()

    assert lite.client.post(url, json=body).status_code == 401
    forbidden = lite.client.post(url, json=body, headers={"Authorization": f"Bearer {reader}"})
    assert forbidden.status_code == 403
    assert lite.head() == before and proxy.requests == []

    by_ops = lite.client.post(url, json=body, headers=lite.ops())
    assert by_ops.status_code == 201, by_ops.text
    [item] = lite.accounts(team)
    assert item["linked_by"].startswith("token:") and item["linked_by"] != team.actor
    assert [c.form["ExternalId"] for c in proxy.actions("AssumeRole")] == [team.external_id]


# ============================================================ without a principal


def test_without_a_principal_role_links_are_recorded_unverified_without_calling_aws(
    services: Callable[[str, str | None], Service], database_url: str, proxy: AwsProxy
) -> None:
    plain = services(database_url, None)
    team = plain.team()
    role_arn = f"arn:aws:iam::{random_account_id()}:role/resultsvc"

    answer = plain.link_role(team, role_arn)

    assert answer.status_code == 201, answer.text
    linked = answer.json()
    assert linked["verified"] is False
    assert "RESULTSVC_AWS_PRINCIPAL_ARN" in linked["notice"]
    assert proxy.requests == []
    [item] = plain.accounts(team)
    assert item["access"] == "unverified" and item["verified"] is False
    # The daily check cannot check anything: it says so and appends nothing.
    head = plain.head()
    report = plain.runtime.accounts.check_all()
    assert report.skipped is not None and "RESULTSVC_AWS_PRINCIPAL_ARN" in report.skipped
    assert report.checked == 0
    assert plain.head() == head
    assert proxy.requests == []


def test_without_a_principal_access_key_links_are_refused_409(
    services: Callable[[str, str | None], Service], tmp_path: Path, proxy: AwsProxy
) -> None:
    plain = services(f"sqlite:///{tmp_path}/plain.db", None)
    team = plain.team()
    key_id, secret = "AKIA" + "Q" * 16, "s3cr3t/Secret+Value=" * 2
    before = plain.head()

    answer = plain.link_keys(team, key_id, secret)

    assert answer.status_code == 409, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert "RESULTSVC_AWS_PRINCIPAL_ARN" in answer.json()["detail"]
    assert_no_keys(answer.content, key_id, secret)
    assert proxy.requests == []
    assert plain.head() == before


# ==================================================================== access keys


def test_access_keys_with_profile_full_create_our_role_and_policy_exactly(
    svc: Service, proxy: AwsProxy, fresh_customer: Customer
) -> None:
    team, cust = svc.team(), fresh_customer
    key_id, secret = cust.keys()
    role_name = f"resultsvc-{team.id}"
    before = svc.head()

    answer = svc.link_keys(team, key_id, secret, profile="full")

    assert answer.status_code == 201, answer.text
    assert_no_keys(answer.content, key_id, secret)
    linked = answer.json()
    assert linked["method"] == "access_keys" and linked["profile"] == "full"
    assert linked["verified"] is True
    assert linked["aws_account_id"] == cust.account_id
    assert linked["role_arn"] == f"arn:aws:iam::{cust.account_id}:role/{role_name}"
    assert "Deactivate and delete" in linked["notice"]
    assert topics_after(svc.runtime, before) == ["resultsvc/CloudAccount/Linked"]
    # The customer's account now holds exactly what the product promises.
    assert cust.trust_of(role_name) == expected_trust(team.external_id)
    full_access = f"arn:aws:iam::{cust.account_id}:policy/resultsvc-full-access"
    assert cust.attached(role_name) == [full_access]
    assert cust.document(full_access) == FULL_ACCESS_DOCUMENT
    # The keys made the role; then our principal assumed it with the External ID.
    assert len(proxy.actions("CreateRole")) == 1
    assert len(proxy.actions("CreatePolicy")) == 1
    [assumed] = proxy.actions("AssumeRole")
    assert assumed.form["RoleArn"] == linked["role_arn"]
    assert assumed.form["ExternalId"] == team.external_id
    assert assumed.form["RoleSessionName"].startswith("resultsvc-")
    [item] = svc.accounts(team)
    assert (item["method"], item["profile"], item["access"]) == ("access_keys", "full", "ok")
    assert item["linked_by"] == team.actor


def test_access_keys_with_profile_audit_attach_only_security_audit(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    key_id, secret = cust.keys()
    role_name = f"resultsvc-{team.id}"

    answer = lite.link_keys(team, key_id, secret, profile="audit")

    assert answer.status_code == 201, answer.text
    assert answer.json()["profile"] == "audit"
    assert cust.attached(role_name) == [SECURITY_AUDIT]
    assert cust.iam.list_role_policies(RoleName=role_name)["PolicyNames"] == []
    assert cust.trust_of(role_name) == expected_trust(team.external_id)
    assert proxy.actions("CreatePolicy") == []  # no customer managed policy for audit
    assert proxy.actions("AssumeRole")[0].form["ExternalId"] == team.external_id


def test_relinking_a_team_reuses_its_role_without_creating_it_again(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    key_id, secret = cust.keys()
    first = lite.link_keys(team, key_id, secret)
    assert first.status_code == 201, first.text
    assert len(proxy.actions("CreateRole")) == 1
    seen = len(proxy.requests)

    second = lite.link_keys(team, key_id, secret)

    assert second.status_code == 201, second.text
    assert second.json()["role_arn"] == first.json()["role_arn"]
    again = proxy.requests[seen:]
    assert [r for r in again if r.action == "CreateRole"] == []
    assert any(r.action == "GetRole" for r in again)
    assert cust.attached(f"resultsvc-{team.id}") == [
        f"arn:aws:iam::{cust.account_id}:policy/resultsvc-full-access"
    ]
    assert [r.form["ExternalId"] for r in again if r.action == "AssumeRole"] == [team.external_id]


def test_a_foreign_role_of_that_name_is_refused_naming_it_and_left_untouched(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    role_name = f"resultsvc-{team.id}"
    foreign = expected_trust("their own external id", "arn:aws:iam::999999999999:root")
    cust.role(role_name, foreign)
    key_id, secret = cust.keys()
    before = lite.head()

    answer = lite.link_keys(team, key_id, secret)

    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["title"] == "Link refused"
    assert role_name in problem["detail"]
    assert_no_keys(answer.content, key_id, secret)
    assert cust.trust_of(role_name) == foreign
    assert cust.attached(role_name) == []
    assert [
        r.action for r in proxy.requests if r.action in ("AttachRolePolicy", "CreateRole")
    ] == []
    assert proxy.actions("AssumeRole") == []
    assert lite.head() == before


def test_an_existing_full_access_policy_with_another_document_is_refused(
    lite: Service, proxy: AwsProxy, fresh_customer: Customer
) -> None:
    team, cust = lite.team(), fresh_customer
    theirs = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    policy_arn = cust.iam.create_policy(
        PolicyName="resultsvc-full-access", PolicyDocument=json.dumps(theirs)
    )["Policy"]["Arn"]
    key_id, secret = cust.keys()
    before = lite.head()

    answer = lite.link_keys(team, key_id, secret, profile="full")

    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    assert error["field"] == "profile"
    assert "resultsvc-full-access" in error["rule"]
    assert cust.document(policy_arn) == theirs
    assert proxy.actions("AttachRolePolicy") == []
    assert lite.head() == before


def test_our_role_with_another_profiles_policy_attached_is_refused(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    key_id, secret = cust.keys()
    assert lite.link_keys(team, key_id, secret, profile="full").status_code == 201
    role_name = f"resultsvc-{team.id}"
    before = lite.head()

    answer = lite.link_keys(team, key_id, secret, profile="audit")

    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    assert error["field"] == "profile"
    assert role_name in error["rule"] and "resultsvc-full-access" in error["rule"]
    # Refused before anything was attached: the role still grants exactly profile full.
    assert cust.attached(role_name) == [
        f"arn:aws:iam::{cust.account_id}:policy/resultsvc-full-access"
    ]
    assert lite.head() == before


def test_our_role_with_an_inline_policy_is_refused_like_any_other_policy(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    role_name = f"resultsvc-{team.id}"
    cust.role(role_name, expected_trust(team.external_id))
    cust.iam.put_role_policy(RoleName=role_name, PolicyName="extra", PolicyDocument=allow("*"))
    key_id, secret = cust.keys()

    answer = lite.link_keys(team, key_id, secret, profile="audit")

    # The role would grant everything while the link says "audit".
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "profile"


class FakeTime:
    """The linker's clock and sleep: a sleep advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_new_role_is_assumed_again_while_iam_propagates(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    fake = FakeTime()
    lite.runtime.linker = AwsAccountLinker(PRINCIPAL, sleep=fake.sleep, clock=fake.clock)
    team, cust = lite.team(), customer
    key_id, secret = cust.keys()
    refusals = iter(range(2))  # AWS: a role made a moment ago is not assumable yet

    def not_yet(request: Recorded) -> Fault | None:
        if request.action == "AssumeRole" and next(refusals, None) is not None:
            return Fault(403, "AccessDenied")
        return None

    proxy.rules.append(not_yet)

    answer = lite.link_keys(team, key_id, secret)

    assert answer.status_code == 201, answer.text
    assert fake.sleeps == [1.0, 2.0]
    calls = proxy.actions("AssumeRole")
    assert len(calls) == 3
    assert {c.form["ExternalId"] for c in calls} == {team.external_id}


def test_a_new_role_never_assumable_is_refused_after_the_propagation_window(
    lite: Service, proxy: AwsProxy, customer: Customer
) -> None:
    fake = FakeTime()
    lite.runtime.linker = AwsAccountLinker(
        PRINCIPAL, propagation_seconds=20.0, sleep=fake.sleep, clock=fake.clock
    )
    team, cust = lite.team(), customer
    key_id, secret = cust.keys()
    proxy.rules.append(deny_assume())
    before = lite.head()

    answer = lite.link_keys(team, key_id, secret)

    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "role_arn"
    assert_no_keys(answer.content, key_id, secret)
    assert len(fake.sleeps) >= 2 and sum(fake.sleeps) <= 20.0
    assert len(proxy.actions("AssumeRole")) == len(fake.sleeps) + 1
    assert lite.head() == before


# ======================================================= the keys never come back


LEAK_KEY_ID = "AKIA" + "LEAKCHECK" + "7" * 7
LEAK_SECRET = "Leak/Secret+Value=" + "x" * 22


@pytest.mark.parametrize(
    ("body", "field_named"),
    [
        (
            {"access_key_id": LEAK_KEY_ID.lower(), "secret_access_key": LEAK_SECRET},
            "access_key_id",
        ),
        (
            {"access_key_id": LEAK_KEY_ID, "secret_access_key": LEAK_SECRET[:20] + " " + "y" * 10},
            "secret_access_key",
        ),
        (
            {
                "access_key_id": LEAK_KEY_ID,
                "secret_access_key": LEAK_SECRET,
                "aws_secret_access_key": LEAK_SECRET,
            },
            "aws_secret_access_key",
        ),
        (
            {"access_key_id": LEAK_KEY_ID, "secret_access_key": LEAK_SECRET, "profile": "admin"},
            "profile",
        ),
        ({"access_key_id": LEAK_KEY_ID[:10], "secret_access_key": LEAK_SECRET}, "access_key_id"),
        (
            {"access_key_id": LEAK_KEY_ID, "secret_access_key": LEAK_SECRET + "z" * 100},
            "secret_access_key",
        ),
        ({"access_key_id": LEAK_KEY_ID, "secret_access_key": [LEAK_SECRET]}, "secret_access_key"),
    ],
    ids=[
        "lower-case-key-id",
        "secret-with-space",
        "unknown-field-holding-the-secret",
        "profile-invalid",
        "key-id-too-short",
        "secret-too-long",
        "secret-not-a-string",
    ],
)
def test_a_refused_key_body_never_echoes_the_keys(
    lite: Service, proxy: AwsProxy, body: dict[str, Any], field_named: str
) -> None:
    team = lite.team()
    before = lite.head()

    answer = lite.client.post(
        f"/v1/teams/{team.id}/accounts",
        json={"method": "access_keys", **body},
        headers=team.headers,
    )

    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM
    # The path may carry the union's tag: "access_keys.profile".
    fields = [e["field"].removeprefix("access_keys.") for e in answer.json()["errors"]]
    assert field_named in fields
    sent = [v for v in body.values() if isinstance(v, str) and len(v) >= 16]
    sent += [v for v in body.values() if isinstance(v, list) for v in v]
    assert sent, "the body holds key material"
    assert_no_keys(answer.content, LEAK_KEY_ID, LEAK_SECRET, *sent)
    assert_no_keys(str(answer.headers), LEAK_KEY_ID, LEAK_SECRET, *sent)
    assert proxy.requests == []
    assert lite.head() == before


def test_a_method_typo_with_keys_is_refused_without_echoing_them(lite: Service) -> None:
    team = lite.team()
    answer = lite.client.post(
        f"/v1/teams/{team.id}/accounts",
        json={"method": "keys", "access_key_id": LEAK_KEY_ID, "secret_access_key": LEAK_SECRET},
        headers=team.headers,
    )
    assert answer.status_code == 422, answer.text
    assert_no_keys(answer.content, LEAK_KEY_ID, LEAK_SECRET)


def _every_stored_byte(runtime: Runtime) -> tuple[bytes, bytes]:
    """(all rows of all tables, decompressed event states alone) as bytes."""
    everything, events = bytearray(), bytearray()
    with runtime.views.reading() as cur:
        if runtime.views.dialect == "sqlite":
            tables = [
                r[0] for r in cur.fetchall("SELECT name FROM sqlite_master WHERE type='table'")
            ]
        else:
            tables = [
                r[0]
                for r in cur.fetchall(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            ]
        assert "idempotency_keys" in tables and "view_accounts" in tables
        for table in tables:
            for row in cur.fetchall(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, memoryview | bytes):
                        data = bytes(value)
                        if data.startswith(b"\x28\xb5\x2f\xfd"):  # a zstd frame: an event
                            data = zstandard.decompress(data)
                            events += data
                        everything += data
                    else:
                        everything += str(value).encode()
    return bytes(everything), bytes(events)


def test_the_keys_are_in_no_stored_byte_and_no_log_line(
    svc: Service,
    proxy: AwsProxy,
    customer: Customer,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in QUIET:  # as service.logs configures them: botocore would print signed headers
        caplog.set_level(logging.WARNING, logger=name)
    cust = customer
    key_id, secret = cust.keys()
    team, refused_team = svc.team(), svc.team("Red Team")
    linked = svc.link_keys(team, key_id, secret, **{"Idempotency-Key": "k-1"})
    assert linked.status_code == 201, linked.text
    assert svc.link_keys(team, key_id, secret, **{"Idempotency-Key": "k-1"}).status_code == 201
    proxy.rules.append(lambda r: Fault(403, "AccessDenied") if r.action == "CreateRole" else None)
    refused = svc.link_keys(refused_team, key_id, secret, **{"Idempotency-Key": "k-2"})
    assert refused.status_code == 422, refused.text
    assert "iam:CreateRole" in refused.json()["detail"]
    svc.runtime.projector.catch_up()
    assert svc.runtime.accounts.check_all().ok == 1

    everything, events = _every_stored_byte(svc.runtime)

    # The scan sees what was recorded (so a miss below is a real absence)...
    assert linked.json()["role_arn"].encode() in events
    assert team.external_id.encode() in everything
    # ...and the keys are nowhere: events, views, idempotency answers, tokens, jobs.
    assert_no_keys(everything, key_id, secret)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert_no_keys(path.read_bytes(), key_id, secret)
    assert_no_keys(caplog.text, key_id, secret)
    for answer in (linked, refused):
        assert_no_keys(answer.content, key_id, secret)


# ==================================================================== idempotency


def test_the_same_idempotency_key_links_once_and_its_row_holds_no_key(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    key_id, secret = cust.keys()
    key = {"Idempotency-Key": "link-keys-once"}

    first = svc.link_keys(team, key_id, secret, **key)
    assert first.status_code == 201, first.text
    head, seen = svc.head(), len(proxy.requests)
    second = svc.link_keys(team, key_id, secret, **key)

    assert second.status_code == 201
    assert second.content == first.content
    assert svc.head() == head
    assert len(proxy.requests) == seen  # the replay never reached AWS
    assert len(svc.accounts(team)) == 1
    with svc.runtime.views.reading() as cur:
        rows = cur.fetchall("SELECT * FROM idempotency_keys")
        digests = cur.fetchall("SELECT request_sha256 FROM idempotency_keys")
    [row] = rows
    # The request's identity is the method and profile (docs): no hash of the keys is kept.
    path = f"/v1/teams/{team.id}/accounts".encode()
    fingerprint = b'{"method":"access_keys","profile":"full"}'
    assert [d[0] for d in digests] == [
        hashlib.sha256(b"POST\0" + path + b"\0" + fingerprint).hexdigest()
    ]
    stored = b"".join(
        bytes(v) if isinstance(v, memoryview | bytes) else str(v).encode() for v in row
    )
    assert b"link-keys-once" in stored and first.json()["role_arn"].encode() in stored
    assert_no_keys(stored, key_id, secret)
    # Keys re-typed for a retry do not make it another request: the first answer again.
    retyped = svc.link_keys(team, "AKIA" + "R" * 16, "r" * 40, **key)
    assert retyped.status_code == 201 and retyped.content == first.content
    assert len(proxy.requests) == seen
    # The same key with another request (another profile) is refused, not replayed.
    other = svc.link_keys(team, key_id, secret, profile="audit", **key)
    assert other.status_code == 422
    assert other.json()["title"] == "Idempotency-Key reused"
    assert svc.head() == head


# ========================================================================= unlink


def test_an_unlinked_account_refuses_new_runs_and_lists_as_unlinked(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    role_arn = cust.role(unique("resultsvc"), expected_trust(team.external_id))
    account = svc.link_role(team, role_arn).json()["id"]
    plan = svc.client.post(
        "/v1/plans",
        json={"team_id": team.id, "account_id": account, "name": "cis"},
        headers=team.headers,
    )
    assert plan.status_code == 201, plan.text
    plan_id = plan.json()["id"]
    assert svc.client.post(f"/v1/plans/{plan_id}/runs", headers=team.headers).status_code == 201

    unlinked = svc.client.delete(f"/v1/accounts/{account}", headers=team.headers)

    assert unlinked.status_code == 200, unlinked.text
    assert unlinked.json() == {"id": account, "position": svc.head()}
    head = svc.head()
    run = svc.client.post(f"/v1/plans/{plan_id}/runs", headers=team.headers)
    assert run.status_code == 409, run.text
    assert run.headers["content-type"] == PROBLEM
    assert account in run.json()["detail"]
    assert svc.head() == head
    [item] = svc.accounts(team)
    assert item["linked"] is False and item["unlinked_at"] is not None
    again = svc.client.delete(f"/v1/accounts/{account}", headers=team.headers)
    assert again.status_code == 409
    # The daily check leaves unlinked accounts alone.
    assumed = len(proxy.actions("AssumeRole"))
    assert svc.runtime.accounts.check_all().checked == 0
    assert len(proxy.actions("AssumeRole")) == assumed


def test_ops_can_unlink_any_teams_account_once_the_views_have_it(
    lite: Service, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    role_arn = cust.role(unique("resultsvc"), expected_trust(team.external_id))
    account = lite.link_role(team, role_arn).json()["id"]
    lite.runtime.projector.catch_up()

    answer = lite.client.delete(f"/v1/accounts/{account}", headers=lite.ops())

    assert answer.status_code == 200, answer.text
    [item] = lite.accounts(team)
    assert item["linked"] is False


def test_ops_can_unlink_an_account_right_after_it_was_linked(
    lite: Service, customer: Customer
) -> None:
    team, cust = lite.team(), customer
    role_arn = cust.role(unique("resultsvc"), expected_trust(team.external_id))
    account = lite.link_role(team, role_arn).json()["id"]  # no GET: the views are behind

    answer = lite.client.delete(f"/v1/accounts/{account}", headers=lite.ops())

    assert answer.status_code == 200, answer.text


# ===================================================================== isolation


def test_another_teams_accounts_answer_exactly_like_unknown_ones(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    mine, theirs = svc.team("A"), svc.team("B")
    cust = customer
    their_role = cust.role(unique("resultsvc-b"), expected_trust(theirs.external_id))
    their_account = svc.link_role(theirs, their_role).json()["id"]
    head, seen = svc.head(), len(proxy.requests)
    unknown = str(uuid.uuid4())

    def same_as_unknown(call: Callable[[str], Any], real: str) -> None:
        to_real, to_unknown = call(real), call(unknown)
        assert to_real.status_code == to_unknown.status_code == 404, to_real.text
        assert to_real.headers["content-type"] == to_unknown.headers["content-type"] == PROBLEM
        assert to_real.json() == json.loads(to_unknown.text.replace(unknown, real))

    role_body = {"method": "role", "role_arn": f"arn:aws:iam::{cust.account_id}:role/x"}
    keys_body = {
        "method": "access_keys",
        "access_key_id": "AKIA" + "B" * 16,
        "secret_access_key": "b" * 40,
    }
    for body in (role_body, keys_body):

        def link(team: str, body: dict[str, str] = body) -> Any:
            return svc.client.post(f"/v1/teams/{team}/accounts", json=body, headers=mine.headers)

        same_as_unknown(link, theirs.id)
    same_as_unknown(
        lambda team: svc.client.get(f"/v1/teams/{team}/accounts", headers=mine.headers), theirs.id
    )
    same_as_unknown(
        lambda account: svc.client.delete(f"/v1/accounts/{account}", headers=mine.headers),
        their_account,
    )

    assert svc.head() == head
    assert len(proxy.requests) == seen  # nothing reached AWS for the other team
    [item] = svc.accounts(theirs)
    assert item["linked"] is True
    assert svc.accounts(mine) == []


# ===================================================================== daily job


def test_the_daily_check_records_a_loss_once_and_then_the_recovery(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    kept = cust.role(unique("resultsvc-kept"), expected_trust(team.external_id))
    lost = cust.role(unique("resultsvc-lost"), expected_trust(team.external_id))
    kept_id = svc.link_role(team, kept).json()["id"]
    lost_id = svc.link_role(team, lost).json()["id"]
    svc.runtime.projector.catch_up()
    clock = Clock(JOB_DAY)
    runner = JobRunner(svc.runtime, clock=clock)
    denied = deny_assume(lost)  # the customer edited the trust policy of one role
    proxy.rules.append(denied)
    head, seen = svc.head(), len(proxy.actions("AssumeRole"))

    assert runner.run(CHECK_JOB) == "done"

    checks = proxy.actions("AssumeRole")[seen:]
    assert sorted(c.form["RoleArn"] for c in checks) == sorted([kept, lost])
    assert {c.form["ExternalId"] for c in checks} == {team.external_id}
    assert {c.form["RoleSessionName"] for c in checks} == {
        f"resultsvc-check-{kept_id}",
        f"resultsvc-check-{lost_id}",
    }
    assert topics_after(svc.runtime, head) == ["resultsvc/CloudAccount/AccessLost"]
    accounts = {a["id"]: a for a in svc.accounts(team)}
    assert accounts[kept_id]["access"] == "ok" and accounts[kept_id]["access_reason"] is None
    assert accounts[lost_id]["access"] == "lost"
    assert lost in accounts[lost_id]["access_reason"]
    assert "AccessDenied" in accounts[lost_id]["access_reason"]
    assert accounts[lost_id]["access_changed_at"] is not None
    metrics = svc.client.get("/metrics").text
    assert gauge(metrics, "lost") == 1.0 and gauge(metrics, "ok") == 1.0

    # Still lost the next day: checked again, nothing new recorded.
    head, seen = svc.head(), len(proxy.actions("AssumeRole"))
    clock.now += timedelta(days=1)
    assert runner.run(CHECK_JOB) == "done"
    assert len(proxy.actions("AssumeRole")) == seen + 2
    assert svc.head() == head
    assert {a["id"]: a["access"] for a in svc.accounts(team)}[lost_id] == "lost"

    # The customer fixed the trust policy: the next day records the recovery.
    proxy.rules.remove(denied)
    clock.now += timedelta(days=1)
    assert runner.run(CHECK_JOB) == "done"
    assert topics_after(svc.runtime, head) == ["resultsvc/CloudAccount/AccessRestored"]
    restored = {a["id"]: a for a in svc.accounts(team)}[lost_id]
    assert restored["access"] == "ok" and restored["access_reason"] is None
    metrics = svc.client.get("/metrics").text
    assert gauge(metrics, "lost") == 0.0 and gauge(metrics, "ok") == 2.0
    status = next(j for j in job_status(svc.runtime.views) if j["job"] == CHECK_JOB.name)
    assert status["last_slot"] == f"{clock.now:%Y-%m-%d}" and status["last_failure"] is None


def test_the_daily_check_with_sts_down_fails_and_marks_nobody_lost(
    svc: Service, proxy: AwsProxy, customer: Customer
) -> None:
    team, cust = svc.team(), customer
    roles = [cust.role(unique(f"resultsvc-{n}"), expected_trust(team.external_id)) for n in (1, 2)]
    for role in roles:
        assert svc.link_role(team, role).status_code == 201
    svc.runtime.projector.catch_up()
    proxy.rules.append(sts_answers(Fault(503, "ServiceUnavailable")))
    clock = Clock(JOB_DAY)
    runner = JobRunner(svc.runtime, clock=clock)
    head, seen = svc.head(), len(proxy.actions("AssumeRole"))

    assert runner.run(CHECK_JOB) == "failed"

    assert {c.form["RoleArn"] for c in proxy.actions("AssumeRole")[seen:]} == set(roles)
    status = next(j for j in job_status(svc.runtime.views) if j["job"] == CHECK_JOB.name)
    assert status["last_failure"] == clock.now.isoformat()
    assert status["last_success"] is None
    assert "2 of 2 accounts could not be checked" in status["last_error"]
    assert svc.head() == head
    assert {a["access"] for a in svc.accounts(team)} == {"ok"}
    metrics = svc.client.get("/metrics").text
    assert gauge(metrics, "lost") == 0.0
    assert f'resultsvc_job_last_failure_timestamp_seconds{{job="{CHECK_JOB.name}"}}' in metrics
    # A failed slot is not done: once STS is back the same day's run goes through.
    proxy.rules.clear()
    assert runner.run(CHECK_JOB) == "done"
    assert svc.head() == head


def test_the_daily_check_verifies_links_recorded_before_a_principal_was_set(
    services: Callable[[str, str | None], Service],
    tmp_path: Path,
    proxy: AwsProxy,
    customer: Customer,
) -> None:
    url = f"sqlite:///{tmp_path}/later.db"
    plain = services(url, None)
    team, cust = plain.team(), customer
    good = cust.role(unique("resultsvc-good"), expected_trust(team.external_id))
    bad = cust.role(unique("resultsvc-bad"), expected_trust("not this team's"))
    good_id = plain.link_role(team, good).json()["id"]
    bad_id = plain.link_role(team, bad).json()["id"]
    assert proxy.requests == []
    configured = services(url, PRINCIPAL)
    configured.runtime.projector.catch_up()
    proxy.rules.append(deny_assume(bad))
    head = configured.head()

    report = configured.runtime.accounts.check_all()

    assert (report.checked, report.ok, report.lost) == (2, 1, [bad_id])
    assert sorted(topics_after(configured.runtime, head)) == [
        "resultsvc/CloudAccount/AccessLost",
        "resultsvc/CloudAccount/AccessVerified",
    ]
    accounts = {a["id"]: a for a in configured.accounts(team)}
    assert (accounts[good_id]["access"], accounts[good_id]["verified"]) == ("ok", True)
    assert accounts[bad_id]["access"] == "lost" and accounts[bad_id]["verified"] is False


# ========================================== missing permissions, enforced by moto


@dataclass
class AuthMoto:
    """A moto server of our own with IAM authorization on, and the users made before."""

    endpoint: str
    platform_keys: tuple[str, str]
    platform_arn: str
    users: dict[str, tuple[Customer, tuple[str, str]]] = field(default_factory=dict)


def _wait_until_serving(process: subprocess.Popen[str], endpoint: str) -> None:
    """Block on the server's own "Running on" line (no polling by sleep), then ask it once."""
    ready = threading.Event()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:  # keeps reading so the server never blocks on its pipe
            if "Running on" in line:
                ready.set()

    threading.Thread(target=drain, name="moto-auth-output", daemon=True).start()
    assert ready.wait(60), "the moto server did not start within 60 s"
    with urllib.request.urlopen(endpoint + "/moto-api/", timeout=10) as answer:
        assert answer.status == 200


@pytest.fixture(scope="module")
def auth_moto() -> Iterator[AuthMoto]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_until_serving(process, endpoint)
        # Bootstrap while authorization is still off.
        ours = open_customer(endpoint, "123456789012")
        platform_keys = ours.keys("platform", allow("sts:AssumeRole"))
        moto = AuthMoto(endpoint, platform_keys, "arn:aws:iam::123456789012:user/platform")
        cust = open_customer(endpoint)
        for name, policy in {
            "limited": allow("iam:GetRole", "iam:CreatePolicy", "iam:GetPolicy"),
            "admin": allow("*"),
            "documented": allow(*DOCUMENTED_KEY_PERMISSIONS),
        }.items():
            moto.users[name] = (cust, cust.keys(name, policy))
        request = urllib.request.Request(
            endpoint + "/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["status"] == "ok"
        yield moto
    finally:
        process.kill()
        process.wait(30)


@pytest.fixture
def authed(
    auth_moto: AuthMoto,
    services: Callable[[str, str | None], Service],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Service:
    """The service on SQLite, its default-chain credentials the platform user's real keys."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_moto.platform_keys[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_moto.platform_keys[1])
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_STS",
        "AWS_ENDPOINT_URL_IAM",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    return services(f"sqlite:///{tmp_path}/authed.db", auth_moto.platform_arn)


def _user_iam(auth_moto: AuthMoto, keys: tuple[str, str]) -> Any:
    return boto3.client(
        "iam",
        endpoint_url=auth_moto.endpoint,
        region_name="eu-west-1",
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
    )


def test_keys_not_allowed_to_create_the_role_are_refused_naming_iam_create_role(
    authed: Service, auth_moto: AuthMoto
) -> None:
    _, keys = auth_moto.users["limited"]
    team = authed.team()
    before = authed.head()

    answer = authed.link_keys(team, *keys)

    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["title"] == "Link refused"
    assert "iam:CreateRole" in problem["detail"] and "AccessDenied" in problem["detail"]
    assert problem["errors"][0]["field"] == "access_key_id"
    assert_no_keys(answer.content, *keys)
    assert authed.head() == before
    iam = _user_iam(auth_moto, keys)  # the limited user may GetRole: nothing was made
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role(RoleName=f"resultsvc-{team.id}")


@pytest.mark.parametrize("wrong", ["secret", "key-id"])
def test_keys_aws_does_not_accept_are_refused_without_echoing_them(
    authed: Service, auth_moto: AuthMoto, wrong: str
) -> None:
    _, (key_id, secret) = auth_moto.users["limited"]
    if wrong == "secret":
        secret = "Wrong/Secret+" + "w" * 27
    else:
        key_id = "AKIA" + "UNKNOWN" + "0" * 9
    team = authed.team()
    before = authed.head()

    answer = authed.link_keys(team, key_id, secret)

    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "did not accept the access keys" in detail
    assert "sts:GetCallerIdentity" in detail
    assert_no_keys(answer.content, key_id, secret)
    assert authed.head() == before


def test_keys_with_full_permissions_link_and_our_principal_assumes_the_role(
    authed: Service, auth_moto: AuthMoto
) -> None:
    cust, keys = auth_moto.users["admin"]
    team = authed.team()

    answer = authed.link_keys(team, *keys, profile="full")

    assert answer.status_code == 201, answer.text
    linked = answer.json()
    assert linked["role_arn"] == f"arn:aws:iam::{cust.account_id}:role/resultsvc-{team.id}"
    assert linked["verified"] is True
    assert_no_keys(answer.content, *keys)
    iam = _user_iam(auth_moto, keys)
    role = iam.get_role(RoleName=f"resultsvc-{team.id}")["Role"]
    assert role["AssumeRolePolicyDocument"] == expected_trust(
        team.external_id, auth_moto.platform_arn
    )
    assert [item["access"] for item in authed.accounts(team)] == ["ok"]


def test_keys_with_exactly_the_documented_permissions_can_link_with_profile_audit(
    authed: Service, auth_moto: AuthMoto
) -> None:
    _, keys = auth_moto.users["documented"]
    team = authed.team()
    answer = authed.link_keys(team, *keys, profile="audit")
    assert answer.status_code == 201, answer.text
    # Linking again reuses the role: ListAttachedRolePolicies, documented for that case.
    again = authed.link_keys(team, *keys, profile="audit")
    assert again.status_code == 201, again.text


def test_keys_with_exactly_the_documented_permissions_can_link_once_the_policy_exists(
    authed: Service, auth_moto: AuthMoto
) -> None:
    _, admin = auth_moto.users["admin"]
    _, documented = auth_moto.users["documented"]
    # Another team of the same customer linked with profile full: the policy exists now.
    first = authed.link_keys(authed.team("first"), *admin, profile="full")
    assert first.status_code == 201, first.text

    second = authed.link_keys(authed.team("second"), *documented, profile="full")

    assert second.status_code == 201, second.text


def test_our_own_credentials_refused_is_503_not_the_customers_fault(
    authed: Service, auth_moto: AuthMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    cust, _ = auth_moto.users["admin"]
    team = authed.team()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not/the/platform/secret/" + "p" * 16)
    before = authed.head()

    answer = authed.link_role(team, f"arn:aws:iam::{cust.account_id}:role/resultsvc")

    assert answer.status_code == 503, answer.text
    assert answer.json()["title"] == "AWS unavailable"
    assert "Retry-After" in answer.headers
    assert authed.head() == before


# =========================================================================== CLI


def _cli(
    args: list[str], cwd: Path, database_url: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``resultsvc`` process; AWS settings are the test's (moto, via the proxy)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    env.update(
        RESULTSVC_DATABASE_URL=database_url,
        RESULTSVC_AWS_PRINCIPAL_ARN=PRINCIPAL,
        RESULTSVC_BACKUP_URL=f"file://{cwd}/backups",
        RESULTSVC_MASTER_KEY=f"file://{cwd}/keys/master.key",
    )
    return subprocess.run(
        [RESULTSVC, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cli_team(tmp_path: Path) -> tuple[str, str, str]:
    """(database URL, team id, External ID) of a team on a fresh SQLite store."""
    url = f"sqlite:///{tmp_path}/cli.db"
    app = open_application(url)
    try:
        team, _ = app.create_team("CLI Team")
    finally:
        app.close()
    return url, str(team.id), team.external_id


def test_cli_link_role_prints_the_verified_account_and_check_passes(
    tmp_path: Path,
    proxy: AwsProxy,
    customer: Customer,
    cli_team: tuple[str, str, str],
) -> None:
    url, team_id, external_id = cli_team
    cust = customer
    role_arn = cust.role(unique("resultsvc"), expected_trust(external_id))

    linked = _cli(["accounts", "link-role", team_id, role_arn], tmp_path, url)

    assert linked.returncode == 0, linked.stderr
    assert f"aws={cust.account_id}" in linked.stdout and role_arn in linked.stdout
    assert "(verified)" in linked.stdout
    [call] = proxy.actions("AssumeRole")
    assert call.form["ExternalId"] == external_id
    listed = _cli(["accounts", "list", team_id, "--json"], tmp_path, url)
    assert listed.returncode == 0, listed.stderr
    [item] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (item["role_arn"], item["access"], item["linked_by"]) == (role_arn, "ok", "cli")

    checked = _cli(["accounts", "check"], tmp_path, url)

    assert checked.returncode == 0, checked.stderr
    assert "1 checked, 1 ok" in checked.stdout
    assert len(proxy.actions("AssumeRole")) == 2


def test_cli_check_fails_when_an_account_lost_access(
    tmp_path: Path,
    proxy: AwsProxy,
    customer: Customer,
    cli_team: tuple[str, str, str],
) -> None:
    url, team_id, external_id = cli_team
    role_arn = customer.role(unique("resultsvc"), expected_trust(external_id))
    linked = _cli(["accounts", "link-role", team_id, role_arn, "--json"], tmp_path, url)
    assert linked.returncode == 0, linked.stderr
    account = json.loads(linked.stdout)["id"]
    proxy.rules.append(deny_assume(role_arn))

    checked = _cli(["accounts", "check"], tmp_path, url)

    assert checked.returncode != 0
    assert "1 newly lost" in checked.stdout
    # The last line says why; the loss itself was logged (a warning) just before it.
    lines = checked.stderr.strip().splitlines()
    assert lines[-1] == f"Error: access lost: {account}; not checked: none"
    assert "Traceback" not in checked.stderr
    listed = _cli(["accounts", "list", team_id], tmp_path, url)
    assert "access=lost (" in listed.stdout
    # The scheduler's way of running the job now: done (a loss is not a job failure).
    job = _cli(["scheduler", "--run-now", "account-verification"], tmp_path, url)
    assert job.returncode == 0, job.stderr
    assert "account-verification: done" in job.stdout


def test_cli_link_keys_reads_them_from_stdin_and_never_prints_them(
    tmp_path: Path,
    proxy: AwsProxy,
    customer: Customer,
    cli_team: tuple[str, str, str],
) -> None:
    url, team_id, external_id = cli_team
    cust = customer
    key_id, secret = cust.keys()

    linked = _cli(
        ["accounts", "link-keys", team_id, "--profile", "audit", "--json"],
        tmp_path,
        url,
        stdin=f"{key_id}\n{secret}\n",
    )

    assert linked.returncode == 0, linked.stderr
    assert_no_keys(linked.stdout + linked.stderr, key_id, secret)
    outcome = json.loads(linked.stdout)
    assert (outcome["method"], outcome["profile"], outcome["verified"]) == (
        "access_keys",
        "audit",
        True,
    )
    assert "Deactivate and delete" in outcome["notice"]
    assert cust.attached(f"resultsvc-{team_id}") == [SECURITY_AUDIT]
    assert proxy.actions("AssumeRole")[0].form["ExternalId"] == external_id
    # Malformed keys on stdin: one line, naming neither key.
    bad = _cli(
        ["accounts", "link-keys", team_id], tmp_path, url, stdin=f"{key_id.lower()}\n{secret}\n"
    )
    assert bad.returncode != 0
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    assert_no_keys(bad.stdout + bad.stderr, key_id, key_id.lower(), secret)


def test_cli_a_bad_role_arn_is_a_one_line_error(
    tmp_path: Path, proxy: AwsProxy, cli_team: tuple[str, str, str]
) -> None:
    url, team_id, _ = cli_team
    app = open_application(url)
    try:
        head = app.head_position()
    finally:
        app.close()

    answer = _cli(["accounts", "link-role", team_id, "arn:aws:iam::1:role/x"], tmp_path, url)

    assert answer.returncode != 0
    [line] = answer.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "role_arn" in line
    assert "Traceback" not in answer.stderr
    assert proxy.requests == []
    app = open_application(url)
    try:
        assert app.head_position() == head
    finally:
        app.close()
