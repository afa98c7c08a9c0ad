"""zstd for the event store's ``state`` column.

A results batch is ~150 KB of JSON that compresses about 5:1. Compressing in
the client before the insert means less to escape, send and TOAST: on
PostgreSQL it is the difference between a fraction of COPY's rate and most of
it. Named by ``COMPRESSOR_TOPIC`` in the store settings (``service.database``).
"""

from __future__ import annotations

import zstandard

LEVEL = 1


class ZstdCompressor:
    """eventsourcing's ``Compressor`` protocol on zstandard's thread-safe one-shot calls."""

    def compress(self, data: bytes) -> bytes:
        return zstandard.compress(data, LEVEL)

    def decompress(self, data: bytes) -> bytes:
        return zstandard.decompress(data)
