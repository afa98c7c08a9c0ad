"""Master keys for envelope encryption: a local key file or an AWS KMS key.

Backups and plan keys are encrypted under data keys; a data key is only ever
stored *wrapped* by the master key chosen with ``RESULTSVC_MASTER_KEY``:

- ``file://PATH`` (the embedded default ``file://./var/master.key``): 32
  random bytes in a file of mode 0600, made on first use. A relative PATH is
  resolved against the working directory when the URL is opened.
- ``kms://KEY`` (production): an AWS KMS key given by key id, ``alias/...``,
  or ARN. Endpoints, region and credentials are boto3's own configuration
  (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_KMS``, ``AWS_REGION``, the default
  credential chain); a key ARN also fixes the region.

Every wrap is bound to a *context* (``{"backup": "<id>"}``,
``{"plan": "<uuid>"}``...): unwrapping under another context fails, so a
wrapped key cannot be moved to another purpose. Failures raise
:class:`MasterKeyError`, whose one-line message names the path, the key id or
the AWS error code and never contains key material or a wrapped blob.

Wrapped-key format of the file master key (version 1)
-----------------------------------------------------

All integers are unsigned big-endian. A wrapped key is::

    offset  size  field
    0       4     magic, ASCII "RSMK" (0x52 0x53 0x4D 0x4B)
    4       1     format version, 0x01
    5       8     key id: the first 8 bytes of SHA-256(master key bytes)
    13      12    nonce, random for every wrap
    25      n+16  AES-256-GCM ciphertext of the n-byte key, then the 16-byte tag

so a 32-byte data key wraps into 73 bytes. The GCM associated data is the
13-byte header (magic, version, key id) followed by the canonical encoding of
the context::

    u32 number of pairs
    for each pair, sorted by the UTF-8 bytes of the name:
        u32 len(name)  name as UTF-8
        u32 len(value) value as UTF-8

The key id names the master key that wrapped the blob (``ref`` is
``"file:" + hex(key id)``, 16 hex digits), which lets ``unwrap`` find it after
rotations: the current key lives in PATH, each retired key in
``PATH.<hex key id>.retired`` (mode 0600) in the same folder.

KMS-wrapped keys are the ``CiphertextBlob`` of KMS ``Encrypt`` or
``GenerateDataKey``, opaque to us; the context is the KMS encryption context,
and ``ref`` is ``"kms:" + <key ARN>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

log = logging.getLogger(__name__)

DEFAULT_MASTER_KEY_URL = "file://./var/master.key"

KEY_SIZE = 32
"""Bytes in a file master key and in every data key (AES-256)."""

MAGIC = b"RSMK"
VERSION = 1
KEY_ID_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 1 + KEY_ID_SIZE
MAX_WRAPPED_KEY = 4096
"""Largest key ``wrap`` accepts: KMS ``Encrypt`` refuses more, so both providers agree."""

_T = TypeVar("_T")


class MasterKeyError(Exception):
    """The master key cannot be used: missing, unsafe, refused, or the blob does not match.

    The message is one line naming the path, key id or AWS error code; it is
    safe to log and to show to an operator because it never holds key material.
    ``aws_code`` is the AWS error code when KMS refused, so callers can branch on it.
    """

    def __init__(self, message: str, *, aws_code: str | None = None) -> None:
        super().__init__(message)
        self.aws_code = aws_code


class MasterKey(Protocol):
    """What backups and the keyring need from a master key.

    ``ref`` says which key wraps from now on; callers store it beside each
    wrapped key so an operator knows which key a restore needs.
    """

    @property
    def ref(self) -> str:
        """``file:<key id hex>`` or ``kms:<key ARN>``: the key that wraps from now on."""
        ...

    def wrap(self, key: bytes, context: dict[str, str]) -> bytes:
        """Encrypt ``key`` under the master key, bound to ``context``."""
        ...

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        """Decrypt a wrapped key; a wrong context or wrong key raises MasterKeyError."""
        ...

    def new_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        """A fresh 32-byte data key and its wrapped form."""
        ...

    def rotate(self) -> str:
        """Use a new key version for future wraps (old ones still unwrap); the new ref."""
        ...


def open_master_key(url: str) -> MasterKey:
    """The master key named by a ``RESULTSVC_MASTER_KEY`` value.

    Opening does no I/O: the key file is made (or KMS contacted) on first use,
    so a misconfigured key shows up as a MasterKeyError where it is used.
    """
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path:
            raise MasterKeyError(
                "RESULTSVC_MASTER_KEY: file:// needs a path, e.g. file://./var/master.key"
            )
        return FileMasterKey(os.path.abspath(os.path.expanduser(path)))
    if url.startswith("kms://"):
        key = url[len("kms://") :]
        if not key:
            raise MasterKeyError("RESULTSVC_MASTER_KEY: kms:// needs a key id, alias/NAME or ARN")
        return KmsMasterKey(key)
    # echo the scheme only when it looks like one: a key pasted here by mistake must not leak
    scheme = url.split("://", 1)[0] if "://" in url else ""
    shown = f" scheme {scheme!r}" if scheme.isalnum() and len(scheme) <= 10 else ""
    raise MasterKeyError(
        f"RESULTSVC_MASTER_KEY: unsupported master key{shown}: use file://PATH or kms://KEY"
    )


# ---------------------------------------------------------------------- helpers


def _check_context(context: Mapping[str, str]) -> None:
    """Refuse a context that is not str -> str: a silent str() would weaken the binding."""
    if not isinstance(context, Mapping):
        raise TypeError("context must be a dict of str to str")
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("context must be a dict of str to str")


def _check_key(key: bytes) -> None:
    """Refuse what is not a key, without ever echoing it."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError("the key to wrap must be bytes")
    if not 1 <= len(key) <= MAX_WRAPPED_KEY:
        raise ValueError(f"the key to wrap must hold 1 to {MAX_WRAPPED_KEY} bytes, got {len(key)}")


def canonical_context(context: Mapping[str, str]) -> bytes:
    """An unambiguous byte encoding of the context, independent of dict order.

    Length prefixes (not separators) make it injective: no two different
    contexts encode alike, whatever characters names and values contain.
    """
    _check_context(context)
    try:
        pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    except UnicodeEncodeError:
        raise ValueError("context names and values must be valid Unicode text") from None
    out = bytearray(struct.pack(">I", len(pairs)))
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return bytes(out)


def key_id(key: bytes) -> bytes:
    """The 8-byte id of a master key: names it in every blob without revealing it."""
    return hashlib.sha256(key).digest()[:KEY_ID_SIZE]


def _fsync_dir(folder: str) -> None:
    """Make a new directory entry durable (a rename or link is not, until its folder is)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on the key folder, so two rotations never interleave.

    Without it two processes rotating at once could each install a new key
    and one of them would be lost with everything it wrapped meanwhile.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- file keys


class FileMasterKey:
    """A 32-byte master key in a local file; rotation keeps retired keys beside it.

    Key bytes are read from disk on every use and never kept on the object:
    a rotation by another process is seen at once, the permission check runs
    every time, and deleting a retired file really makes its blobs unreadable.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path) or "."

    def __repr__(self) -> str:
        return f"FileMasterKey(path={self.path!r})"

    __str__ = __repr__

    # -- the protocol

    @property
    def ref(self) -> str:
        """``file:<key id hex>`` of the key in PATH (made on first use)."""
        return _file_ref(key_id(self._current()))

    def wrap(self, key: bytes, context: dict[str, str]) -> bytes:
        """AES-256-GCM under the current key; the blob names the key by its id."""
        _check_key(key)
        aad_context = canonical_context(context)
        master = self._current()
        header = MAGIC + bytes([VERSION]) + key_id(master)
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = AESGCM(master).encrypt(nonce, bytes(key), header + aad_context)
        return header + nonce + sealed

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        """Find the key named in the blob (current or retired) and open the blob."""
        aad_context = canonical_context(context)
        blob = bytes(wrapped)
        if len(blob) < HEADER_SIZE + NONCE_SIZE + TAG_SIZE + 1:
            raise MasterKeyError(
                f"wrapped key too short ({len(blob)} bytes): not a file master key blob"
            )
        if blob[: len(MAGIC)] != MAGIC:
            raise MasterKeyError("wrapped key has no RSMK magic: not wrapped by a file master key")
        if blob[len(MAGIC)] != VERSION:
            raise MasterKeyError(f"wrapped key format version {blob[len(MAGIC)]} is not supported")
        wanted = blob[len(MAGIC) + 1 : HEADER_SIZE]
        master = self._find(wanted)
        nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        try:
            return AESGCM(master).decrypt(
                nonce, blob[HEADER_SIZE + NONCE_SIZE :], blob[:HEADER_SIZE] + aad_context
            )
        except InvalidTag:
            raise MasterKeyError(
                f"cannot unwrap with master key {_file_ref(wanted)}:"
                " wrong context, or the wrapped key was altered"
            ) from None

    def new_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        """A fresh random data key from the OS CSPRNG, wrapped under the current key."""
        plaintext = secrets.token_bytes(KEY_SIZE)
        return plaintext, self.wrap(plaintext, context)

    def rotate(self) -> str:
        """Retire the current key to ``PATH.<id>.retired`` and install a fresh key in PATH.

        Order matters for crash safety: the retired copy is complete and
        durable before PATH is atomically replaced, so PATH always holds a
        whole key and no key that wrapped anything is ever lost.
        """
        self._current()  # make the folder and a first key, if this is the first use
        with _folder_lock(self.folder):
            old = self._read(self.path)
            if old is None:
                raise MasterKeyError(f"master key file {self.path} vanished during rotation")
            old_id = key_id(old)
            retired = self._retired_path(old_id)
            if not self._install(retired, old, replace=False):
                existing = self._read(retired)
                if existing is None or key_id(existing) != old_id:
                    raise MasterKeyError(
                        f"retired key file {retired} exists but does not hold key {old_id.hex()}"
                    )
            fresh = secrets.token_bytes(KEY_SIZE)
            self._install(self.path, fresh, replace=True)
        new_ref = _file_ref(key_id(fresh))
        log.info(
            "master key rotated: %s retired to %s, %s now wraps",
            _file_ref(old_id),
            retired,
            new_ref,
        )
        return new_ref

    # -- files

    def _retired_path(self, ident: bytes) -> str:
        return f"{self.path}.{ident.hex()}.retired"

    def _current(self) -> bytes:
        """The key in PATH, made on first use (a lost race reads the winner's key)."""
        key = self._read(self.path)
        if key is not None:
            return key
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise MasterKeyError(
                f"cannot create master key folder {self.folder}: {exc.strerror}"
            ) from None
        if self._install(self.path, secrets.token_bytes(KEY_SIZE), replace=False):
            log.info("created master key file %s (mode 0600)", self.path)
        key = self._read(self.path)
        if key is None:
            raise MasterKeyError(f"master key file {self.path} vanished while it was being created")
        return key

    def _find(self, wanted: bytes) -> bytes:
        """The master key whose id is ``wanted``: PATH first, then its retired file."""
        current = self._read(self.path)
        if current is not None and key_id(current) == wanted:
            return current
        retired = self._retired_path(wanted)
        key = self._read(retired)
        if key is None:
            raise MasterKeyError(
                f"master key {_file_ref(wanted)} not found: neither {self.path}"
                f" nor {os.path.basename(retired)} beside it holds it"
            )
        if key_id(key) != wanted:
            raise MasterKeyError(f"retired key file {retired} does not hold key {wanted.hex()}")
        return key

    @staticmethod
    def _read(path: str) -> bytes | None:
        """The 32 key bytes in ``path``, None if there is no such file; unsafe files refused."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MasterKeyError(f"cannot open master key file {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MasterKeyError(f"master key file {path} is not a regular file")
            if info.st_mode & 0o077:
                mode = stat.S_IMODE(info.st_mode)
                raise MasterKeyError(
                    f"master key file {path} is accessible by group/others (mode {mode:04o}):"
                    f" run chmod 600 {path}"
                )
            if info.st_size != KEY_SIZE:
                raise MasterKeyError(
                    f"master key file {path} holds {info.st_size} bytes, not {KEY_SIZE}:"
                    " not a resultsvc master key"
                )
            data = b""
            while len(data) <= KEY_SIZE:
                chunk = os.read(fd, KEY_SIZE + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise MasterKeyError(f"cannot read master key file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) != KEY_SIZE:
            raise MasterKeyError(f"master key file {path} changed size while being read")
        return data

    def _install(self, path: str, key: bytes, *, replace: bool) -> bool:
        """Write ``key`` to ``path`` atomically, mode 0600, durably.

        The bytes go to a temporary file made with O_CREAT|O_EXCL (mode 0600)
        and fsynced; it is then linked in (``replace=False``: fails if ``path``
        exists, so a concurrent first use never sees half a key) or renamed
        over ``path`` (``replace=True``). False when ``path`` already existed.
        """
        tmp = os.path.join(self.folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask says
                view = memoryview(key)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if replace:
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise MasterKeyError(f"cannot write master key file {path}: {exc.strerror}") from None
        return True


def _file_ref(ident: bytes) -> str:
    return f"file:{ident.hex()}"


# ---------------------------------------------------------------------- KMS keys

_KMS_HINTS: Mapping[str, str] = {
    "InvalidCiphertextException": "wrong encryption context, or the wrapped key was altered",
    "IncorrectKeyException": "the wrapped key belongs to another KMS key",
    "AccessDeniedException": "not allowed, or the wrapped key belongs to another KMS key",
    "NotFoundException": "no such key, alias or region",
    "DisabledException": "the key is disabled",
    "KMSInvalidStateException": "the key is not usable in its current state",
}

_ROTATION_UNSUPPORTED = frozenset(
    {
        "UnsupportedOperationException",
        "UnknownOperationException",
        "InvalidAction",
        "NotImplemented",
    }
)


class KmsMasterKey:
    """An AWS KMS key: KMS does the wrapping; key material never leaves KMS.

    The client is made on first use, from boto3's own configuration, with
    standard retries (throttling and transient errors are retried by botocore).
    """

    def __init__(self, key: str, client: KMSClient | None = None) -> None:
        self.key = key
        self._client = client
        self._arn: str | None = key if key.startswith("arn:") and ":key/" in key else None

    def __repr__(self) -> str:
        return f"KmsMasterKey(key={self.key!r})"

    __str__ = __repr__

    # -- the protocol

    @property
    def ref(self) -> str:
        """``kms:<key ARN>``: from the last response, else from DescribeKey."""
        if self._arn is None:
            metadata = self._call("DescribeKey", lambda kms: kms.describe_key(KeyId=self.key))
            self._arn = metadata["KeyMetadata"]["Arn"]
        return f"kms:{self._arn}"

    def wrap(self, key: bytes, context: dict[str, str]) -> bytes:
        """KMS Encrypt with the context as encryption context."""
        _check_key(key)
        _check_context(context)
        response = self._call(
            "Encrypt",
            lambda kms: kms.encrypt(
                KeyId=self.key, Plaintext=bytes(key), EncryptionContext=context
            ),
        )
        self._remember(response)
        return response["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        """KMS Decrypt, naming the key so a blob of another key is refused, not used."""
        _check_context(context)
        response = self._call(
            "Decrypt",
            lambda kms: kms.decrypt(
                CiphertextBlob=bytes(wrapped), EncryptionContext=context, KeyId=self.key
            ),
        )
        return response["Plaintext"]

    def new_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        """KMS GenerateDataKey (AES_256): KMS's own randomness, one round trip."""
        _check_context(context)
        response = self._call(
            "GenerateDataKey",
            lambda kms: kms.generate_data_key(
                KeyId=self.key, KeySpec="AES_256", EncryptionContext=context
            ),
        )
        self._remember(response)
        plaintext = response["Plaintext"]
        if len(plaintext) != KEY_SIZE:
            raise MasterKeyError(
                f"KMS GenerateDataKey for key {self.key} returned"
                f" {len(plaintext)} bytes, not {KEY_SIZE}"
            )
        return plaintext, response["CiphertextBlob"]

    def rotate(self) -> str:
        """KMS RotateKeyOnDemand: new key material, same key ARN, old blobs still decrypt.

        KMS keeps every earlier version of the material, so the ref does not
        change. Where on-demand rotation is unavailable (asymmetric keys,
        imported material, custom key stores, servers without the operation)
        the answer is a MasterKeyError pointing at automatic rotation.
        """
        try:
            self._call("RotateKeyOnDemand", lambda kms: kms.rotate_key_on_demand(KeyId=self.key))
        except MasterKeyError as exc:
            code = exc.aws_code
            if code in _ROTATION_UNSUPPORTED:
                raise MasterKeyError(
                    f"KMS key {self.key} cannot be rotated on demand ({code}):"
                    " KMS rotates it automatically once automatic rotation is enabled"
                    " (aws kms enable-key-rotation)",
                    aws_code=code,
                ) from exc.__cause__
            raise
        new_ref = self.ref
        log.info("master key rotated on demand: %s", new_ref)
        return new_ref

    # -- plumbing

    def _kms(self) -> KMSClient:
        if self._client is None:
            # an ARN names its region; KMS only answers for a key in its own region
            parts = self.key.split(":")
            region = parts[3] if self.key.startswith("arn:") and len(parts) > 4 else None
            try:
                import boto3  # only KMS users pay for importing boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "kms",
                    region_name=region or None,
                    config=Config(retries={"mode": "standard", "max_attempts": 5}),
                )
            except BotoCoreError as exc:
                raise MasterKeyError(
                    f"KMS client for key {self.key}: {type(exc).__name__}"
                ) from None
        return self._client

    def _remember(self, response: Mapping[str, Any]) -> None:
        """Keep the ARN KMS answered with, so ``ref`` names the key that really wrapped."""
        arn = response.get("KeyId")
        if isinstance(arn, str) and arn.startswith("arn:"):
            self._arn = arn

    def _call(self, operation: str, request: Callable[[KMSClient], _T]) -> _T:
        """Run one KMS request; errors become a MasterKeyError with the code and key id.

        ClientError keeps its cause (AWS error messages carry no request
        payload); other botocore errors drop it, since some echo parameters.
        """
        kms = self._kms()
        try:
            return request(kms)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "UnknownError")
            hint = _KMS_HINTS.get(code)
            raise MasterKeyError(
                f"KMS {operation} failed for key {self.key}: {code}"
                + (f" ({hint})" if hint else ""),
                aws_code=code,
            ) from exc
        except BotoCoreError as exc:
            where = getattr(exc, "kwargs", {}).get("endpoint_url")
            raise MasterKeyError(
                f"KMS {operation} failed for key {self.key}: {type(exc).__name__}"
                + (f" ({where})" if isinstance(where, str) else "")
            ) from None
