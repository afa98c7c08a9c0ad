"""Role ARNs and durations: the two small languages operators and customers type in.

A role ARN is the only handle the service keeps on a customer's account, and
the AWS account id is read from it, so parsing must be exact. Durations drive
retention promises ("kept no longer than"), so their spelling must round-trip.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.arn import parse_role_arn
from domain.durations import format_duration, parse_duration
from domain.errors import InvalidInput

PROPERTY = settings(max_examples=150, deadline=None)

# ------------------------------------------------------------------ role ARNs

_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+=,.@_-"
_PATH_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "/")

account_ids = st.text("0123456789", min_size=12, max_size=12)
role_names = st.text(_NAME_CHARS, min_size=1, max_size=64)


@st.composite
def role_paths(draw: st.DrawFn) -> str:
    """``/`` or ``/seg/.../`` of printable ASCII, at most 512 characters in all."""
    segments = draw(st.lists(st.text(_PATH_CHARS, min_size=1, max_size=40), max_size=8))
    path = "/" + "".join(f"{segment}/" for segment in segments)
    return path[:511] + "/" if len(path) > 512 else path


@PROPERTY
@given(account=account_ids, path=role_paths(), name=role_names)
def test_valid_role_arns_parse_into_their_parts(account: str, path: str, name: str) -> None:
    """Any IAM-valid role ARN is accepted and the account id comes from the ARN itself."""
    arn = f"arn:aws:iam::{account}:role{path}{name}"
    parsed = parse_role_arn(arn)
    assert parsed.arn == arn
    assert parsed.aws_account_id == account
    assert parsed.path == path
    assert parsed.name == name


@pytest.mark.parametrize(
    ("arn", "account", "path", "name"),
    [
        ("arn:aws:iam::123456789012:role/Audit", "123456789012", "/", "Audit"),
        ("arn:aws:iam::000000000000:role/a/b/Audit", "000000000000", "/a/b/", "Audit"),
        (
            "arn:aws:iam::210987654321:role/service-role/x+=,.@_-y",
            "210987654321",
            "/service-role/",
            "x+=,.@_-y",
        ),
        ("arn:aws:iam::123456789012:role/" + "n" * 64, "123456789012", "/", "n" * 64),
        (
            "arn:aws:iam::123456789012:role/" + "p" * 510 + "/r",
            "123456789012",
            "/" + "p" * 510 + "/",
            "r",
        ),
    ],
)
def test_role_arn_examples(arn: str, account: str, path: str, name: str) -> None:
    """Paths ``/`` and ``/a/b/``, the longest name and the longest path."""
    parsed = parse_role_arn(arn)
    assert (parsed.aws_account_id, parsed.path, parsed.name) == (account, path, name)


BAD_ARNS = [
    "",
    "arn:aws:iam::123456789012:role/",  # no name
    "arn:aws:iam::123456789012:role",
    "arn:aws:iam::123456789012:role/a/b/",  # path but no name
    "arn:azure:iam::123456789012:role/Audit",  # partition
    "arn:AWS:iam::123456789012:role/Audit",
    "arn:aws:sts::123456789012:role/Audit",  # service
    "arn:aws:s3::123456789012:role/Audit",
    "arn:aws:iam::123456789012:user/Audit",  # resource type
    "arn:aws:iam::123456789012:assumed-role/Audit/session",
    "arn:aws:iam::123456789012:root",
    "arn:aws:iam::12345678901:role/Audit",  # 11 digits
    "arn:aws:iam::1234567890123:role/Audit",  # 13 digits
    "arn:aws:iam::12345678901a:role/Audit",
    "arn:aws:iam:eu-west-1:123456789012:role/Audit",  # IAM has no region
    "arn:aws:iam::123456789012:role/" + "n" * 65,  # name too long
    "arn:aws:iam::123456789012:role/" + "p" * 511 + "/r",  # path too long
    "arn:aws:iam::123456789012:role//Audit",  # empty path segment
    "arn:aws:iam::123456789012:role/a//Audit",
    "arn:aws:iam::123456789012:role/Au dit",
    "arn:aws:iam::123456789012:role/Audit\n",
    " arn:aws:iam::123456789012:role/Audit",
    "arn:aws:iam::123456789012:role/Audit*",
    # fullwidth digits: \d would match them, [0-9] must not
    "arn:aws:iam::" + "".join(chr(0xFF10 + int(c)) for c in "123456789012") + ":role/Audit",
]


@pytest.mark.parametrize("arn", BAD_ARNS)
def test_bad_role_arns_are_refused_naming_role_arn(arn: str) -> None:
    """Anything but an IAM role ARN is refused before it reaches an event."""
    with pytest.raises(InvalidInput) as caught:
        parse_role_arn(arn)
    assert caught.value.field == "role_arn"
    assert caught.value.rule


@pytest.mark.parametrize("value", [None, 123456789012, b"arn:aws:iam::123456789012:role/A", []])
def test_non_string_role_arns_are_refused(value: object) -> None:
    """JSON bodies may carry any type; only strings are ARNs."""
    with pytest.raises(InvalidInput) as caught:
        parse_role_arn(value)
    assert caught.value.field == "role_arn"


def test_the_field_name_in_refusals_can_be_chosen() -> None:
    """Callers validating nested bodies name the field where the ARN came from."""
    with pytest.raises(InvalidInput) as caught:
        parse_role_arn("nope", field="link.role_arn")
    assert caught.value.field == "link.role_arn"


@PROPERTY
@given(account=st.text("0123456789", min_size=0, max_size=20), name=role_names)
def test_only_twelve_digit_accounts_are_accepted(account: str, name: str) -> None:
    """Account ids are exactly 12 digits; 11 or 13 are typos that would link the wrong account."""
    arn = f"arn:aws:iam::{account}:role/{name}"
    if len(account) == 12:
        assert parse_role_arn(arn).aws_account_id == account
    else:
        with pytest.raises(InvalidInput) as caught:
            parse_role_arn(arn)
        assert caught.value.field == "role_arn"


@PROPERTY
@given(
    account=account_ids,
    name=st.text(_NAME_CHARS, min_size=65, max_size=200),
    path=role_paths(),
)
def test_names_over_64_characters_are_refused(account: str, name: str, path: str) -> None:
    """IAM role names are at most 64 characters, whatever the path."""
    with pytest.raises(InvalidInput) as caught:
        parse_role_arn(f"arn:aws:iam::{account}:role{path}{name}")
    assert caught.value.field == "role_arn"


# ------------------------------------------------------------------ durations

UNIT_SIZES = {
    "s": timedelta(seconds=1),
    "min": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    "y": timedelta(days=365),
}
counts = st.integers(min_value=1, max_value=999_999)
units = st.sampled_from(sorted(UNIT_SIZES))
durations = st.builds(lambda count, unit: count * UNIT_SIZES[unit], counts, units)


@PROPERTY
@given(durations)
def test_parse_inverts_format(duration: timedelta) -> None:
    """Any duration an operator can type is printed back in a form that parses to it."""
    text = format_duration(duration)
    assert parse_duration(text) == duration


@PROPERTY
@given(count=counts, unit=units)
def test_format_inverts_parse_on_canonical_strings(count: int, unit: str) -> None:
    """Canonical spellings (what format prints) survive a parse and format unchanged."""
    canonical = format_duration(count * UNIT_SIZES[unit])
    assert format_duration(parse_duration(canonical)) == canonical


@PROPERTY
@given(count=counts, unit=units)
def test_format_picks_the_largest_exact_unit(count: int, unit: str) -> None:
    """The shortest exact spelling never uses a smaller unit than one that divides evenly."""
    text = format_duration(count * UNIT_SIZES[unit])
    spelled_unit = text.lstrip("0123456789")
    spelled_count = int(text[: len(text) - len(spelled_unit)])
    assert spelled_count * UNIT_SIZES[spelled_unit] == count * UNIT_SIZES[unit]
    assert spelled_count <= count
    value = count * UNIT_SIZES[unit]
    for larger in UNIT_SIZES.values():
        if larger > UNIT_SIZES[spelled_unit]:
            assert value % larger != timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("30d", timedelta(days=30), "30d"),
        ("90d", timedelta(days=90), "90d"),
        ("14d", timedelta(weeks=2), "2w"),
        ("24h", timedelta(days=1), "1d"),
        ("60min", timedelta(hours=1), "1h"),
        ("60s", timedelta(minutes=1), "1min"),
        ("90s", timedelta(seconds=90), "90s"),
        ("5y", timedelta(days=1825), "5y"),
        ("365d", timedelta(days=365), "1y"),
        ("1w", timedelta(days=7), "1w"),
        ("12h", timedelta(hours=12), "12h"),
        ("007d", timedelta(days=7), "1w"),
        (" 30d ", timedelta(days=30), "30d"),
        ("999999y", timedelta(days=365 * 999_999), "999999y"),
    ],
)
def test_duration_examples(text: str, expected: timedelta, canonical: str) -> None:
    """A year is 365 days (the shorter, safe reading for "kept no longer than")."""
    assert parse_duration(text) == expected
    assert format_duration(expected) == canonical


@pytest.mark.parametrize(
    "text",
    [
        *("0d", "-1d", "5x", "", "1.5d", "d", "1", "1 d", "1D", "1m", "1dd", "1d2h", "+1d"),
        *("1234567d", "0s", "000min", "\u0661d", "1d\x00"),
    ],
)
def test_bad_durations_are_refused(text: str) -> None:
    """Zero, negative, fractional or unknown spellings never become a retention period."""
    with pytest.raises(InvalidInput) as caught:
        parse_duration(text, field="retention")
    assert caught.value.field == "retention"
    assert caught.value.rule


@pytest.mark.parametrize("value", [None, 30, 30.0, timedelta(days=30), b"30d", ["30d"]])
def test_non_string_durations_are_refused(value: object) -> None:
    """Config files and JSON may hold numbers; a bare number has no unit and is refused."""
    with pytest.raises(InvalidInput) as caught:
        parse_duration(value)
    assert caught.value.field == "duration"
