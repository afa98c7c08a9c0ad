"""The backup format, version 1: records, blobs, packs and the manifest.

See docs/backup-format.md for the full, reader-oriented description. In short:

- A *record* is one event notification: position, originator id and version,
  topic and the stored state bytes exactly as the event store holds them.
- A *blob* is a run of consecutive records that share one key (the backup's
  data key, or one plan's key), zstd-compressed, then AES-256-GCM encrypted
  with a fresh 12-byte nonce and associated data that binds the format, the
  backup id, the pack and blob indexes and the key it is under.
- A *pack* is a plain concatenation of blobs; the manifest locates each blob.
- The *manifest* is JSON, written last, and carries an HMAC-SHA256 under a
  key derived from the backup's data key, so it cannot be altered unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = "resultsvc-backup"
VERSION = 1
NONCE_BYTES = 12
KEY_BACKUP = "backup"  # the key ref of blobs under the backup's own data key
ZSTD_LEVEL = 1
_AAD_PREFIX = b"resultsvc-backup-v1\0"
_RECORD_HEAD = struct.Struct(">Q16sQH")  # position, originator id, version, topic length
_STATE_LEN = struct.Struct(">I")


class FormatError(Exception):
    """A backup object is not what the format says: the message names the object and place."""


@dataclass(frozen=True)
class Record:
    """One event notification, as the event store holds it."""

    position: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


def plan_key_ref(plan_id: UUID | str) -> str:
    return f"plan:{plan_id}"


# ------------------------------------------------------------------ records


def encode_record(record: Record) -> bytes:
    topic = record.topic.encode()
    return b"".join(
        (
            _RECORD_HEAD.pack(
                record.position, record.originator_id.bytes, record.originator_version, len(topic)
            ),
            topic,
            _STATE_LEN.pack(len(record.state)),
            record.state,
        )
    )


def decode_records(data: bytes, where: str) -> Iterator[Record]:
    """The records of a decrypted, decompressed blob, in order."""
    offset, end = 0, len(data)
    while offset < end:
        try:
            position, originator, version, topic_len = _RECORD_HEAD.unpack_from(data, offset)
            offset += _RECORD_HEAD.size
            topic = data[offset : offset + topic_len].decode()
            offset += topic_len
            (state_len,) = _STATE_LEN.unpack_from(data, offset)
            offset += _STATE_LEN.size
        except (struct.error, UnicodeDecodeError) as error:
            raise FormatError(f"{where}: truncated or corrupt record at byte {offset}") from error
        state = data[offset : offset + state_len]
        if len(state) != state_len:
            raise FormatError(f"{where}: truncated record state at byte {offset}")
        offset += state_len
        yield Record(position, UUID(bytes=originator), version, topic, state)


# -------------------------------------------------------------------- blobs


def blob_aad(backup_id: str, pack: int, blob: int, key_ref: str) -> bytes:
    return b"".join(
        (
            _AAD_PREFIX,
            backup_id.encode(),
            b"\0",
            struct.pack(">II", pack, blob),
            key_ref.encode(),
        )
    )


def seal_blob(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Compress then encrypt: ``nonce || AES-256-GCM(zstd(plaintext))``."""
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(plaintext)
    return nonce + AESGCM(key).encrypt(nonce, compressed, aad)


def open_blob(key: bytes, sealed: bytes, aad: bytes, where: str) -> bytes:
    """Decrypt (checking the GCM tag, i.e. integrity and the associated data), then decompress."""
    if len(sealed) < NONCE_BYTES + 16:
        raise FormatError(f"{where}: blob too short ({len(sealed)} bytes)")
    try:
        compressed = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise FormatError(
            f"{where}: authentication failed (tampered, truncated, or the wrong key)"
        ) from None
    try:
        return zstandard.ZstdDecompressor().decompress(compressed, max_output_size=1 << 30)
    except zstandard.ZstdError as error:
        raise FormatError(f"{where}: cannot decompress: {error}") from None


# ----------------------------------------------------------------- manifest


def manifest_key(data_key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"resultsvc-backup-manifest-v1"
    ).derive(data_key)


def canonical(document: dict[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_manifest(document: dict[str, Any], data_key: bytes) -> dict[str, Any]:
    mac = hmac.new(manifest_key(data_key), canonical(document), hashlib.sha256).hexdigest()
    return {**document, "mac": mac}


def check_manifest(document: dict[str, Any], data_key: bytes, where: str) -> None:
    expected = hmac.new(manifest_key(data_key), canonical(document), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(document.get("mac", ""))):
        raise FormatError(f"{where}: manifest authentication failed (altered manifest)")


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where}: manifest is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise FormatError(f"{where}: not a {FORMAT} manifest")
    if document.get("version") != VERSION:
        raise FormatError(f"{where}: unsupported format version {document.get('version')!r}")
    return document


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)
