"""The published OpenAPI document: valid, complete, and true to what the API answers.

The document is checked statically (every route, its problem answers, the
request limits), then ``schemathesis`` drives every operation with generated
requests (valid and invalid, random and real ids, an ops token and a team
token) and checks each answer against the document: no 5xx except the
documented 503 of ``after=``, documented statuses, content types, headers and
bodies. SQLite only, to keep it quick.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import service.api
from domain import findings as rules
from domain.application import MAX_ERROR, MAX_NAME, MAX_REASON, MAX_TICKET
from service.api import create_app
from service.backups import Backups
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings

PROBLEM = "application/problem+json"
PROBLEM_REF = "#/components/schemas/ProblemModel"
EXAMPLES_PER_OPERATION = 25

OPERATIONS = [
    ("POST", "/v1/teams"),
    ("GET", "/v1/teams/{team}"),
    ("GET", "/v1/teams/{team}/accounts"),
    ("POST", "/v1/teams/{team}/accounts"),
    ("DELETE", "/v1/accounts/{account}"),
    ("POST", "/v1/plans"),
    ("GET", "/v1/teams/{team}/plans"),
    ("GET", "/v1/plans/{plan}"),
    ("POST", "/v1/plans/{plan}/runs"),
    ("GET", "/v1/plans/{plan}/runs"),
    ("POST", "/v1/runs/{run}/results"),
    ("GET", "/v1/runs/{run}/results"),
    ("POST", "/v1/runs/{run}/complete"),
    ("GET", "/v1/runs/{run}"),
    ("POST", "/v1/plans/{plan}/backup-exclusion"),
    ("GET", "/v1/backup-exclusions"),
    ("POST", "/v1/display-purges"),
    ("GET", "/v1/backups"),
    ("POST", "/v1/backups"),
    ("GET", "/v1/restore-drills"),
    ("POST", "/v1/restore-drills"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
OPERATION_IDS = [f"{m} {p}" for m, p in OPERATIONS]


@dataclass
class Served:
    runtime: Runtime
    app: FastAPI
    document: dict[str, Any]
    ids: dict[str, str]
    ops: str
    team: str
    backup: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("openapi")
    runtime = Runtime.open(
        Settings.from_env(
            {
                "RESULTSVC_DATABASE_URL": f"sqlite:///{folder}/resultsvc.db",
                "RESULTSVC_BACKUP_URL": f"file://{folder}/backups",
                "RESULTSVC_MASTER_KEY": f"file://{folder}/master.key",
            }
        )
    )
    try:
        app_ = runtime.app
        team, _ = app_.create_team("Schema")
        account, _ = app_.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/scanner", verified=False, actor="test"
        )
        doomed, _ = app_.link_account_role(
            team.id, "arn:aws:iam::123456789012:role/doomed", verified=False, actor="test"
        )
        plan, _ = app_.create_plan(team.id, account.id, "weekly")
        run, _ = app_.start_run(team.id, plan.id)
        app_.record_results(team.id, run.id, list(findings(20)))
        excluded, _ = app_.create_plan(team.id, account.id, "excluded")
        app_.request_backup_exclusion(
            team.id, excluded.id, reason="asked", ticket="T-1", actor="test"
        )
        # A backup, so POST /v1/restore-drills reaches a drill, not only 409 "No backup".
        backup = Backups.open(runtime).writer.run(full=True).info.id
        runtime.projector.catch_up()
        app = create_app(runtime)
        with TestClient(app) as client:
            response = client.get("/openapi.json")
        assert response.status_code == 200
        yield Served(
            runtime,
            app,
            response.json(),
            {
                "team": str(team.id),
                "account": str(account.id),
                "plan": str(plan.id),
                "run": str(run.id),
                "doomed": str(doomed.id),
            },
            runtime.tokens.create(None, frozenset({"ops"})),
            runtime.tokens.create(str(team.id), frozenset({"ingest", "read", "compliance"})),
            backup,
        )
    finally:
        runtime.close()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


def _ref(document: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/"), ref
    return _schema(document, ref.rsplit("/", 1)[1])


# ------------------------------------------------------------ the document


def test_the_document_is_valid_openapi_3(served: Served) -> None:
    from openapi_spec_validator import validate

    document = served.document
    assert document["openapi"].startswith("3.")
    validate(document)
    assert document["info"]["title"] == "resultsvc"


def test_every_route_is_documented(served: Served) -> None:
    routes = {
        (method, route.path)
        for route in served.app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    documented = {(method, path) for method, path, _ in _operations(served.document)}
    assert routes == documented
    assert len(routes) >= 23


def _appends(method: str, path: str) -> bool:
    return path.startswith("/v1/") and method in ("POST", "DELETE")


def test_every_operation_documents_its_problem_answers(served: Served) -> None:
    document = served.document
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        label = f"{method} {path}"
        success = [code for code in responses if code.startswith("2")]
        assert len(success) == 1, label
        if not path.startswith("/v1/"):
            continue
        expected = {"401", "403", "422"}
        expected |= {"400", "404", "409", "413"} if _appends(method, path) else {"404", "503"}
        if "{" not in path and method == "GET":
            expected -= {"404"}
        assert expected <= set(responses), (label, sorted(responses))
        for code in expected:
            content = responses[code]["content"]
            assert content[PROBLEM]["schema"]["$ref"] == PROBLEM_REF, (label, code)
            assert responses[code]["description"], (label, code)
        assert operation["security"] == [{"HTTPBearer": []}], label
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}


def test_the_problem_model_is_rfc_9457(served: Served) -> None:
    problem = _schema(served.document, "ProblemModel")
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert set(problem["properties"]) == {"type", "title", "status", "detail", "errors"}
    error = _ref(served.document, problem["properties"]["errors"]["items"]["$ref"])
    assert set(error["required"]) == {"field", "rule"}


def test_operations_pages_document_no_token_problems(served: Served) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        responses = served.document["paths"][path]["get"]["responses"]
        assert not {"401", "403"} & set(responses), path


APPENDING = [(m, p) for m, p in OPERATIONS if _appends(m, p)]
READS = [(m, p) for m, p in OPERATIONS if m == "GET" and p.startswith("/v1/")]


def _params(pairs: list[tuple[str, str]], known: dict[str, Any]) -> list[Any]:
    params = []
    for method, path in pairs:
        label = f"{method} {path}"
        marks = [known[label]] if label in known else []
        params.append(pytest.param(method, path, id=label, marks=marks))
    return params


@pytest.mark.parametrize(
    ("method", "path"),
    _params(APPENDING, {}),
)
def test_appending_operations_take_a_key_and_answer_a_position(
    served: Served, method: str, path: str
) -> None:
    operation = served.document["paths"][path][method.lower()]
    names = {p["name"]: p for p in operation.get("parameters", [])}
    key = names["Idempotency-Key"]
    assert key["in"] == "header" and not key.get("required", False)
    assert key["schema"]["anyOf"][0]["maxLength"] == 255
    success = next(c for c in operation["responses"] if c.startswith("2"))
    body = operation["responses"][success]["content"]["application/json"]["schema"]
    assert "position" in _ref(served.document, body["$ref"])["required"]


@pytest.mark.parametrize(
    ("method", "path"),
    _params(READS, {}),
)
def test_reads_take_after_and_lists_take_cursor_and_limit(
    served: Served, method: str, path: str
) -> None:
    operation = served.document["paths"][path][method.lower()]
    names = {p["name"]: p for p in operation.get("parameters", [])}
    after = names["after"]["schema"]["anyOf"][0]
    assert after["type"] == "integer" and after["minimum"] == 0
    success = operation["responses"]["200"]["content"]["application/json"]["schema"]
    if "items" in _ref(served.document, success["$ref"]).get("properties", {}):
        assert names["limit"]["schema"]["minimum"] == 1
        assert names["limit"]["schema"]["maximum"] == 1000
        assert names["cursor"]["schema"]["anyOf"][0]["maxLength"] == 512


def test_results_batch_and_finding_carry_the_limits(served: Served) -> None:
    document = served.document
    post = document["paths"]["/v1/runs/{run}/results"]["post"]
    body = post["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ResultsBatch")
    batch = _schema(document, "ResultsBatch")
    assert batch["additionalProperties"] is False
    assert batch["required"] == ["results"]
    results = batch["properties"]["results"]
    assert (results["minItems"], results["maxItems"]) == (1, rules.MAX_BATCH)
    finding = _ref(document, results["items"]["$ref"])
    assert finding["additionalProperties"] is False
    assert set(finding["required"]) == set(rules.REQUIRED_FIELDS)
    assert set(finding["properties"]) == set(rules.ALLOWED_FIELDS)
    props = finding["properties"]
    limits = {
        "rule_id": rules.MAX_RULE_ID,
        "title": rules.MAX_TITLE,
        "resource_arn": rules.MAX_RESOURCE_ARN,
        "region": rules.MAX_REGION,
        "message": rules.MAX_MESSAGE,
    }
    for name, limit in limits.items():
        assert props[name]["maxLength"] == limit, name
    assert props["title"]["maxLength"] == 512
    for name in ("rule_id", "title", "resource_arn", "region"):
        assert props[name]["minLength"] == 1, name
    assert props["severity"]["enum"] == list(rules.SEVERITIES)
    assert props["status"]["enum"] == list(rules.STATUSES)
    assert str(rules.MAX_DETAILS_BYTES) in props["details"]["description"]


def test_request_bodies_refuse_unknown_fields_and_carry_limits(served: Served) -> None:
    document = served.document
    expected = {
        "TeamCreate": {"name": MAX_NAME},
        "PlanCreate": {"name": MAX_NAME},
        "RunComplete": {"error": MAX_ERROR},
        "ExclusionCreate": {"reason": MAX_REASON, "ticket": MAX_TICKET},
        "DisplayPurgeCreate": {"reason": MAX_REASON, "older_than": 16},
    }
    for name, limits in expected.items():
        schema = _schema(document, name)
        assert schema["additionalProperties"] is False, name
        for field, limit in limits.items():
            prop = schema["properties"][field]
            options = prop.get("anyOf", [prop])
            assert limit in [o.get("maxLength") for o in options], (name, field)
    status = _schema(document, "RunComplete")["properties"]["status"]
    assert status["enum"] == ["succeeded", "failed"]
    for method, path, operation in _operations(document):
        if method == "POST" and "requestBody" in operation:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            # One model, or a union of models told apart by a discriminator.
            refs = [schema["$ref"]] if "$ref" in schema else [o["$ref"] for o in schema["oneOf"]]
            for ref in refs:
                assert _ref(document, ref)["additionalProperties"] is False, (path, ref)


# ------------------------------------------------------------ schemathesis


@pytest.fixture(scope="module")
def fuzzed(served: Served) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service.api, "WAIT_SECONDS", 0.05)  # after= beyond the head: 503 quickly
        yield schemathesis.openapi.from_asgi("/openapi.json", served.app)


def test_the_fuzzed_operations_are_all_the_operations(served: Served) -> None:
    assert set(OPERATIONS) == {(m, p) for m, p, _ in _operations(served.document)}


def _valid_body(method: str, path: str, ids: dict[str, str]) -> Any:
    """A body the API accepts, so generated cases also reach the success answers."""
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/v1/plans"): {
            "team_id": ids["team"],
            "account_id": ids["account"],
            "name": "fuzzed",
        },
        ("POST", "/v1/runs/{run}/results"): {"results": list(findings(3, seed=9))},
        ("POST", "/v1/teams"): {"name": "fuzzed"},
        ("POST", "/v1/display-purges"): {"older_than": "30d"},
        ("POST", "/v1/restore-drills"): {},  # the latest backup
        ("POST", "/v1/teams/{team}/accounts"): {
            "method": "role",
            "role_arn": "arn:aws:iam::123456789012:role/fuzzed",
        },
    }
    return bodies.get((method, path))


OPS_ONLY = {"/v1/teams", "/v1/restore-drills"}


CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_finds_nothing(served: Served, fuzzed: Any, method: str, path: str) -> None:
    operation = fuzzed[path][method]
    names = re.findall(r"{(\w+)}", path)
    # DELETE unlinks: it gets an account of its own, so plans can still be made on the other.
    real = {name: served.ids["doomed" if method == "DELETE" else name] for name in names}
    tokens = st.sampled_from([served.ops, served.team])
    generated = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if names:
        generated.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
    cases = [st.tuples(strategy, tokens) for strategy in generated]
    body = _valid_body(method, path, served.ids)
    if body is not None:
        valid = operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real, body=body)
        token = served.ops if path in OPS_ONLY else served.team
        cases.append(st.tuples(valid, st.just(token)))
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=st.one_of(cases))
    def check(drawn: tuple[Any, str]) -> None:
        case, token = drawn
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        statuses.append(response.status_code)
        if response.status_code >= 500:
            # The one documented 5xx: a read naming a position the views have not reached.
            assert response.status_code == 503, (response.status_code, case.as_curl_command())
            assert "retry-after" in response.headers, case.as_curl_command()
            assert "views-behind" in response.text or path == "/readyz", response.text
        case.validate_response(response, checks=CHECKS)

    check()
    assert statuses, "schemathesis sent nothing"
    if path.startswith("/v1/"):
        # The generated requests reached the handlers, not only the token check.
        assert {code for code in statuses if code not in (401, 403)}, (path, statuses)
    if body is not None or (method == "GET" and names):
        assert any(200 <= code < 300 for code in statuses), (path, sorted(set(statuses)))


def test_schemathesis_reaches_success_answers(served: Served) -> None:
    """The valid-body strategies do land: the run now holds fuzzed batches."""
    served.runtime.projector.catch_up()
    view = served.runtime.queries.get_run(None, served.ids["run"])
    assert view["total"] > 20, "no generated batch was accepted"
    other = str(uuid.uuid4())
    with TestClient(served.app) as client:
        missing = client.get(
            f"/v1/runs/{other}", headers={"Authorization": f"Bearer {served.team}"}
        )
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM


def test_schemathesis_ran_passing_restore_drills(served: Served) -> None:
    """The valid drill requests ran real drills of real backups, and they passed."""
    runtime = served.runtime
    runtime.projector.catch_up()
    drills = runtime.queries.list_drills(None, 1000).items
    backups = set(Backups.open(runtime).catalog.ids())
    assert served.backup in backups
    passed = [item for item in drills if item["passed"]]
    assert passed, sorted({item["reason"] for item in drills})
    for item in passed:
        assert item["backup_id"] in backups
        assert item["report"]["events_restored"] > 0
        assert item["report"]["mismatches"] == []
    # Every drill the fuzzer asked for was recorded, and none failed for want of a real cause.
    assert all(item["reason"] for item in drills if not item["passed"])
