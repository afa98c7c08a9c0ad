"""Master keys: the local key file (real files) and AWS KMS (moto over HTTP).

Every refusal goes through :func:`refused`, which also checks that the error
is one line and that no key material -- the master key, a retired key, the
data key being wrapped -- appears in it in any usual spelling.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.keys import (
    KEY_SIZE,
    FileMasterKey,
    KmsMasterKey,
    MasterKey,
    MasterKeyError,
    canonical_context,
    open_master_key,
)

CTX = {"backup": "b-2024-01-01"}

# ---------------------------------------------------------------------- helpers


def spellings(secret: bytes) -> list[str]:
    """The ways key bytes could leak into text: hex, base64, a bytes repr."""
    b64 = base64.b64encode(secret).decode()
    return [
        secret.hex(),
        secret.hex().upper(),
        b64,
        b64.rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
    ]


def assert_no_secrets(text: str, secret_values: Iterable[bytes]) -> None:
    for secret in secret_values:
        assert len(secret) >= 16, "only check real keys: short strings match by chance"
        for spelled in spellings(secret):
            assert spelled not in text
        assert secret not in text.encode("utf-8", "surrogateescape")


def check_error(error: BaseException, secret_values: Iterable[bytes]) -> str:
    """A safe error: one non-empty line, no secret in it, its repr or its cause."""
    message = str(error)
    assert message and "\n" not in message
    values = list(secret_values)
    texts = [message, repr(error)]
    if error.__cause__ is not None:
        texts += [str(error.__cause__), repr(error.__cause__)]
    for text in texts:
        assert_no_secrets(text, values)
    return message


@contextlib.contextmanager
def refused(
    *secret_values: bytes, match: str | None
) -> Iterator[pytest.ExceptionInfo[MasterKeyError]]:
    """Expect a MasterKeyError matching ``match`` that leaks none of ``secret_values``."""
    with pytest.raises(MasterKeyError, match=match) as info:
        yield info
    check_error(info.value, secret_values)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_id_hex(key: bytes) -> str:
    return hashlib.sha256(key).digest()[:8].hex()


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    """A key file in a folder that does not exist yet."""
    return tmp_path / "keys" / "master.key"


def file_key(path: Path) -> FileMasterKey:
    opened = open_master_key(f"file://{path}")
    assert isinstance(opened, FileMasterKey)
    return opened


# ---------------------------------------------------------------------- open_master_key


def test_relative_file_url_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    master = open_master_key("file://./var/master.key")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resolved at open, not at first use
    ref = master.ref
    made = tmp_path / "var" / "master.key"
    assert made.is_file() and not (elsewhere / "var").exists()
    assert mode_of(made) == 0o600 and mode_of(made.parent) == 0o700
    assert ref == f"file:{key_id_hex(made.read_bytes())}"


def test_open_does_no_io_and_picks_the_provider(key_path: Path) -> None:
    assert isinstance(open_master_key(f"file://{key_path}"), FileMasterKey)
    assert not key_path.parent.exists()
    kms = open_master_key("kms://alias/resultsvc")
    assert isinstance(kms, KmsMasterKey) and kms.key == "alias/resultsvc"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://bucket/key", "unsupported master key scheme 's3'"),
        ("file://", "file:// needs a path"),
        ("kms://", "kms:// needs a key id"),
        ("/var/master.key", "use file://PATH or kms://KEY"),
    ],
)
def test_bad_urls_refused(url: str, match: str) -> None:
    with refused(match=match):
        open_master_key(url)


def test_key_pasted_as_url_not_echoed() -> None:
    key = secrets.token_bytes(32)
    for pasted in (key.hex(), base64.b64encode(key).decode(), f"{key.hex()}://x"):
        with refused(key, match="use file://PATH or kms://KEY") as info:
            open_master_key(pasted)
        assert pasted[:8] not in str(info.value)


# ---------------------------------------------------------------------- file: the key file


def test_created_on_first_use_mode_0600_and_32_bytes(key_path: Path) -> None:
    master = file_key(key_path)
    assert not key_path.exists()
    ref = master.ref
    assert mode_of(key_path) == 0o600
    assert mode_of(key_path.parent) == 0o700
    key = key_path.read_bytes()
    assert len(key) == KEY_SIZE
    assert ref == f"file:{key_id_hex(key)}"
    assert master.ref == ref  # the second use reads the same file, makes nothing new
    assert [p.name for p in key_path.parent.iterdir()] == ["master.key"]  # no temp files left


def test_created_with_0600_whatever_the_umask(key_path: Path) -> None:
    old = os.umask(0o000)
    try:
        file_key(key_path).wrap(secrets.token_bytes(32), CTX)
    finally:
        os.umask(old)
    assert mode_of(key_path) == 0o600


def test_reopening_gives_the_same_key(key_path: Path) -> None:
    data_key = secrets.token_bytes(32)
    wrapped = file_key(key_path).wrap(data_key, CTX)
    before = key_path.read_bytes()
    assert file_key(key_path).unwrap(wrapped, CTX) == data_key
    assert key_path.read_bytes() == before


def test_concurrent_first_use_agrees_on_one_key(key_path: Path) -> None:
    refs: list[str] = []
    barrier = threading.Barrier(8)

    def first_use() -> None:
        master = file_key(key_path)
        barrier.wait()
        refs.append(master.ref)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refs) == 8 and len(set(refs)) == 1
    assert refs[0] == f"file:{key_id_hex(key_path.read_bytes())}"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o610])
def test_key_file_accessible_by_group_or_others_refused(key_path: Path, mode: int) -> None:
    master = file_key(key_path)
    wrapped = master.wrap(data_key := secrets.token_bytes(32), CTX)
    key = key_path.read_bytes()
    key_path.chmod(mode)
    with refused(key, data_key, match="chmod 600") as info:
        master.unwrap(wrapped, CTX)
    assert str(key_path) in str(info.value) and f"{mode:04o}" in str(info.value)
    with refused(key, data_key, match="chmod 600"):
        file_key(key_path).wrap(data_key, CTX)
    with refused(key, match="chmod 600"):
        _ = master.ref


def test_read_only_key_file_accepted(key_path: Path) -> None:
    master = file_key(key_path)
    wrapped = master.wrap(data_key := secrets.token_bytes(32), CTX)
    key_path.chmod(0o400)
    assert master.unwrap(wrapped, CTX) == data_key


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_key_file_of_wrong_size_refused(key_path: Path, size: int) -> None:
    key_path.parent.mkdir(mode=0o700)
    content = secrets.token_bytes(size)
    fd = os.open(key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    secret_values = [content] if size >= 16 else []
    with refused(*secret_values, match=f"holds {size} bytes, not 32"):
        file_key(key_path).wrap(secrets.token_bytes(32), CTX)
    assert key_path.read_bytes() == content  # refused, never "repaired" over


def test_key_path_that_is_a_folder_refused(key_path: Path) -> None:
    key_path.mkdir(parents=True, mode=0o700)
    with refused(match="not a regular file"):
        _ = file_key(key_path).ref


# ---------------------------------------------------------------------- file: wrapping


def test_wrap_unwrap_round_trip_and_blob_layout(key_path: Path) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    wrapped = master.wrap(data_key, CTX)
    key = key_path.read_bytes()
    assert len(wrapped) == 4 + 1 + 8 + 12 + 32 + 16
    assert wrapped[:4] == b"RSMK" and wrapped[4] == 1
    assert wrapped[5:13].hex() == key_id_hex(key) == master.ref.removeprefix("file:")
    assert data_key not in wrapped
    assert master.unwrap(wrapped, CTX) == data_key
    again = master.wrap(data_key, CTX)
    assert again[13:25] != wrapped[13:25]  # a fresh nonce every time
    assert master.unwrap(again, CTX) == data_key


def test_blob_is_plain_aes_gcm_as_documented(key_path: Path) -> None:
    """The docstring's format is the contract (docs/backup-format.md): decrypt by hand."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    context = {"plan": "p-1", "backup": "b-1"}
    wrapped = master.wrap(data_key, context)
    aad = wrapped[:13] + (2).to_bytes(4, "big")
    for name, value in [(b"backup", b"b-1"), (b"plan", b"p-1")]:
        aad += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    assert aad[13:] == canonical_context(context)
    plain = AESGCM(key_path.read_bytes()).decrypt(wrapped[13:25], wrapped[25:], aad)
    assert plain == data_key


def test_new_data_key(key_path: Path) -> None:
    master = file_key(key_path)
    plaintext, wrapped = master.new_data_key({"plan": str(uuid.uuid4())})
    other, _ = master.new_data_key(CTX)
    assert len(plaintext) == 32 and plaintext != other
    with refused(plaintext, key_path.read_bytes(), match="wrong context"):
        master.unwrap(wrapped, CTX)


@pytest.mark.parametrize(
    "wrong",
    [
        {"backup": "b-2024-01-02"},
        {"plan": "b-2024-01-01"},
        {"backup": "b-2024-01-01", "plan": "x"},
        {},
        {"Backup": "b-2024-01-01"},
        {"backup": "b-2024-01-01 "},
    ],
)
def test_wrong_context_refused(key_path: Path, wrong: dict[str, str]) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    wrapped = master.wrap(data_key, CTX)
    key = key_path.read_bytes()
    with refused(key, data_key, match=f"file:{key_id_hex(key)}: wrong context"):
        master.unwrap(wrapped, wrong)


def test_context_order_does_not_matter(key_path: Path) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    wrapped = master.wrap(data_key, {"a": "1", "b": "2"})
    assert master.unwrap(wrapped, {"b": "2", "a": "1"}) == data_key


def test_context_encoding_is_unambiguous() -> None:
    assert canonical_context({"ab": "c"}) != canonical_context({"a": "bc"})
    assert canonical_context({"a": "b", "c": ""}) != canonical_context({"a": "b\x00\x00\x00\x01c"})
    assert canonical_context({}) == b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "wrong context, or the wrapped key was altered"),
        (lambda b: b[:30] + bytes([b[30] ^ 0x80]) + b[31:], "altered"),
        (lambda b: b[:13] + bytes([b[13] ^ 1]) + b[14:], "altered"),
        (lambda b: b[:-1], "altered"),
        (lambda b: b + b"\x00", "altered"),
        (lambda b: b[:41], "too short"),
        (lambda b: b"XSMK" + b[4:], "no RSMK magic"),
        (lambda b: b[:4] + b"\x02" + b[5:], "format version 2 is not supported"),
        (lambda b: b[:5] + bytes([b[5] ^ 1]) + b[6:], "not found"),
    ],
)
def test_tampered_blob_refused(key_path: Path, tamper: Any, match: str) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    wrapped = master.wrap(data_key, CTX)
    with refused(key_path.read_bytes(), data_key, match=match):
        master.unwrap(tamper(wrapped), CTX)


def test_blob_of_another_key_file_refused(tmp_path: Path) -> None:
    first = file_key(tmp_path / "a" / "master.key")
    second = file_key(tmp_path / "b" / "master.key")
    data_key = secrets.token_bytes(32)
    wrapped = first.wrap(data_key, CTX)
    assert first.ref != second.ref  # the second file is made here, on first use
    first_key = (tmp_path / "a" / "master.key").read_bytes()
    second_key = (tmp_path / "b" / "master.key").read_bytes()
    with refused(first_key, second_key, data_key, match=f"master key {first.ref} not found"):
        second.unwrap(wrapped, CTX)


def test_bad_inputs_refused_without_echoing_them(key_path: Path) -> None:
    master = file_key(key_path)
    with pytest.raises(ValueError, match="1 to 4096 bytes, got 0"):
        master.wrap(b"", CTX)
    big = secrets.token_bytes(4097)
    with pytest.raises(ValueError, match="got 4097") as info:
        master.wrap(big, CTX)
    check_error(info.value, [big])
    with pytest.raises(TypeError, match="bytes"):
        master.wrap("not bytes", CTX)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict of str to str"):
        master.wrap(secrets.token_bytes(32), {"backup": 1})  # type: ignore[dict-item]


# ---------------------------------------------------------------------- file: rotation


def test_rotation_keeps_old_blobs_readable(key_path: Path) -> None:
    master = file_key(key_path)
    old_data = secrets.token_bytes(32)
    old_blob = master.wrap(old_data, CTX)
    old_ref = master.ref
    old_key = key_path.read_bytes()

    new_ref = master.rotate()

    assert new_ref != old_ref and master.ref == new_ref
    new_key = key_path.read_bytes()
    assert new_key != old_key and new_ref == f"file:{key_id_hex(new_key)}"
    assert mode_of(key_path) == 0o600
    retired = key_path.parent / f"master.key.{key_id_hex(old_key)}.retired"
    assert retired.read_bytes() == old_key and mode_of(retired) == 0o600
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["master.key", retired.name]

    new_data = secrets.token_bytes(32)
    new_blob = master.wrap(new_data, CTX)
    assert new_blob[5:13].hex() == new_ref.removeprefix("file:")
    for reader in (master, file_key(key_path)):
        assert reader.unwrap(old_blob, CTX) == old_data
        assert reader.unwrap(new_blob, CTX) == new_data


def test_rotating_twice_keeps_every_version(key_path: Path) -> None:
    master = file_key(key_path)
    blobs = []
    for _ in range(3):
        data_key, wrapped = master.new_data_key(CTX)
        blobs.append((data_key, wrapped))
        master.rotate()
    assert len(list(key_path.parent.glob("master.key.*.retired"))) == 3
    fresh = file_key(key_path)
    for data_key, wrapped in blobs:
        assert fresh.unwrap(wrapped, CTX) == data_key


def test_rotation_before_first_use_makes_a_key_first(key_path: Path) -> None:
    ref = file_key(key_path).rotate()
    assert ref == f"file:{key_id_hex(key_path.read_bytes())}"
    assert len(list(key_path.parent.glob("*.retired"))) == 1


def test_concurrent_rotations_lose_no_key(key_path: Path) -> None:
    assert file_key(key_path).ref
    barrier = threading.Barrier(4)
    refs: list[str] = []

    def rotate() -> None:
        master = file_key(key_path)
        barrier.wait()
        refs.append(master.rotate())

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refs) == 4  # no thread failed
    retired = {p.name.split(".")[2] for p in key_path.parent.glob("master.key.*.retired")}
    current = key_id_hex(key_path.read_bytes())
    # every key installed by a rotation is either current or retired: none was overwritten
    assert {ref.removeprefix("file:") for ref in refs} <= retired | {current}
    assert len(retired) == 4


def test_deleted_retired_key_makes_old_blobs_fail_naming_the_key(key_path: Path) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    old_blob = master.wrap(data_key, CTX)
    old_key = key_path.read_bytes()
    old_id = key_id_hex(old_key)
    master.rotate()
    retired = key_path.parent / f"master.key.{old_id}.retired"
    retired.unlink()
    for reader in (master, file_key(key_path)):
        with refused(old_key, key_path.read_bytes(), data_key, match=old_id) as info:
            reader.unwrap(old_blob, CTX)
        assert f"master key file:{old_id} not found" in str(info.value)


def test_unsafe_retired_file_refused(key_path: Path) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    old_blob = master.wrap(data_key, CTX)
    old_key = key_path.read_bytes()
    master.rotate()
    retired = key_path.parent / f"master.key.{key_id_hex(old_key)}.retired"
    retired.chmod(0o644)
    with refused(old_key, data_key, match="chmod 600"):
        master.unwrap(old_blob, CTX)


def test_retired_file_with_other_content_refused(key_path: Path) -> None:
    master = file_key(key_path)
    data_key = secrets.token_bytes(32)
    old_blob = master.wrap(data_key, CTX)
    old_key = key_path.read_bytes()
    master.rotate()
    retired = key_path.parent / f"master.key.{key_id_hex(old_key)}.retired"
    impostor = secrets.token_bytes(32)
    retired.write_bytes(impostor)
    with refused(old_key, impostor, data_key, match="does not hold key"):
        master.unwrap(old_blob, CTX)


def test_logs_name_refs_not_keys(key_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="retention.keys")
    master = file_key(key_path)
    first = master.ref
    first_key = key_path.read_bytes()
    second = master.rotate()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "created master key file" in text and first in text and second in text
    assert_no_secrets(text, [first_key, key_path.read_bytes()])


# ---------------------------------------------------------------------- file: properties


@pytest.fixture(scope="module")
def shared_file_key(tmp_path_factory: pytest.TempPathFactory) -> FileMasterKey:
    return file_key(tmp_path_factory.mktemp("prop") / "master.key")


contexts = st.dictionaries(
    st.text(min_size=1, max_size=12), st.text(max_size=24), min_size=0, max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_key=st.binary(min_size=32, max_size=32), context=contexts, data=st.data())
def test_property_round_trip_and_any_flip_refused(
    shared_file_key: FileMasterKey, data_key: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    wrapped = shared_file_key.wrap(data_key, context)
    assert shared_file_key.unwrap(wrapped, context) == data_key
    index = data.draw(st.integers(0, len(wrapped) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    flipped = wrapped[:index] + bytes([wrapped[index] ^ mask]) + wrapped[index + 1 :]
    with refused(data_key, match=None):
        shared_file_key.unwrap(flipped, context)


@settings(max_examples=100, deadline=None)
@given(data_key=st.binary(min_size=32, max_size=32), first=contexts, second=contexts)
def test_property_other_context_refused(
    shared_file_key: FileMasterKey, data_key: bytes, first: dict[str, str], second: dict[str, str]
) -> None:
    wrapped = shared_file_key.wrap(data_key, first)
    if first == second:
        assert shared_file_key.unwrap(wrapped, second) == data_key
    else:
        with refused(data_key, match="wrong context"):
            shared_file_key.unwrap(wrapped, second)


# ---------------------------------------------------------------------- KMS (moto over HTTP)


@pytest.fixture
def kms_key(aws: str) -> dict[str, str]:
    """A fresh symmetric KMS key on the moto server: its KeyId and Arn."""
    metadata = boto3.client("kms").create_key(Description="resultsvc test")["KeyMetadata"]
    return {"KeyId": metadata["KeyId"], "Arn": metadata["Arn"]}


def kms_key_of(url: str) -> KmsMasterKey:
    opened = open_master_key(url)
    assert isinstance(opened, KmsMasterKey)
    return opened


def test_kms_new_data_key_round_trip(kms_key: dict[str, str]) -> None:
    master = kms_key_of(f"kms://{kms_key['KeyId']}")
    plaintext, wrapped = master.new_data_key(CTX)
    assert len(plaintext) == 32 and plaintext not in wrapped
    assert master.ref == f"kms:{kms_key['Arn']}"
    assert master.unwrap(wrapped, CTX) == plaintext
    assert kms_key_of(f"kms://{kms_key['KeyId']}").unwrap(wrapped, dict(CTX)) == plaintext


def test_kms_wrap_unwrap_round_trip(kms_key: dict[str, str]) -> None:
    master = kms_key_of(f"kms://{kms_key['KeyId']}")
    data_key = secrets.token_bytes(32)
    wrapped = master.wrap(data_key, {"plan": "p-1"})
    assert data_key not in wrapped
    assert master.unwrap(wrapped, {"plan": "p-1"}) == data_key
    assert master.ref == f"kms:{kms_key['Arn']}"


def test_kms_by_alias_and_by_arn(kms_key: dict[str, str]) -> None:
    alias = f"alias/resultsvc-{uuid.uuid4().hex[:8]}"
    boto3.client("kms").create_alias(AliasName=alias, TargetKeyId=kms_key["KeyId"])
    by_alias = kms_key_of(f"kms://{alias}")
    assert by_alias.ref == f"kms:{kms_key['Arn']}"  # DescribeKey before any wrap
    by_arn = kms_key_of(f"kms://{kms_key['Arn']}")
    data_key, wrapped = by_alias.new_data_key(CTX)
    assert by_arn.unwrap(wrapped, CTX) == data_key
    assert by_alias.unwrap(by_arn.wrap(data_key, CTX), CTX) == data_key


@pytest.mark.parametrize("wrong", [{"backup": "other"}, {}, {**CTX, "plan": "p"}])
def test_kms_wrong_encryption_context_refused(
    kms_key: dict[str, str], wrong: dict[str, str]
) -> None:
    master = kms_key_of(f"kms://{kms_key['KeyId']}")
    plaintext, wrapped = master.new_data_key(CTX)
    data_key = secrets.token_bytes(32)
    wrapped_too = master.wrap(data_key, CTX)
    for blob in (wrapped, wrapped_too):
        with refused(plaintext, data_key, match="InvalidCiphertextException") as info:
            master.unwrap(blob, wrong)
        assert kms_key["KeyId"] in str(info.value)
        assert info.value.aws_code == "InvalidCiphertextException"


def test_kms_blob_of_another_key_refused(aws: str) -> None:
    kms = boto3.client("kms")
    first, second = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    plaintext, wrapped = kms_key_of(f"kms://{first}").new_data_key(CTX)
    # moto answers AccessDeniedException; AWS says IncorrectKeyException
    with refused(plaintext, match=f"Decrypt failed for key {second}: (AccessDenied|IncorrectKey)"):
        kms_key_of(f"kms://{second}").unwrap(wrapped, CTX)


@pytest.mark.parametrize("unknown", [str(uuid.uuid4()), "alias/does-not-exist", "not-a-key-id"])
def test_kms_unknown_key_named_in_the_error(aws: str, unknown: str) -> None:
    master = kms_key_of(f"kms://{unknown}")
    data_key = secrets.token_bytes(32)
    with refused(data_key, match=f"GenerateDataKey failed for key {unknown}: NotFoundException"):
        master.new_data_key(CTX)
    with refused(data_key, match=f"Encrypt failed for key {unknown}: NotFoundException"):
        master.wrap(data_key, CTX)
    with refused(match=f"DescribeKey failed for key {unknown}: NotFoundException"):
        _ = master.ref
    with refused(match=f"RotateKeyOnDemand failed for key {unknown}: NotFoundException"):
        master.rotate()


def test_kms_rotate_on_demand(kms_key: dict[str, str]) -> None:
    master = kms_key_of(f"kms://{kms_key['KeyId']}")
    plaintext, wrapped = master.new_data_key(CTX)
    before = master.ref
    assert master.rotate() == before == f"kms:{kms_key['Arn']}"  # same key, new material
    rotations = boto3.client("kms").list_key_rotations(KeyId=kms_key["KeyId"])["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"]
    assert master.unwrap(wrapped, CTX) == plaintext
    data_key = secrets.token_bytes(32)
    assert master.unwrap(master.wrap(data_key, CTX), CTX) == data_key


class _RefusingKms(BaseHTTPRequestHandler):
    """A KMS endpoint that answers every request with one AWS JSON error."""

    code = "UnsupportedOperationException"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"__type": self.code, "message": "refused by the test endpoint"})
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("code", ["UnsupportedOperationException", "UnknownOperationException"])
def test_kms_rotate_unsupported_points_at_automatic_rotation(
    aws: str, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """moto implements RotateKeyOnDemand, so the refusal comes from a real HTTP endpoint.

    AWS answers UnsupportedOperationException for keys that cannot rotate on
    demand (asymmetric, HMAC, imported material, custom key stores); a server
    without the operation answers UnknownOperationException.
    """
    handler = type("Handler", (_RefusingKms,), {"code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{server.server_port}")
        key = str(uuid.uuid4())
        with refused(match="KMS rotates it automatically") as info:
            kms_key_of(f"kms://{key}").rotate()
    finally:
        server.shutdown()
        server.server_close()
    assert key in str(info.value) and code in str(info.value)
    assert "enable-key-rotation" in str(info.value)
    assert info.value.aws_code == code


# ---------------------------------------------------------------------- secrets


def test_reprs_hold_no_key_material(key_path: Path, kms_key: dict[str, str]) -> None:
    master = file_key(key_path)
    data_key, _ = master.new_data_key(CTX)
    key = key_path.read_bytes()
    master.rotate()
    kms = kms_key_of(f"kms://{kms_key['KeyId']}")
    kms_data_key, _ = kms.new_data_key(CTX)
    everything = [key, key_path.read_bytes(), data_key, kms_data_key]
    objects: list[MasterKey] = [master, kms]
    for obj in objects:
        for text in (repr(obj), str(obj), repr(vars(obj))):
            assert_no_secrets(text, everything)
    assert repr(master) == f"FileMasterKey(path={str(key_path)!r})"
    assert repr(kms) == f"KmsMasterKey(key={kms_key['KeyId']!r})"
    assert not any(isinstance(v, bytes | bytearray) for v in vars(master).values())
    assert not any(isinstance(v, bytes | bytearray) for v in vars(kms).values())


def test_the_secret_check_itself_catches_leaks() -> None:
    """Guard the guard: each spelling of a key in a message is caught."""
    key = secrets.token_bytes(32)
    while b"\n" in key or b"\r" in key:  # the message below folds line breaks away
        key = secrets.token_bytes(32)
    for leaked in spellings(key):
        with pytest.raises(AssertionError):
            check_error(MasterKeyError(f"oops {leaked}".replace("\n", " ")), [key])
    with pytest.raises(AssertionError):
        check_error(MasterKeyError(f"oops {key!r}"), [key])
