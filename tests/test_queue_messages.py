"""The queue message format (docs/queue-ingest.md), without a queue: parse and the builders."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from service import queue_messages as qm
from service.queue_messages import (
    ATTRIBUTE_ALLOWANCE,
    COMMANDS,
    END_STATES,
    MAX_MESSAGE_BYTES,
    Envelope,
    MessageRefused,
    parse,
)

LIMIT = MAX_MESSAGE_BYTES - ATTRIBUTE_ALLOWANCE  # what a sender may put in one body
BEARER = "Bearer rsvc_abc_secret"
TEAM = UUID("0d6c7c1e-2f1b-4a8e-9d55-0a6f3b1c2d3e")
RUN = UUID("7f3e0c2a-5b6d-4e8f-9a1b-2c3d4e5f6a7b")
PLAN = UUID("11111111-2222-4333-8444-555555555555")
FINDING = {
    "rule_id": "s3.public",
    "title": "Bucket is public",
    "severity": "high",
    "status": "FAIL",
    "resource_arn": "arn:aws:s3:::logs",
    "region": "eu-west-1",
    "message": "public read ACL",
    "observed_at": "2026-11-29T20:00:00Z",
}

keys = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255
)
prefixes = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200
)
# Long strings cheaply: a short piece repeated, capped so that one finding (at most
# four values of at most 10,000 characters, 6 bytes each once JSON-escaped) fits a body.
long_text = st.builds(
    lambda piece, times: (piece * times)[:10_000],
    st.text(min_size=1, max_size=8),
    st.integers(min_value=0, max_value=50) | st.integers(min_value=1_000, max_value=10_000),
)
finding_dicts = st.dictionaries(
    st.sampled_from(["rule_id", "title", "message", "région", "\u2603"]), long_text, max_size=4
)
# Short lists, and lists long enough (with long texts) to need several bodies.
findings_lists = st.lists(finding_dicts, max_size=6) | st.lists(
    finding_dicts, min_size=20, max_size=60
)
batch_sizes = st.integers(min_value=1, max_value=10) | st.integers(min_value=500, max_value=1000)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)
ALL_FIELDS = [
    *("schema", "team_id", "idempotency_key", "command"),
    *("plan_id", "run_id", "results", "status", "error"),
]
# Values that are often right, so the fuzzing reaches the checks after the first one.
plausible = {
    "schema": st.sampled_from([1, 2, 0, "1", None]) | json_values,
    "team_id": st.uuids().map(str) | json_values,
    "idempotency_key": keys | json_values,
    "command": st.sampled_from([*COMMANDS, "delete_run", ""]) | json_values,
    "plan_id": st.uuids().map(str) | json_values,
    "run_id": st.uuids().map(str) | json_values,
    "results": st.lists(st.just(FINDING), max_size=2) | json_values,
    "status": st.sampled_from([*END_STATES, "running"]) | json_values,
    "error": st.text(max_size=30) | json_values,
}
envelopes = st.fixed_dictionaries({}, optional=plausible)


def envelope(kind: str = "record_results", /, **changes: Any) -> dict[str, Any]:
    """A valid envelope of command ``kind``; ``changes`` replace fields, ``...`` drops one."""
    body: dict[str, Any] = {
        "schema": 1,
        "team_id": str(TEAM),
        "idempotency_key": "run-7f3e/3",
        "command": kind,
        "run_id": str(RUN),
    }
    body |= {
        "start_run": {"plan_id": str(PLAN)},
        "record_results": {"results": [FINDING]},
        "complete_run": {"status": "failed", "error": "scanner crashed"},
    }[kind]
    for name, value in changes.items():
        if value is ...:
            body.pop(name, None)
        else:
            body[name] = value
    return body


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with one field dropped, replaced or added: every check gets reached."""
    body = envelope(draw(st.sampled_from(COMMANDS)))
    name = draw(st.sampled_from([*ALL_FIELDS, "extra"]))
    if draw(st.booleans()):
        body.pop(name, None)
    else:
        body[name] = draw(plausible.get(name, json_values))
    return body


def refused(body: str | bytes, token: str | None = BEARER) -> MessageRefused:
    with pytest.raises(MessageRefused) as caught:
        parse(body, token)
    return caught.value


# ------------------------------------------------------------------ builders


@given(team=st.uuids(), plan=st.uuids(), run=st.uuids(), key=keys)
def test_start_run_parses_back_to_its_fields(team: UUID, plan: UUID, run: UUID, key: str) -> None:
    parsed, bearer = parse(qm.start_run(team, plan, run, key), BEARER)
    assert parsed == Envelope(
        team_id=team, idempotency_key=key, command="start_run", run_id=run, plan_id=plan
    )
    assert bearer == "rsvc_abc_secret"


@given(
    team=st.uuids(),
    run=st.uuids(),
    key=keys,
    status=st.sampled_from(END_STATES),
    error=st.none() | st.text(max_size=300),
)
def test_complete_run_parses_back_to_its_fields(
    team: UUID, run: UUID, key: str, status: str, error: str | None
) -> None:
    parsed, _ = parse(qm.complete_run(team, run, key, status, error), BEARER)
    assert parsed == Envelope(
        team_id=team,
        idempotency_key=key,
        command="complete_run",
        run_id=run,
        status=status,
        error=error,
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    team=st.uuids(),
    run=st.uuids(),
    results=findings_lists,
    prefix=prefixes,
    max_batch=batch_sizes,
)
@example(team=TEAM, run=RUN, results=[FINDING] * 1000, prefix="p", max_batch=1000)
@example(
    team=TEAM,
    run=RUN,
    results=[{"message": "\U0001f512" * 9_000} for _ in range(12)],  # 36 KB each in UTF-8
    prefix="p",
    max_batch=1000,
)
def test_record_results_splits_any_batch_into_bodies_that_fit_in_order(
    team: UUID, run: UUID, results: list[dict[str, str]], prefix: str, max_batch: int
) -> None:
    bodies = list(qm.record_results(team, run, results, prefix, max_batch))

    event(f"bodies: {min(len(bodies), 4)}, split: {len(bodies) > -(-len(results) // max_batch)}")
    sizes = [len(body.encode("utf-8")) for body in bodies]
    assert all(size <= LIMIT for size in sizes), max(sizes)
    parsed = [parse(body, BEARER)[0] for body in bodies]
    assert [p.idempotency_key for p in parsed] == [
        f"{prefix}/{n}" for n in range(1, len(bodies) + 1)
    ]
    assert len({p.idempotency_key for p in parsed}) == len(bodies)
    assert all(p.command == "record_results" and p.team_id == team for p in parsed)
    assert all(p.run_id == run for p in parsed)
    assert all(1 <= len(p.results) <= max_batch for p in parsed)
    assert [finding for p in parsed for finding in p.results] == results


def test_record_results_halves_a_full_batch_that_does_not_fit() -> None:
    big = dict(FINDING, message="x" * 700)  # about 900 bytes: 250 fit in a body, 500 do not
    bodies = list(qm.record_results(TEAM, RUN, [big] * 1000, "k", 1000))
    assert [len(json.loads(body)["results"]) for body in bodies] == [250, 250, 250, 250]


def test_record_results_refuses_one_finding_larger_than_a_message() -> None:
    huge = dict(FINDING, message="é" * (LIMIT // 2))  # 2 bytes each: over the limit alone
    with pytest.raises(MessageRefused) as caught:
        list(qm.record_results(TEAM, RUN, [FINDING, huge], "k", 1000))
    assert caught.value.field == "results"


# ------------------------------------------------------------------ parse: only refusals


@given(raw=st.binary(max_size=400))
@example(raw=b"\xff\xfe{\x00}\x00")
@example(raw=b"[" * 100_000)
@example(raw=b"1" * 5_000)
def test_parse_refuses_arbitrary_bytes_with_message_refused(raw: bytes) -> None:
    try:
        parse(raw, BEARER)
    except MessageRefused as refusal:
        assert refusal.field and refusal.rule
        assert str(refusal) == f"{refusal.field}: {refusal.rule}"


@given(text=st.text(max_size=400), token=st.none() | st.text(max_size=30))
@example(text="{" * 50_000, token=BEARER)
def test_parse_refuses_arbitrary_text_with_message_refused(text: str, token: str | None) -> None:
    try:
        parse(text, token)
    except MessageRefused as refusal:
        assert refusal.field and refusal.rule


@settings(max_examples=200, deadline=None)
@given(
    data=json_values | envelopes | mutated_envelopes(),
    extra=st.dictionaries(st.text(max_size=8), json_values),
)
def test_parse_of_any_json_is_an_envelope_or_a_refusal(data: Any, extra: dict[str, Any]) -> None:
    if isinstance(data, dict) and extra:
        data = {**extra, **data}
    try:
        parsed, bearer = parse(json.dumps(data), BEARER)
    except MessageRefused as refusal:
        # A refusal names a field of the message, a documented field, or the body.
        named = set(data) if isinstance(data, dict) else set()
        assert refusal.field in named | set(ALL_FIELDS) | {"body"}, refusal
        assert refusal.rule
        return
    # What parse lets through keeps the documented rules.
    assert bearer == "rsvc_abc_secret"
    assert parsed.command in COMMANDS and parsed.command == data["command"]
    assert (
        set(data)
        <= {"schema", "team_id", "idempotency_key", "command"}
        | {
            "start_run": {"plan_id", "run_id"},
            "record_results": {"run_id", "results"},
            "complete_run": {"run_id", "status", "error"},
        }[parsed.command]
    )
    assert parsed.team_id == UUID(data["team_id"]) and parsed.run_id == UUID(data["run_id"])
    assert parsed.idempotency_key == data["idempotency_key"]
    assert 1 <= len(parsed.idempotency_key) <= 255 and parsed.idempotency_key.isascii()
    if parsed.command == "complete_run":
        assert parsed.status in END_STATES
        assert parsed.error is None or isinstance(parsed.error, str)
    if parsed.command == "start_run":
        assert parsed.plan_id == UUID(data["plan_id"])
    if parsed.command == "record_results":
        assert parsed.results == data["results"]


# ------------------------------------------------------------------ parse: which field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (envelope(schema=2), "schema"),
        (envelope(schema="1"), "schema"),
        (envelope(schema=...), "schema"),
        (envelope(command="delete_run"), "command"),
        (envelope(command=...), "command"),
        (envelope(colour="blue"), "colour"),
        (envelope(status="failed"), "status"),  # a field of another command
        (envelope("start_run", results=[FINDING]), "results"),
        (envelope(results=...), "results"),
        (envelope(idempotency_key=...), "idempotency_key"),
        (envelope(team_id=...), "team_id"),
        (envelope("start_run", plan_id=...), "plan_id"),
        (envelope("complete_run", status=...), "status"),
        (envelope(team_id="not-a-uuid"), "team_id"),
        (envelope(team_id=7), "team_id"),
        (envelope(run_id="7f3e"), "run_id"),
        (envelope(run_id=None), "run_id"),
        (envelope("start_run", plan_id=["x"]), "plan_id"),
        (envelope(idempotency_key=""), "idempotency_key"),
        (envelope(idempotency_key="has space"), "idempotency_key"),
        (envelope(idempotency_key="k" * 256), "idempotency_key"),
        (envelope(idempotency_key="clé"), "idempotency_key"),
        (envelope(idempotency_key=5), "idempotency_key"),
        (envelope("complete_run", status="done"), "status"),
        (envelope("complete_run", status="running"), "status"),
        (envelope("complete_run", error=42), "error"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert refused(json.dumps(body)).field == field


@pytest.mark.parametrize("token", [None, "", "rsvc_abc_secret", "Token rsvc_abc_secret"])
def test_a_missing_or_malformed_token_is_refused_first(token: str | None) -> None:
    refusal = refused("not even JSON", token)
    assert refusal.field == "Authorization"


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b"{not json", "body"), (b"[1, 2]", "body"), (b'"envelope"', "body"), (b"", "body")],
)
def test_bodies_that_are_not_an_envelope_are_refused(raw: bytes, field: str) -> None:
    assert refused(raw).field == field


def test_a_body_over_256_kib_is_refused_and_one_at_the_limit_is_not() -> None:
    body = envelope(results=[dict(FINDING, message="")])
    framing = len(json.dumps(body).encode())
    body["results"][0]["message"] = "m" * (MAX_MESSAGE_BYTES - framing)
    at_limit = json.dumps(body)
    assert len(at_limit.encode()) == MAX_MESSAGE_BYTES
    parsed, _ = parse(at_limit, BEARER)
    assert parsed.results == body["results"]

    body["results"][0]["message"] += "m"
    over = json.dumps(body)
    assert len(over.encode()) == MAX_MESSAGE_BYTES + 1
    refusal = refused(over)
    assert refusal.field == "body"
    assert str(MAX_MESSAGE_BYTES) in refusal.rule


def test_a_valid_envelope_of_each_command_parses() -> None:
    for command in COMMANDS:
        parsed, _ = parse(json.dumps(envelope(command)), BEARER)
        assert parsed.command == command and parsed.run_id == RUN and parsed.team_id == TEAM
    assert parse(json.dumps(envelope("start_run")), BEARER)[0].plan_id == PLAN


@pytest.mark.parametrize(
    "schema",
    [
        True,
        1.0,
    ],
)
def test_schema_must_be_the_integer_1(schema: Any) -> None:
    assert refused(json.dumps(envelope(schema=schema))).field == "schema"


def test_a_text_body_that_is_not_unicode_is_refused() -> None:
    refusal = refused('{"schema": 1, "x": "\ud800"}')
    assert refusal.field == "body"
