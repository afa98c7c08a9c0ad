"""Object stores that backups are written to: a local folder or an S3 bucket.

``open_store(RESULTSVC_BACKUP_URL)`` returns one of two stores with the same
small interface, so the backup code never knows where its objects go:

- ``file://DIR`` -- a folder, for development and single-host installs. Every
  object is written to a temporary name beside its final one, fsynced, then
  renamed into place (and the folder fsynced), so a crash never leaves a
  half-written object under a real key. There is no Object Lock on a plain
  folder: ``retain_until`` is accepted and ignored (``ObjectInfo`` reports
  none), and the sweeper alone enforces retention there.
- ``s3://bucket/prefix`` -- S3 (or anything speaking its API; the endpoint is
  boto3's own business through ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``).
  Large objects stream through a multipart upload, so memory stays flat at
  about one 8 MiB part whatever the backup's size. Objects written with
  ``retain_until`` on a bucket with Object Lock get a COMPLIANCE retention,
  verified with ``head_object`` after every write and set again with
  ``put_object_retention`` where it went missing (moto drops it on multipart
  uploads; see ``/work/shared/notes/moto-gaps.md``).

Where the whole-object SHA-256 lives on S3: a single ``put_object`` carries it
twice (``ChecksumSHA256``, which S3 verifies, and ``x-amz-meta-sha256``). A
multipart upload cannot: its metadata is fixed when the upload starts, before
any byte is hashed, and its ``ChecksumSHA256`` is a checksum of the parts'
checksums. So after completing a multipart upload the hash is recorded as the
object tag ``sha256`` on that exact version (tags can be set after the fact
without writing a new version, and also on a locked one). ``head`` reads
whichever applies. This needs ``s3:PutObjectTagging``/``s3:GetObjectTagging``
(and their ``...VersionTagging`` forms on a versioned bucket).

Errors are one line: the operation, the object's URL and the cause (S3 error
code or OS error), never a credential.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

PART_SIZE: Final = 8 * 1024 * 1024
"""Multipart part size: S3 wants at least 5 MiB per part but the last; this is
also the most a writer buffers."""

LOCK_MODE: Final = "COMPLIANCE"
"""Backups are locked so that nobody, not even the account root, can delete
them early (GOVERNANCE can be bypassed with a permission)."""

_TEMP_PREFIX: Final = ".tmp-"
_TEMP_NAME: Final = re.compile(r"\.tmp-[0-9a-f]{16}-(?P<name>.+)")
_READ_CHUNK: Final = 1024 * 1024
_BUCKET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")

log = logging.getLogger("resultsvc.stores")


class StoreError(Exception):
    """An object store operation failed; the message is one line naming the object and cause."""


class ObjectMissing(StoreError):
    """The object does not exist (or only a delete marker is left of it)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one stored object."""

    key: str
    size: int
    sha256: str
    """Hex SHA-256 of the whole object, computed by us while writing."""
    retain_until: datetime | None
    """Object Lock retain-until (UTC) on S3; None where there is no lock."""
    lock_mode: str | None


class ObjectWriter(Protocol):
    """Streams one object into a store; memory stays flat whatever its size."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> ObjectInfo:
        """Complete the object: only now does it exist under its key."""
        ...

    def abort(self) -> None:
        """Give up: nothing is left behind (no object, no upload, no temp file)."""
        ...


class ObjectStore(Protocol):
    """Where backups are kept: a folder or an S3 bucket (with or without Object Lock)."""

    url: str
    object_lock: bool

    def writer(self, key: str, *, retain_until: datetime | None = None) -> ObjectWriter: ...

    def put(self, key: str, data: bytes, *, retain_until: datetime | None = None) -> ObjectInfo: ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    def head(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def destroy(self, key: str) -> None: ...

    def abort_incomplete(self, prefix: str) -> int: ...


# ------------------------------------------------------------------ shared checks


def open_store(url: str) -> ObjectStore:
    """Open the store a ``RESULTSVC_BACKUP_URL`` names: ``file://DIR`` or ``s3://bucket/prefix``.

    A malformed URL raises ``ValueError``; an S3 bucket that can't be reached
    or doesn't exist raises ``StoreError`` (checked now, at start-up, rather
    than at the first backup).
    """
    if url.startswith("file://"):
        folder = url[len("file://") :]
        if not folder:
            raise ValueError(
                "backup URL 'file://' names no folder: use file://./relative/dir or file:///abs/dir"
            )
        return FileStore(Path(folder))
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("backup URL names no bucket: use s3://bucket/prefix")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"backup URL has an invalid S3 bucket name {bucket!r}")
        return S3Store(bucket, prefix)
    scheme = url.partition("://")[0] if "://" in url else ""
    raise ValueError(
        f"unsupported backup URL scheme {scheme!r}: expected file://DIR or s3://bucket/prefix"
    )


def write_whole(writer: ObjectWriter, data: bytes) -> ObjectInfo:
    """``put`` on every store: one write through its own writer, aborted on failure."""
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def check_key(key: str) -> str:
    """Refuse keys that could escape the store or mean different things on S3 and on disk.

    The same rules apply to both stores so a backup written to a folder can be
    copied to a bucket and back: relative, ``/``-separated, no empty, ``.`` or
    ``..`` segments, no backslash or NUL.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"object key {key!r} must be relative and use '/' only")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key {key!r} must not contain empty, '.' or '..' segments")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key's start (it may end with ``/`` or mid-name)."""
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/"))
    return prefix


def _lock_date(retain_until: datetime | None) -> datetime | None:
    """Normalise a retain-until to UTC whole seconds, rounding up (never keep less than asked)."""
    if retain_until is None:
        return None
    if retain_until.tzinfo is None or retain_until.utcoffset() is None:
        raise ValueError("retain_until must be timezone-aware")
    until = retain_until.astimezone(UTC)
    if until.microsecond:
        until = until.replace(microsecond=0) + timedelta(seconds=1)
    return until


# ------------------------------------------------------------------ file://


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (the entry lives in the folder)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create missing folders 0700 (backups are private), each made durable in its parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_dir(folder.parent)


def _os_reason(exc: OSError) -> str:
    """``ENOENT (No such file or directory)``: the cause without the path (already named)."""
    if exc.errno is None:
        return type(exc).__name__
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{name} ({exc.strerror})" if exc.strerror else name


class FileStore:
    """Objects as files under a folder; atomic by write-temp, fsync, rename."""

    object_lock = False

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()  # a relative folder resolves against the working folder
        self.url = f"file://{self.root}"
        try:
            _make_dirs(self.root)
        except OSError as exc:
            raise StoreError(f"open {self.url}: {_os_reason(exc)}") from None
        if not self.root.is_dir():
            raise StoreError(f"open {self.url}: not a folder")

    def path(self, key: str) -> Path:
        """Where ``key`` lives; temp-file names are refused so ``list`` can tell them apart."""
        check_key(key)
        parts = key.split("/")
        if any(part.startswith(_TEMP_PREFIX) for part in parts):
            raise ValueError(f"object key {key!r} must not use the reserved {_TEMP_PREFIX!r} names")
        return self.root.joinpath(*parts)

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _fail(self, op: str, key: str, exc: OSError) -> StoreError:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return ObjectMissing(f"{op} {self._where(key)}: no such object ({_os_reason(exc)})")
        return StoreError(f"{op} {self._where(key)}: {_os_reason(exc)}")

    def writer(self, key: str, *, retain_until: datetime | None = None) -> ObjectWriter:
        _lock_date(retain_until)  # checked for mistakes, otherwise ignored: no lock on a folder
        return _FileWriter(self, key, self.path(key))

    def put(self, key: str, data: bytes, *, retain_until: datetime | None = None) -> ObjectInfo:
        return write_whole(self.writer(key, retain_until=retain_until), data)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except OSError as exc:
            raise self._fail("get", key, exc) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        try:
            with self.path(key).open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                if length == 0:
                    return b""
                if offset >= size:
                    raise StoreError(
                        f"get_range {self._where(key)}: offset {offset} beyond the end ({size})"
                    )
                file.seek(offset)
                return file.read(length)
        except OSError as exc:
            raise self._fail("get_range", key, exc) from None

    def head(self, key: str) -> ObjectInfo:
        digest = hashlib.sha256()
        size = 0
        try:
            with self.path(key).open("rb") as file:
                while chunk := file.read(_READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise self._fail("head", key, exc) from None
        return ObjectInfo(key, size, digest.hexdigest(), None, None)

    def _walk(self, prefix: str) -> Iterator[tuple[Path, str]]:
        """(folder, file name) of every regular file that may be under ``prefix``, temp or not."""
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not start.is_dir():
            return
        for folder, _dirs, files in os.walk(start):
            for name in files:
                yield Path(folder), name

    def _key_of(self, folder: Path, name: str) -> str:
        relative = folder.relative_to(self.root)
        return name if relative == Path(".") else f"{relative.as_posix()}/{name}"

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        try:
            keys = [
                key
                for folder, name in self._walk(prefix)
                if not name.startswith(_TEMP_PREFIX)
                and (key := self._key_of(folder, name)).startswith(prefix)
            ]
        except OSError as exc:
            raise StoreError(f"list {self._where(prefix)}: {_os_reason(exc)}") from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file; a missing one is already deleted (the sweeper may run twice)."""
        path = self.path(key)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"delete {self._where(key)}: {_os_reason(exc)}") from None

    def destroy(self, key: str) -> None:
        """Overwrite with zeros, fsync, unlink; a missing file is already destroyed.

        On copy-on-write or flash storage the zeros may land elsewhere: the
        real guarantee comes from shredding the key, not this file's blocks.
        """
        path = self.path(key)
        try:
            with path.open("r+b") as file:
                remaining = os.fstat(file.fileno()).st_size
                zeros = bytes(min(remaining, _READ_CHUNK))
                while remaining > 0:
                    remaining -= file.write(zeros[: min(remaining, len(zeros))])
                file.flush()
                os.fsync(file.fileno())
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"destroy {self._where(key)}: {_os_reason(exc)}") from None
        if path.exists():
            raise StoreError(f"destroy {self._where(key)}: the file is still there")

    def abort_incomplete(self, prefix: str) -> int:
        """Remove temp files a crashed writer left under ``prefix``; returns how many.

        Run it when no writer is active (at start-up, before a backup): a live
        writer's temp file looks the same.
        """
        check_prefix(prefix)
        removed = 0
        try:
            for folder, name in self._walk(prefix):
                match = _TEMP_NAME.fullmatch(name)
                if match and self._key_of(folder, match["name"]).startswith(prefix):
                    (folder / name).unlink(missing_ok=True)
                    _fsync_dir(folder)
                    removed += 1
        except OSError as exc:
            raise StoreError(f"abort_incomplete {self._where(prefix)}: {_os_reason(exc)}") from None
        return removed


class _FileWriter:
    """Writes ``.tmp-<random>-<name>`` beside the target, renamed into place on close."""

    def __init__(self, store: FileStore, key: str, path: Path) -> None:
        self._store = store
        self._key = key
        self._path = path
        self._digest = hashlib.sha256()
        self._size = 0
        self._done = False
        try:
            _make_dirs(path.parent)
            self._temp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            self._file = os.fdopen(os.open(self._temp, flags, 0o600), "wb")
        except OSError as exc:
            raise StoreError(f"write {store._where(key)}: {_os_reason(exc)}") from None

    @property
    def buffered(self) -> int:
        """Bytes held in memory by us: none beyond the file object's few-KiB buffer."""
        return 0

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"writer for {self._key!r} is already closed or aborted")

    def write(self, data: bytes) -> None:
        self._check_open()
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise StoreError(f"write {self._store._where(self._key)}: {_os_reason(exc)}") from None
        self._digest.update(data)
        self._size += len(data)

    def close(self) -> ObjectInfo:
        self._check_open()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._path)
            self._done = True
            _fsync_dir(self._path.parent)
        except OSError as exc:
            self.abort()
            raise StoreError(f"close {self._store._where(self._key)}: {_os_reason(exc)}") from None
        return ObjectInfo(self._key, self._size, self._digest.hexdigest(), None, None)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        try:
            self._temp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"abort {self._store._where(self._key)}: {_os_reason(exc)}") from None


# ------------------------------------------------------------------ s3://


def _client_error(exc: Exception) -> tuple[str, str]:
    """(code, message) of a botocore error; never the request, so never a credential."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code", "Unknown")), str(error.get("Message", "")).strip()
    return type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""


_MISSING_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})


def _b64_to_hex(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _b64_sha256(data: bytes | bytearray) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


class S3Store:
    """Objects under ``s3://bucket/prefix``; streaming multipart writes, Object Lock verified."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = "/".join(part for part in prefix.split("/") if part)
        if self.prefix:
            check_key(self.prefix)
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # No endpoint_url: boto3 reads AWS_ENDPOINT_URL(_S3) itself, so tests
        # and S3-compatible services are configured the standard way.
        self.client: Any = boto3.client(
            "s3", config=Config(retries={"mode": "adaptive", "max_attempts": 10})
        )
        self.object_lock = self._lock_enabled()

    def _lock_enabled(self) -> bool:
        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as exc:
            code, message = _client_error(exc)
            if code == "ObjectLockConfigurationNotFoundError":
                return False
            raise StoreError(f"open s3://{self.bucket}: {code} ({message})") from None
        config = answer.get("ObjectLockConfiguration", {})
        return bool(config.get("ObjectLockEnabled") == "Enabled")

    # --------------------------------------------------------------- helpers

    def full_key(self, key: str) -> str:
        return self._root + check_key(key)

    def _where(self, full: str) -> str:
        return f"s3://{self.bucket}/{full}"

    def fail(self, op: str, full: str, exc: Exception) -> StoreError:
        """A one-line StoreError (ObjectMissing for a missing key) from a boto error.

        Anything else (a bug of ours) is re-raised as it is, not disguised.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, (BotoCoreError, ClientError)):
            raise exc
        code, message = _client_error(exc)
        text = f"{op} {self._where(full)}: {code}" + (f" ({message})" if message else "")
        return ObjectMissing(text) if code in _MISSING_CODES else StoreError(text)

    def call(self, op: str, full: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise self.fail(op, full, exc) from None

    def head_raw(self, op: str, full: str, version: str | None = None) -> dict[str, Any]:
        extra = {"VersionId": version} if version else {}
        answer: dict[str, Any] = self.call(
            op, full, "head_object", Key=full, ChecksumMode="ENABLED", **extra
        )
        return answer

    @staticmethod
    def lock_of(head: dict[str, Any]) -> tuple[str | None, datetime | None]:
        mode = head.get("ObjectLockMode")
        until = head.get("ObjectLockRetainUntilDate")
        if isinstance(until, datetime):
            until = until.astimezone(UTC)
        return (str(mode) if mode else None), until

    def lock_params(self, retain_until: datetime | None) -> dict[str, Any]:
        """Object Lock request fields, or none: a bucket without Object Lock ignores retention."""
        until = _lock_date(retain_until)
        if until is None or not self.object_lock:
            return {}
        return {"ObjectLockMode": LOCK_MODE, "ObjectLockRetainUntilDate": until}

    def ensure_lock(self, op: str, full: str, version: str | None, until: datetime) -> Any:
        """Check the new version is locked until ``until``; set it where it went missing.

        moto drops the lock of a multipart upload, and an S3-compatible
        store might too; a backup that could be deleted early is a failed
        backup, so this raises rather than carry on.
        """
        head = self.head_raw(op, full, version)
        mode, got = self.lock_of(head)
        if mode == LOCK_MODE and got is not None and got >= until:
            return head
        extra = {"VersionId": version} if version else {}
        self.call(
            op,
            full,
            "put_object_retention",
            Key=full,
            Retention={"Mode": LOCK_MODE, "RetainUntilDate": until},
            **extra,
        )
        head = self.head_raw(op, full, version)
        mode, got = self.lock_of(head)
        if mode == LOCK_MODE and got is not None and got >= until:
            return head
        raise StoreError(
            f"{op} {self._where(full)}: Object Lock not applied (asked {LOCK_MODE} until "
            f"{until.isoformat()}, got {mode or 'no lock'}"
            f"{' until ' + got.isoformat() if got else ''})"
        )

    def _versions(self, op: str, full: str) -> list[tuple[str, bool]]:
        """(version id, is delete marker) of exactly ``full`` (the listing is by prefix)."""
        found: list[tuple[str, bool]] = []
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for entry in page.get("Versions", []):
                    if entry["Key"] == full:
                        found.append((entry.get("VersionId") or "null", False))
                for entry in page.get("DeleteMarkers", []):
                    if entry["Key"] == full:
                        found.append((entry.get("VersionId") or "null", True))
        except Exception as exc:
            raise self.fail(op, full, exc) from None
        return found

    def _locked_until(self, op: str, full: str, version: str) -> tuple[str, datetime] | None:
        try:
            mode, until = self.lock_of(self.head_raw(op, full, version))
        except StoreError:
            return None
        if mode and until is not None:
            return mode, until
        return None

    def _refuse_locked(self, op: str, full: str, version: str, lock: tuple[str, datetime]) -> None:
        raise StoreError(
            f"{op} {self._where(full)}: version {version} is locked ({lock[0]}) until "
            f"{lock[1].isoformat()}; it can't be deleted before then (AccessDenied)"
        )

    # --------------------------------------------------------------- the interface

    def writer(self, key: str, *, retain_until: datetime | None = None) -> ObjectWriter:
        full = self.full_key(key)
        return _S3Writer(self, key, full, self.lock_params(retain_until))

    def put(self, key: str, data: bytes, *, retain_until: datetime | None = None) -> ObjectInfo:
        return write_whole(self.writer(key, retain_until=retain_until), data)

    def get(self, key: str) -> bytes:
        full = self.full_key(key)
        answer = self.call("get", full, "get_object", Key=full)
        try:
            with answer["Body"] as body:
                data: bytes = body.read()
        except Exception as exc:
            raise self.fail("get", full, exc) from None
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        full = self.full_key(key)
        if length == 0:
            self.head_raw("get_range", full)  # a missing object is still missing
            return b""
        answer = self.call(
            "get_range", full, "get_object", Key=full, Range=f"bytes={offset}-{offset + length - 1}"
        )
        try:
            with answer["Body"] as body:
                data: bytes = body.read()
        except Exception as exc:
            raise self.fail("get_range", full, exc) from None
        return data

    def head(self, key: str) -> ObjectInfo:
        full = self.full_key(key)
        head = self.head_raw("head", full)
        mode, until = self.lock_of(head)
        return ObjectInfo(key, int(head["ContentLength"]), self._sha256_of(full, head), until, mode)

    def _sha256_of(self, full: str, head: dict[str, Any]) -> str:
        """The whole-object SHA-256 recorded at write time (see the module docstring)."""
        recorded = head.get("Metadata", {}).get("sha256")
        if recorded:
            return str(recorded)
        multipart = "-" in str(head.get("ETag", "")).strip('"')
        if not multipart:
            checksum = head.get("ChecksumSHA256")
            if checksum and "-" not in checksum:
                value = _b64_to_hex(checksum)
                if value:
                    return value
        else:
            version = head.get("VersionId")
            extra = {"VersionId": version} if version and version != "null" else {}
            tags = self.call("head", full, "get_object_tagging", Key=full, **extra)
            for tag in tags.get("TagSet", []):
                if tag.get("Key") == "sha256" and tag.get("Value"):
                    return str(tag["Value"])
        raise StoreError(f"head {self._where(full)}: no SHA-256 recorded for this object")

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        full = self._root + prefix
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                keys.extend(entry["Key"][len(self._root) :] for entry in page.get("Contents", []))
        except Exception as exc:
            raise self.fail("list", full, exc) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove every version and delete marker of ``key`` (expired backups).

        On a bucket with Object Lock every version is checked first: a version
        still locked refuses the whole delete (naming its retain-until) rather
        than leaving the key half-deleted. A missing key is already deleted.
        """
        self._delete_all("delete", self.full_key(key))

    def _delete_all(self, op: str, full: str) -> None:
        versions = self._versions(op, full)
        if self.object_lock:
            now = datetime.now(UTC)
            for version, marker in versions:
                if marker:
                    continue
                lock = self._locked_until(op, full, version)
                if lock is not None and lock[1] > now:
                    self._refuse_locked(op, full, version, lock)
        for version, _marker in versions:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)
            except Exception as exc:
                code, _ = _client_error(exc)
                if code == "AccessDenied":
                    lock = self._locked_until(op, full, version)
                    if lock is not None:
                        self._refuse_locked(op, full, version, lock)
                raise self.fail(op, full, exc) from None

    def destroy(self, key: str) -> None:
        """Crypto-shredding: every version, delete marker and pending upload of ``key`` gone.

        Verified afterwards with ``list_object_versions``: a key that must be
        unrecoverable is not trusted to a 204.
        """
        full = self.full_key(key)
        self._delete_all("destroy", full)
        self._abort_uploads("destroy", full, exact=True)
        left = self._versions("destroy", full)
        if left:
            raise StoreError(
                f"destroy {self._where(full)}: {len(left)} version(s) still listed after deleting"
            )

    def abort_incomplete(self, prefix: str) -> int:
        """Abort multipart uploads left under ``prefix`` (after a crash); returns how many.

        Run it when no writer is active: a live upload looks the same.
        """
        check_prefix(prefix)
        return self._abort_uploads("abort_incomplete", self._root + prefix, exact=False)

    def _abort_uploads(self, op: str, full: str, *, exact: bool) -> int:
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            uploads = [
                (upload["Key"], upload["UploadId"])
                for page in pages
                for upload in page.get("Uploads", [])
                if not exact or upload["Key"] == full
            ]
        except Exception as exc:
            raise self.fail(op, full, exc) from None
        for key, upload_id in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:
                if _client_error(exc)[0] == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                raise self.fail(op, key, exc) from None
            aborted += 1
        return aborted


class _S3Writer:
    """Buffers at most one part; a multipart upload starts only once a part is full.

    An object smaller than one part goes up as a single ``put_object`` at
    close, which also carries the whole-object checksum S3 verifies.
    """

    def __init__(self, store: S3Store, key: str, full: str, lock: dict[str, Any]) -> None:
        self._store = store
        self._key = key
        self._full = full
        self._lock = lock
        self._buffer = bytearray()
        self._digest = hashlib.sha256()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held in memory now (never more than one part)."""
        return len(self._buffer)

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"writer for {self._key!r} is already closed or aborted")

    def write(self, data: bytes) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self._size += len(view)
        while view:
            room = PART_SIZE - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) >= PART_SIZE:
                self._upload_part("write")

    def _upload_part(self, op: str) -> None:
        store, full = self._store, self._full
        body, self._buffer = self._buffer, bytearray()
        try:
            if self._upload_id is None:
                created = store.client.create_multipart_upload(
                    Bucket=store.bucket, Key=full, ChecksumAlgorithm="SHA256", **self._lock
                )
                self._upload_id = str(created["UploadId"])
            number = len(self._parts) + 1
            checksum = _b64_sha256(body)
            answer = store.client.upload_part(
                Bucket=store.bucket,
                Key=full,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
        except Exception as exc:
            error = store.fail(op, full, exc)
            self._abort_after(error)
            raise error from None
        self._parts.append(
            {"ETag": answer["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}
        )

    def close(self) -> ObjectInfo:
        self._check_open()
        store, full = self._store, self._full
        sha256 = self._digest.hexdigest()
        if self._upload_id is None:
            body, self._buffer = self._buffer, bytearray()
            try:
                answer = store.client.put_object(
                    Bucket=store.bucket,
                    Key=full,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64_sha256(body),
                    Metadata={"sha256": sha256},
                    **self._lock,
                )
            except Exception as exc:
                self._done = True
                raise store.fail("close", full, exc) from None
        else:
            if self._buffer:
                self._upload_part("close")
            try:
                answer = store.client.complete_multipart_upload(
                    Bucket=store.bucket,
                    Key=full,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            except Exception as exc:
                error = store.fail("close", full, exc)
                self._abort_after(error)
                raise error from None
        self._done = True
        version = answer.get("VersionId")
        version = str(version) if version and version != "null" else None
        try:
            return self._finish(sha256, version)
        except StoreError:
            self._discard(version)
            raise

    def _finish(self, sha256: str, version: str | None) -> ObjectInfo:
        """Record the hash of a multipart object and verify its lock; the object now exists."""
        store, full = self._store, self._full
        extra = {"VersionId": version} if version else {}
        if self._upload_id is not None:
            store.call(
                "close",
                full,
                "put_object_tagging",
                Key=full,
                Tagging={"TagSet": [{"Key": "sha256", "Value": sha256}]},
                **extra,
            )
        mode: str | None = None
        until: datetime | None = None
        if self._lock:
            head = store.ensure_lock(
                "close", full, version, self._lock["ObjectLockRetainUntilDate"]
            )
            mode, until = store.lock_of(head)
        elif store.object_lock:  # a bucket default retention, if any, is reported as it is
            mode, until = store.lock_of(store.head_raw("close", full, version))
        return ObjectInfo(self._key, self._size, sha256, until, mode)

    def _discard(self, version: str | None) -> None:
        """Best effort: remove a version that failed its checks (a failed close leaves none)."""
        if version is None:
            return
        with contextlib.suppress(Exception):
            self._store.client.delete_object(
                Bucket=self._store.bucket, Key=self._full, VersionId=version
            )

    def _abort_after(self, error: StoreError) -> None:
        """Clean up after a failed write; the write's error is the one to report."""
        try:
            self.abort()
        except StoreError as cleanup:
            # Not a warning: the caller reports ``error``; a leftover upload is
            # removed by the next backup (``abort_incomplete``).
            log.info("%s; then the clean-up failed too: %s", error, cleanup)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        store, full = self._store, self._full
        try:
            store.client.abort_multipart_upload(
                Bucket=store.bucket, Key=full, UploadId=self._upload_id
            )
        except Exception as exc:
            if _client_error(exc)[0] != "NoSuchUpload":
                raise store.fail("abort", full, exc) from None


__all__ = [
    "PART_SIZE",
    "FileStore",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectStore",
    "ObjectWriter",
    "S3Store",
    "StoreError",
    "check_key",
    "open_store",
]
