"""Validation of results batches: the one gate between other services and years of events.

A batch is accepted whole or refused whole, and a refusal must name the exact
field that broke a rule, so the sending service can fix it without guessing.
What is accepted must be normalised once and for all: validating it again
changes nothing, so readers, projections and backups all see the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import InvalidInput
from domain.findings import (
    MAX_BATCH,
    MAX_DETAILS_BYTES,
    MAX_MESSAGE,
    MAX_REGION,
    MAX_RESOURCE_ARN,
    MAX_RULE_ID,
    MAX_TITLE,
    REQUIRED_FIELDS,
    SEVERITIES,
    STATUSES,
    validate_batch,
)

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT_LIMITS: dict[str, int] = {
    "rule_id": MAX_RULE_ID,
    "title": MAX_TITLE,
    "resource_arn": MAX_RESOURCE_ARN,
    "region": MAX_REGION,
    "message": MAX_MESSAGE,
}

# ------------------------------------------------------------------ strategies

# Text that is fine anywhere: no NUL, no lone surrogates.
_CHARS = st.characters(codec="utf-8", exclude_characters="\x00")


def _text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(_CHARS, min_size=min_size, max_size=max_size)


_json_text = _text(0, 16)


def _not_envelope(value: dict[str, Any]) -> bool:
    # {"_type_": ..., "_data_": ...} is the event store's own encoding of
    # custom types; such details are covered in tests/test_domain.py.
    return set(value) != {"_type_", "_data_"}


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _json_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(_json_text, children, max_size=4).filter(_not_envelope)
    ),
    max_leaves=12,
)
json_objects: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    _json_text, json_values, max_size=5
).filter(_not_envelope)

# Years kept inside datetime's range once shifted to UTC; the edges are
# covered by test_observed_at_at_the_edge_of_time_is_refused_cleanly.
aware_datetimes: st.SearchStrategy[datetime] = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 12, 30),
    timezones=st.builds(
        timezone,
        st.integers(min_value=-23 * 60 + 1, max_value=23 * 60 - 1).map(
            lambda minutes: timedelta(minutes=minutes)
        ),
    )
    | st.just(UTC),
)
observed_ats: st.SearchStrategy[object] = (
    aware_datetimes
    | aware_datetimes.map(lambda moment: moment.isoformat())
    | aware_datetimes.map(lambda moment: moment.astimezone(UTC).isoformat().replace("+00:00", "Z"))
)


@st.composite
def findings(draw: st.DrawFn) -> dict[str, Any]:
    """A valid finding, as another service may send it (not yet normalised)."""
    finding: dict[str, Any] = {
        "rule_id": draw(_text(1, 40)),
        "title": draw(_text(1, 60)),
        "severity": draw(st.sampled_from(SEVERITIES)),
        "status": draw(st.sampled_from(STATUSES)),
        "resource_arn": draw(_text(1, 80)),
        "region": draw(_text(1, MAX_REGION)),
        "message": draw(_text(0, 120)),
        "observed_at": draw(observed_ats),
    }
    details = draw(st.none() | json_objects | st.just("absent"))
    if details != "absent":
        finding["details"] = details
    if draw(st.booleans()):  # field order must not matter
        finding = dict(reversed(list(finding.items())))
    return finding


batches = st.lists(findings(), min_size=1, max_size=6)


def valid_finding(**changes: Any) -> dict[str, Any]:
    """A plain valid finding, with some fields changed."""
    finding: dict[str, Any] = {
        "rule_id": "iam.root-mfa",
        "title": "Root account has no MFA",
        "severity": "critical",
        "status": "FAIL",
        "resource_arn": "arn:aws:iam::123456789012:root",
        "region": "eu-west-1",
        "message": "MFA is not enabled for the root user",
        "observed_at": "2024-05-01T12:00:00Z",
        "details": {"checked": ["mfa"], "score": 1.5},
    }
    finding.update(changes)
    return finding


def refusal(results: object) -> InvalidInput:
    """Validate and return the refusal, failing the test when there is none."""
    with pytest.raises(InvalidInput) as caught:
        validate_batch(results)
    error = caught.value
    assert error.rule, "a refusal must say which rule was broken"
    assert str(error) == f"{error.field}: {error.rule}"
    return error


# ------------------------------------------------------------ valid batches


@PROPERTY
@given(batches)
def test_valid_batches_validate_and_normalise_idempotently(batch: list[dict[str, Any]]) -> None:
    """Normalised output is a fixed point: storing it and validating again changes nothing."""
    once = validate_batch(batch)
    assert len(once) == len(batch)
    twice = validate_batch(once)
    assert twice == once
    for given_finding, stored in zip(batch, once, strict=True):
        expected_order = [*REQUIRED_FIELDS]
        if given_finding.get("details") is not None:
            expected_order.append("details")
        assert list(stored) == expected_order
        assert stored["observed_at"].endswith("Z")
        assert datetime.fromisoformat(stored["observed_at"]) == _as_datetime(
            given_finding["observed_at"]
        )
        # What is stored is plain JSON: it survives a JSON round trip unchanged.
        assert json.loads(json.dumps(stored, ensure_ascii=False)) == stored


def _as_datetime(value: object) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def test_normalisation_of_a_known_finding() -> None:
    """Pins the normal form: UTC with Z, fixed field order, details as JSON, None dropped."""
    given_finding = valid_finding(
        observed_at="2024-05-01T14:30:00+02:30",
        details={"ids": (1, 2), "n": None},
    )
    given_finding = dict(reversed(list(given_finding.items())))
    [stored] = validate_batch([given_finding])
    assert stored == {
        "rule_id": "iam.root-mfa",
        "title": "Root account has no MFA",
        "severity": "critical",
        "status": "FAIL",
        "resource_arn": "arn:aws:iam::123456789012:root",
        "region": "eu-west-1",
        "message": "MFA is not enabled for the root user",
        "observed_at": "2024-05-01T12:00:00Z",
        "details": {"ids": [1, 2], "n": None},
    }
    assert list(stored) == [*REQUIRED_FIELDS, "details"]
    [without] = validate_batch([valid_finding(details=None)])
    assert "details" not in without


def test_aware_datetime_objects_are_accepted_and_stored_as_utc_strings() -> None:
    """Python callers may pass datetimes; the stored form is always the same string."""
    moment = datetime(2024, 5, 1, 7, 0, tzinfo=timezone(timedelta(hours=-5)))
    [stored] = validate_batch([valid_finding(observed_at=moment)])
    assert stored["observed_at"] == "2024-05-01T12:00:00Z"


def test_a_tuple_batch_is_accepted() -> None:
    """Any sequence of findings will do, not just a list."""
    assert validate_batch((valid_finding(),)) == validate_batch([valid_finding()])


# --------------------------------------------------------------- batch size


@pytest.mark.parametrize("size", [1, MAX_BATCH])
def test_batch_sizes_at_the_limits_are_accepted(size: int) -> None:
    """1 and 1000 results are the smallest and largest batches the service takes."""
    assert len(validate_batch([valid_finding()] * size)) == size


@pytest.mark.parametrize("size", [0, MAX_BATCH + 1])
def test_batch_sizes_beyond_the_limits_are_refused(size: int) -> None:
    """Empty batches are pointless and oversized ones are refused whole, not truncated."""
    error = refusal([valid_finding()] * size)
    assert error.field == "results"
    assert str(size) in error.rule


@pytest.mark.parametrize("results", [None, "abc", b"abc", {"results": []}, 42, valid_finding()])
def test_a_batch_that_is_not_a_list_is_refused(results: object) -> None:
    """A string or a lone object is not a list of results, even though some are iterable."""
    assert refusal(results).field == "results"


# ---------------------------------------------------------- text field limits


@pytest.mark.parametrize("name", sorted(TEXT_LIMITS))
@pytest.mark.parametrize("char", ["a", "é", "😀"])
def test_text_at_exactly_the_limit_is_accepted(name: str, char: str) -> None:
    """Limits count characters, not bytes: a 4-byte emoji counts as one."""
    value = char * TEXT_LIMITS[name]
    [stored] = validate_batch([valid_finding(**{name: value})])
    assert stored[name] == value


@pytest.mark.parametrize("name", sorted(TEXT_LIMITS))
@pytest.mark.parametrize("index", [0, 3])
def test_text_one_over_the_limit_is_refused(name: str, index: int) -> None:
    """Limit + 1 characters is refused, naming the field of the offending result."""
    batch = [valid_finding() for _ in range(5)]
    batch[index][name] = "a" * (TEXT_LIMITS[name] + 1)
    error = refusal(batch)
    assert error.field == f"results[{index}].{name}"
    assert str(TEXT_LIMITS[name]) in error.rule


def test_limits_are_the_documented_ones() -> None:
    """The limits are a promise to other services; changing them is a contract change."""
    assert (MAX_RESOURCE_ARN, MAX_MESSAGE, MAX_TITLE) == (2048, 4096, 512)
    assert MAX_DETAILS_BYTES == 16 * 1024
    assert MAX_BATCH == 1000


def test_message_may_be_empty_but_other_text_may_not() -> None:
    """An empty message is a PASS with nothing to say; an empty title or rule id is a bug."""
    assert validate_batch([valid_finding(message="")])[0]["message"] == ""
    for name in ("rule_id", "title", "resource_arn", "region"):
        assert refusal([valid_finding(**{name: ""})]).field == f"results[0].{name}"


# ------------------------------------------------------------------ details


def _details_of_size(size: int, char: str = "x") -> dict[str, str]:
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")).encode())
    width = len(char.encode())
    assert (size - overhead) % width == 0
    details = {"k": char * ((size - overhead) // width)}
    assert len(json.dumps(details, ensure_ascii=False, separators=(",", ":")).encode()) == size
    return details


@pytest.mark.parametrize("char", ["x", "é"])
def test_details_of_exactly_16_kib_are_accepted(char: str) -> None:
    """16 KiB of compact UTF-8 JSON is the most a finding may carry."""
    details = _details_of_size(MAX_DETAILS_BYTES, char)
    assert validate_batch([valid_finding(details=details)])[0]["details"] == details


@pytest.mark.parametrize("char", ["x", "é"])
def test_details_over_16_kib_are_refused(char: str) -> None:
    """The limit counts UTF-8 bytes: 8,189 two-byte characters are too many."""
    size = MAX_DETAILS_BYTES + len(char.encode())
    error = refusal([valid_finding(), valid_finding(details=_details_of_size(size, char))])
    assert error.field == "results[1].details"
    assert str(size) in error.rule


# --------------------------------------------------------- one broken field

Breaker = Callable[[dict[str, Any]], str]


def _set(name: str, value: object) -> Breaker:
    def breaker(finding: dict[str, Any]) -> str:
        finding[name] = value
        return name

    breaker.__name__ = f"{name}={value!r:.40}"
    return breaker


def _delete(name: str) -> Breaker:
    def breaker(finding: dict[str, Any]) -> str:
        finding.pop(name)
        return name

    breaker.__name__ = f"without {name}"
    return breaker


def _breakers() -> list[Breaker]:
    breakers: list[Breaker] = []
    for name in ("severity", "status"):
        breakers += [
            _set(name, "bogus"),
            _set(name, "HIGH" if name == "severity" else "fail"),
            _set(name, ""),
            _set(name, 3),
            _set(name, None),
            _set(name, ["high"]),
        ]
    for name, limit in TEXT_LIMITS.items():
        breakers += [
            _set(name, "a" * (limit + 1)),
            _set(name, 17),
            _set(name, None),
            _set(name, b"bytes"),
            _set(name, ["a"]),
            _set(name, "a\x00b"),
            _set(name, "a\ud800b"),
            _set(name, "\udfff"),
        ]
    breakers += [
        _set("observed_at", "2024-05-01T12:00:00"),  # naive
        _set("observed_at", datetime(2024, 5, 1, 12, 0)),  # naive
        _set("observed_at", "yesterday"),
        _set("observed_at", ""),
        _set("observed_at", 1714564800),
        _set("observed_at", None),
        _set("observed_at", "2024-05-01T12:00:00Z" + " " * 60),  # too long to parse
        _set("details", []),
        _set("details", "{}"),
        _set("details", 0),
        _set("details", True),
        _set("details", {"k": "x" * MAX_DETAILS_BYTES}),
        _set("details", {"k": "a\x00b"}),
        _set("details", {"a\x00": 1}),
        _set("details", {"k": "\ud800"}),
        _set("details", {"\udc00": 1}),
        _set("details", {"k": math.nan}),
        _set("details", {"k": math.inf}),
        _set("details", {"k": {1, 2}}),
        _set("details", {"k": b"bytes"}),
        _set("details", {(1, 2): "tuple key"}),
        _set("unexpected", 1),
        _set("Severity", "high"),
        _set("team_id", "someone-else"),
    ]
    breakers += [_delete(name) for name in REQUIRED_FIELDS]
    return breakers


BREAKERS = _breakers()


@PROPERTY
@given(batch=batches, data=st.data())
def test_any_single_broken_field_is_refused_naming_exactly_that_field(
    batch: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Whatever else a batch holds, the refusal points at the one broken field."""
    index = data.draw(st.integers(min_value=0, max_value=len(batch) - 1), label="index")
    breaker = data.draw(st.sampled_from(BREAKERS), label="breaker")
    broken = [dict(finding) for finding in batch]
    name = breaker(broken[index])
    error = refusal(broken)
    assert error.field == f"results[{index}].{name}"


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda breaker: breaker.__name__)
def test_every_breaker_is_refused_at_the_fourth_result(breaker: Breaker) -> None:
    """Every kind of breakage, deterministically, at results[3] of a 5-result batch."""
    batch = [valid_finding() for _ in range(5)]
    name = breaker(batch[3])
    assert refusal(batch).field == f"results[3].{name}"


@pytest.mark.parametrize("item", [None, "finding", 3, ["rule_id", "x"]])
def test_a_result_that_is_not_an_object_is_refused(item: object) -> None:
    """The field is the result itself when it is not an object at all."""
    assert refusal([valid_finding(), valid_finding(), item]).field == "results[2]"


def test_only_the_first_broken_result_is_reported() -> None:
    """Refusals are deterministic: the lowest index wins."""
    batch = [valid_finding() for _ in range(6)]
    batch[4]["severity"] = "bogus"
    batch[2]["title"] = ""
    assert refusal(batch).field == "results[2].title"


# ------------------------------------------------ edges once found to be broken


@pytest.mark.parametrize(
    "observed_at",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_observed_at_at_the_edge_of_time_is_refused_cleanly(observed_at: object) -> None:
    """Garbage dates from another service must be a 400, not an unhandled OverflowError."""
    assert refusal([valid_finding(observed_at=observed_at)]).field == "results[0].observed_at"


@pytest.mark.parametrize(
    "observed_at",
    ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "0001-01-01T00:30:00+00:30"],
)
def test_observed_at_at_the_edge_of_time_is_accepted_when_it_fits(observed_at: str) -> None:
    """The whole range of UTC instants is valid; only shifts beyond it are refused."""
    [stored] = validate_batch([valid_finding(observed_at=observed_at)])
    assert datetime.fromisoformat(stored["observed_at"]) == datetime.fromisoformat(observed_at)


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("\\u0000", True),  # backslash, 'u0000': no NUL
        ("\\\\u0000", True),  # two backslashes, 'u0000'
        ("C:\\u0000\\file", True),
        ("\\\x00", False),  # backslash, NUL
        ("\x00", False),
        ("a\x00", False),
    ],
)
def test_details_nul_check_reads_json_escapes_correctly(text: str, accepted: bool) -> None:
    """Only a real NUL is refused; text that merely spells the escape is legitimate."""
    for details in ({"k": text}, {text: 1}, {"k": [{"deep": text}]}):
        batch = [valid_finding(details=details)]
        if accepted:
            assert validate_batch(batch)[0]["details"] == details
        else:
            assert refusal(batch).field == "results[0].details"


@PROPERTY
@given(st.dictionaries(st.text("\\u0\x00a", max_size=10), st.text("\\u0\x00a", max_size=10)))
def test_details_are_refused_exactly_when_they_hold_a_nul(details: dict[str, str]) -> None:
    """Backslashes, 'u' and zeros in any arrangement: refused if and only if a NUL is present."""
    has_nul = any("\x00" in key or "\x00" in value for key, value in details.items())
    batch = [valid_finding(details=details)]
    if has_nul:
        assert refusal(batch).field == "results[0].details"
    else:
        assert validate_batch(batch)[0]["details"] == details
