"""How events become bytes: eventsourcing's JSON format, written and read by orjson.

Results batches are most of what the service stores; the standard library's
JSON encoder (and the per-object hook eventsourcing's decoder calls) spend
more time on them than the database does. This transcoder writes the same
JSON that ``JSONTranscoder`` writes, so either can read what the other wrote,
but it is several times faster on both sides.

Contract (kept by the domain): ``UUID``, ``datetime`` and ``Decimal`` values
(written as eventsourcing's tagged ``{"_type_": ..., "_data_": ...}``
objects) may sit in an event's attributes and in dicts nested in them (a
snapshot's ``state``), never inside lists. Lists, such as a batch's results,
hold plain JSON: findings are plain JSON by validation, and validation
refuses details that look like tagged objects (``domain.findings``). Lists
are never walked, which is what makes this fast.
"""

from __future__ import annotations

from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder


class OrjsonTranscoder(JSONTranscoder):
    """``JSONTranscoder``'s format, custom types outside lists only, encoded by orjson."""

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(self._tag(obj) if type(obj) is dict else obj)

    def decode(self, data: bytes) -> Any:
        decoded = orjson.loads(data)
        return self._untag(decoded) if type(decoded) is dict else decoded

    def _tag(self, obj: dict[str, Any]) -> dict[str, Any]:
        types = self.types
        tagged: dict[str, Any] = {}
        for key, value in obj.items():
            kind = type(value)
            if kind in types:
                tagged[key] = self._encode_obj(value)
            elif kind is dict:
                tagged[key] = self._tag(value)
            else:
                tagged[key] = value
        return tagged

    def _untag(self, obj: dict[str, Any]) -> Any:
        if len(obj) == 2 and "_type_" in obj and "_data_" in obj:
            return self._decode_obj(obj)
        for key, value in obj.items():
            if type(value) is dict:
                obj[key] = self._untag(value)
        return obj
