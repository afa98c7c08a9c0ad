"""Durations as operators write them: ``90d``, ``5y``, ``12h``, ``1w``, ``30min``.

A year is 365 days. Retention promises say "kept no longer than", so the
shorter reading of a year is the safe one: ``5y`` is 1,825 days.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

from domain.errors import InvalidInput

_UNITS: Final = {
    "s": timedelta(seconds=1),
    "min": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    "y": timedelta(days=365),
}
_DURATION = re.compile(r"(?P<count>[0-9]{1,6})(?P<unit>s|min|h|d|w|y)")


def parse_duration(text: object, field: str = "duration") -> timedelta:
    """Parse a positive duration like ``30d``; raise ``InvalidInput`` naming the field."""
    if not isinstance(text, str):
        raise InvalidInput(field, "must be a string such as 30d")
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(
            field, f"must be a number and a unit (s, min, h, d, w, y) such as 30d, got {text!r}"
        )
    count = int(match["count"])
    if count == 0:
        raise InvalidInput(field, "must be greater than zero")
    return count * _UNITS[match["unit"]]


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling of a duration, the inverse of ``parse_duration``."""
    seconds = int(value.total_seconds())
    for unit in ("y", "w", "d", "h", "min"):
        size = int(_UNITS[unit].total_seconds())
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
