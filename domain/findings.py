"""Validation of plan run results (findings) before they become events.

Results arrive from other services and end up in events that are kept for
years, in display tables and in backups. Everything is checked here, once, at
the edge of the domain: a batch is accepted whole or refused whole, and a
refusal names the offending field and the rule it broke.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from domain.errors import InvalidInput

SEVERITIES: Final = ("critical", "high", "medium", "low", "informational")
STATUSES: Final = ("FAIL", "PASS", "ERROR", "SKIPPED")

MAX_BATCH: Final = 1000
MAX_RULE_ID: Final = 256
MAX_TITLE: Final = 512
MAX_RESOURCE_ARN: Final = 2048
MAX_REGION: Final = 64
MAX_MESSAGE: Final = 4096
MAX_DETAILS_BYTES: Final = 16 * 1024
# One batch is one event: its state must stay well below the few MB at which
# the PostgreSQL driver's pipeline mode stalls (and holds the log's lock).
MAX_BATCH_BYTES: Final = 2 * 1024 * 1024

REQUIRED_FIELDS: Final = (
    "rule_id",
    "title",
    "severity",
    "status",
    "resource_arn",
    "region",
    "message",
    "observed_at",
)
ALLOWED_FIELDS: Final = frozenset((*REQUIRED_FIELDS, "details"))

Finding = dict[str, Any]

# A NUL escaped in JSON text: ``\u0000`` after an even number of backslashes
# (an odd number would make it the escaped backslash of a literal "\\u0000").
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# The normalised spelling of a UTC instant; input already in it is kept as is.
_CANONICAL_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z")


def validate_batch(results: object) -> list[Finding]:
    """Check a batch and return it normalised, or raise ``InvalidInput``.

    Normalised means: fields in a fixed order, ``observed_at`` as an ISO-8601
    string in UTC, ``details`` round-tripped through JSON so what is stored is
    exactly what a reader will get back.
    """
    if not isinstance(results, Sequence) or isinstance(results, str | bytes):
        raise InvalidInput("results", "must be a list of results")
    if not 1 <= len(results) <= MAX_BATCH:
        raise InvalidInput("results", f"must hold 1 to {MAX_BATCH} results, got {len(results)}")
    batch = [validate_finding(item, f"results[{i}]") for i, item in enumerate(results)]
    size = len(orjson.dumps(batch))
    if size > MAX_BATCH_BYTES:
        raise InvalidInput(
            "results",
            f"must be at most {MAX_BATCH_BYTES} bytes of JSON in one batch, got {size};"
            " send it as several batches",
        )
    return batch


_TEXT_FIELDS: Final = (
    # (field, max characters, may be empty)
    ("rule_id", MAX_RULE_ID, False),
    ("title", MAX_TITLE, False),
    ("resource_arn", MAX_RESOURCE_ARN, False),
    ("region", MAX_REGION, False),
    ("message", MAX_MESSAGE, True),
)


def validate_finding(item: object, where: str = "result") -> Finding:
    """Check one finding; ``where`` prefixes field names in errors.

    Runs for every result ingested (tens of thousands a second), so the
    common case is kept to a few cheap checks per field.
    """
    if not isinstance(item, Mapping):
        raise InvalidInput(where, "must be an object")
    if not ALLOWED_FIELDS.issuperset(item):
        name = sorted(str(k) for k in set(item) - ALLOWED_FIELDS)[0]
        raise InvalidInput(f"{where}.{name}", "unknown field")
    for name in REQUIRED_FIELDS:
        if name not in item:
            raise InvalidInput(f"{where}.{name}", "is required")
    severity = item["severity"]
    if not isinstance(severity, str) or severity not in SEVERITIES:
        raise InvalidInput(f"{where}.severity", f"must be one of {', '.join(SEVERITIES)}")
    status = item["status"]
    if not isinstance(status, str) or status not in STATUSES:
        raise InvalidInput(f"{where}.status", f"must be one of {', '.join(STATUSES)}")
    for name, max_len, may_be_empty in _TEXT_FIELDS:
        value = item[name]
        if (
            type(value) is not str
            or len(value) > max_len
            or not (value or may_be_empty)
            or not value.isascii()
            or "\x00" in value
        ):
            _text(value, f"{where}.{name}", max_len, empty=may_be_empty)
    finding: Finding = {
        "rule_id": item["rule_id"],
        "title": item["title"],
        "severity": severity,
        "status": status,
        "resource_arn": item["resource_arn"],
        "region": item["region"],
        "message": item["message"],
        "observed_at": _timestamp(item["observed_at"], where),
    }
    details = item.get("details")
    if details is not None:
        finding["details"] = _details(details, f"{where}.details")
    return finding


def _text(value: object, field: str, max_len: int, *, empty: bool) -> str:
    """The full check of a text field, with the precise reason when it fails."""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if not empty and not value:
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidInput(field, f"must be at most {max_len} characters, got {len(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(field, "must be valid Unicode (no lone surrogates)") from None
    if "\x00" in value:
        raise InvalidInput(field, "must not contain NUL characters")
    return value


def _timestamp(value: object, where: str) -> str:
    field = where + ".observed_at"
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput(field, "must be an ISO-8601 date-time") from None
        # Fast path: already canonical (isoformat drops a zero fraction).
        if _CANONICAL_UTC.fullmatch(value) and (len(value) == 20 or moment.microsecond):
            return value
    else:
        raise InvalidInput(field, "must be an ISO-8601 date-time string")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidInput(field, "must carry a time zone (for example 'Z')")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(field, "is out of range once converted to UTC") from None
    return utc.isoformat().replace("+00:00", "Z")


def _details(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(field, "must be an object")
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError as error:
        reason = "is nested too deeply" if "Recursion" in str(error) else None
        raise InvalidInput(field, reason or f"must be plain JSON ({_reason(error)})") from None
    if len(text) > MAX_DETAILS_BYTES:
        raise InvalidInput(
            field, f"must be at most {MAX_DETAILS_BYTES} bytes of JSON, got {len(text)}"
        )
    decoded: dict[str, Any] = orjson.loads(text)
    if decoded != value:
        # Tuples come back as lists (fine); NaN and Infinity as null (refused).
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise InvalidInput(field, "must be plain JSON (no NaN or Infinity)") from None
    if b"\\u0000" in text and _ESCAPED_NUL.search(text.decode()):
        raise InvalidInput(field, "must not contain NUL characters")
    if b'"_type_"' in text and _has_reserved_pair(decoded):
        # The event store's JSON transcoder reads {"_type_": ..., "_data_": ...}
        # as one of its own encoded values: stored, it would not read back.
        raise InvalidInput(field, "must not hold an object with exactly the keys _type_ and _data_")
    return decoded


def _has_reserved_pair(value: object) -> bool:
    if isinstance(value, dict):
        if len(value) == 2 and "_type_" in value and "_data_" in value:
            return True
        return any(_has_reserved_pair(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_reserved_pair(item) for item in value)
    return False


def _reason(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 120 else text[:117] + "..."
