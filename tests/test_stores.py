"""The backup object stores: one suite over a folder, a locked S3 bucket and a plain one.

S3 is moto in server mode over HTTP (the ``aws`` fixture). moto is lax where
AWS is strict (see ``/work/shared/notes/moto-gaps.md``): it drops the Object
Lock of multipart uploads, so the lock tests check what the *store* ends up
with (read back with ``head_object``), not what moto was asked for.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import stat
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from retention.stores import (
    PART_SIZE,
    FileStore,
    ObjectMissing,
    ObjectStore,
    S3Store,
    StoreError,
    open_store,
)

REGION = "eu-west-1"
VARIANTS = ["file", "s3-locked", "s3-plain"]


def tomorrow() -> datetime:
    """A retain-until in whole seconds (S3 keeps seconds), far enough not to expire mid-test."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


def make_bucket(client: Any, *, lock: bool) -> str:
    name = f"rs-test-{uuid.uuid4().hex[:16]}"
    extra = {"ObjectLockEnabledForBucket": True} if lock else {}
    client.create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION}, **extra
    )
    return name


@pytest.fixture
def s3(aws: str) -> Any:
    """A raw client on moto, to look behind the store's back."""
    import boto3

    return boto3.client("s3")


@pytest.fixture(params=VARIANTS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path}/backups")
    client = request.getfixturevalue("s3")
    bucket = make_bucket(client, lock=request.param == "s3-locked")
    return open_store(f"s3://{bucket}/backups/acme")


@pytest.fixture
def locked_store(s3: Any) -> S3Store:
    store = open_store(f"s3://{make_bucket(s3, lock=True)}/backups")
    assert isinstance(store, S3Store)
    return store


def raw_versions(store: S3Store, key: str) -> list[str]:
    """Every version id and delete marker of exactly ``key``, straight from S3."""
    full = store.full_key(key)
    answer = store.client.list_object_versions(Bucket=store.bucket, Prefix=full)
    entries = answer.get("Versions", []) + answer.get("DeleteMarkers", [])
    return [entry["VersionId"] for entry in entries if entry["Key"] == full]


def pending_uploads(store: S3Store) -> list[str]:
    answer = store.client.list_multipart_uploads(Bucket=store.bucket)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def pieces(total: int, seed: int = 7) -> Iterator[bytes]:
    """``total`` pseudo-random bytes in uneven pieces (odd sizes, some over a part's worth)."""
    rng = random.Random(seed)
    sizes = [1, 3 * 1024 * 1024 + 17, 123_457, 5 * 1024 * 1024 - 3, 999, 2 * 1024 * 1024 + 1]
    written = 0
    index = 0
    while written < total:
        size = min(sizes[index % len(sizes)], total - written)
        index += 1
        written += size
        yield rng.randbytes(size)


# ------------------------------------------------------------------ round trip


def test_put_get_head_list_round_trip(store: ObjectStore) -> None:
    objects = {
        "b1/chunk-000001": b"first chunk",
        "b1/chunk-000000": b"zeroth chunk",
        "b1/nested/deep/manifest.json": b'{"chunks": 2}',
        "b10/chunk-000000": b"another backup",
        "top": b"",
    }
    for key, data in objects.items():
        info = store.put(key, data)
        assert (info.key, info.size, info.sha256) == (
            key,
            len(data),
            hashlib.sha256(data).hexdigest(),
        )

    for key, data in objects.items():
        assert store.get(key) == data
        info = store.head(key)
        assert (info.key, info.size, info.sha256) == (
            key,
            len(data),
            hashlib.sha256(data).hexdigest(),
        )

    assert store.get_range("b1/chunk-000001", 6, 5) == b"chunk"
    assert store.list("") == sorted(objects)
    assert store.list("b1/") == [
        "b1/chunk-000000",
        "b1/chunk-000001",
        "b1/nested/deep/manifest.json",
    ]
    assert store.list("b1") == [*store.list("b1/"), "b10/chunk-000000"]
    assert store.list("b1/nested/") == ["b1/nested/deep/manifest.json"]
    assert store.list("b1/chunk-00000") == ["b1/chunk-000000", "b1/chunk-000001"]
    assert store.list("nothing/") == []

    store.put("b1/chunk-000001", b"replaced")
    assert store.get("b1/chunk-000001") == b"replaced"


def test_get_range_edges(store: ObjectStore) -> None:
    store.put("r", b"0123456789")
    assert store.get_range("r", 0, 10) == b"0123456789"
    assert store.get_range("r", 8, 100) == b"89"  # short at the end, as S3 does
    assert store.get_range("r", 3, 0) == b""
    with pytest.raises(StoreError, match="r"):
        store.get_range("r", 10, 1)
    with pytest.raises(ValueError):
        store.get_range("r", -1, 1)


def test_s3_listing_is_relative_to_the_prefix(s3: Any) -> None:
    bucket = make_bucket(s3, lock=False)
    one = open_store(f"s3://{bucket}/one")
    sibling = open_store(f"s3://{bucket}/one-two/")
    one.put("x", b"1")
    sibling.put("x", b"2")
    assert one.list("") == ["x"]
    assert sibling.list("") == ["x"]
    assert (one.get("x"), sibling.get("x")) == (b"1", b"2")
    keys = [entry["Key"] for entry in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["one-two/x", "one/x"]
    assert sibling.url == f"s3://{bucket}/one-two"


def test_s3_head_reads_a_foreign_objects_checksum(s3: Any) -> None:
    """An object put by someone else: S3's own full-object SHA-256, or a clear refusal."""
    bucket = make_bucket(s3, lock=False)
    store = open_store(f"s3://{bucket}")
    s3.put_object(Bucket=bucket, Key="with-checksum", Body=b"abc", ChecksumAlgorithm="SHA256")
    assert store.head("with-checksum").sha256 == hashlib.sha256(b"abc").hexdigest()
    s3.put_object(Bucket=bucket, Key="bare", Body=b"abc")
    with pytest.raises(StoreError, match="bare: no SHA-256"):
        store.head("bare")


# ------------------------------------------------------------------ streaming


def test_streaming_writer_holds_at_most_one_part(store: ObjectStore) -> None:
    total = 20 * 1024 * 1024 + 12_345  # three parts on S3: 8 + 8 + 4 MiB
    expected = hashlib.sha256()
    writer = store.writer("big/chunk-000000")
    most = 0
    for piece in pieces(total):
        expected.update(piece)
        writer.write(piece)
        most = max(most, writer.buffered)  # type: ignore[attr-defined]
    assert store.list("big/") == []  # nothing under the key before close
    info = writer.close()

    assert most <= PART_SIZE
    assert (info.size, info.sha256) == (total, expected.hexdigest())
    head = store.head("big/chunk-000000")
    assert (head.size, head.sha256) == (total, expected.hexdigest())
    data = store.get("big/chunk-000000")
    assert hashlib.sha256(data).hexdigest() == expected.hexdigest()
    assert (
        store.get_range("big/chunk-000000", PART_SIZE - 2, 4) == data[PART_SIZE - 2 : PART_SIZE + 2]
    )
    assert store.list("big/") == ["big/chunk-000000"]
    if isinstance(store, S3Store):
        raw = store.client.head_object(Bucket=store.bucket, Key=store.full_key("big/chunk-000000"))
        assert raw["ETag"].strip('"').endswith("-3")  # really a three-part upload
        assert pending_uploads(store) == []
    if isinstance(store, FileStore):
        assert not any(name.startswith(".tmp-") for name in os.listdir(store.root / "big"))


def test_file_writer_memory_stays_flat(tmp_path: Path) -> None:
    """Measured with tracemalloc on the folder store only: moto runs in this process, so on
    S3 its own copies of the parts would count too (the S3 writer's buffer is checked above)."""
    store = open_store(f"file://{tmp_path}")
    tracemalloc.start()
    try:
        writer = store.writer("flat")
        for piece in pieces(20 * 1024 * 1024):
            writer.write(piece)
            del piece
        writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * PART_SIZE


# ------------------------------------------------------------------ abort and crashes


def test_abort_leaves_nothing(store: ObjectStore) -> None:
    writer = store.writer("aborted/chunk")
    writer.write(b"x" * (PART_SIZE + 100))  # one part already uploaded on S3
    writer.abort()
    writer.abort()  # twice is harmless
    with pytest.raises(ValueError):
        writer.write(b"more")
    assert store.list("") == []
    assert store.abort_incomplete("") == 0
    with pytest.raises(ObjectMissing):
        store.get("aborted/chunk")
    if isinstance(store, S3Store):
        assert pending_uploads(store) == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the dropped writer's open temp file
def test_crashed_writer_is_cleaned_by_abort_incomplete(store: ObjectStore) -> None:
    writer = store.writer("crash/chunk-000003")
    writer.write(b"y" * (2 * PART_SIZE))  # two parts uploaded, then the process "dies"
    del writer
    gc.collect()

    assert store.list("") == []
    assert store.abort_incomplete("other/") == 0
    assert store.abort_incomplete("crash/") == 1
    assert store.abort_incomplete("crash/") == 0
    assert store.list("") == []
    with pytest.raises(ObjectMissing):
        store.head("crash/chunk-000003")
    if isinstance(store, S3Store):
        assert pending_uploads(store) == []
    if isinstance(store, FileStore):
        assert os.listdir(store.root / "crash") == []


def test_writer_is_done_after_close(store: ObjectStore) -> None:
    writer = store.writer("closed-twice")
    writer.write(b"z")
    writer.close()
    with pytest.raises(ValueError):
        writer.close()
    writer.abort()  # after close: the object stays
    assert store.get("closed-twice") == b"z"


# ------------------------------------------------------------------ Object Lock


def test_locked_bucket_locks_single_and_multipart_objects(locked_store: S3Store) -> None:
    until = tomorrow()
    assert locked_store.object_lock is True

    small = locked_store.put("b1/manifest.json", b"{}", retain_until=until)
    writer = locked_store.writer("b1/chunk-000000", retain_until=until)
    for piece in pieces(2 * PART_SIZE + 5):
        writer.write(piece)
    big = writer.close()

    for info in (small, big, locked_store.head("b1/manifest.json"), locked_store.head(big.key)):
        assert (info.lock_mode, info.retain_until) == ("COMPLIANCE", until)
    for key in ("b1/manifest.json", "b1/chunk-000000"):  # as S3 itself reports it
        raw = locked_store.client.head_object(
            Bucket=locked_store.bucket, Key=locked_store.full_key(key)
        )
        assert raw["ObjectLockMode"] == "COMPLIANCE"
        assert raw["ObjectLockRetainUntilDate"].astimezone(UTC) == until


def test_lock_that_cannot_be_set_fails_the_write(
    locked_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the fallback ``put_object_retention`` doesn't take either, close() fails and the
    unlocked version is removed: a backup that could be deleted early is no backup."""
    monkeypatch.setattr(locked_store.client, "put_object_retention", lambda **_: {})
    writer = locked_store.writer("b2/chunk-000000", retain_until=tomorrow())
    writer.write(b"w" * (PART_SIZE + 1))  # multipart: moto drops the lock
    with pytest.raises(StoreError, match=r"b2/chunk-000000: Object Lock not applied"):
        writer.close()
    assert raw_versions(locked_store, "b2/chunk-000000") == []
    assert pending_uploads(locked_store) == []


def test_retain_until_is_rounded_up_and_must_be_aware(locked_store: S3Store) -> None:
    until = tomorrow() + timedelta(microseconds=250_000)
    info = locked_store.put("rounded", b"r", retain_until=until)
    assert info.retain_until == until.replace(microsecond=0) + timedelta(seconds=1)
    with pytest.raises(ValueError, match="timezone"):
        locked_store.put("naive", b"n", retain_until=datetime(2030, 1, 1))


@pytest.mark.parametrize("remove", ["delete", "destroy"])
def test_locked_object_refuses_early_deletion(locked_store: S3Store, remove: str) -> None:
    until = tomorrow()
    locked_store.put("keep/manifest.json", b"{}", retain_until=until)
    with pytest.raises(StoreError) as caught:
        getattr(locked_store, remove)("keep/manifest.json")
    message = str(caught.value)
    assert "keep/manifest.json" in message
    assert until.isoformat() in message
    assert "\n" not in message
    assert locked_store.get("keep/manifest.json") == b"{}"
    assert len(raw_versions(locked_store, "keep/manifest.json")) == 1


def test_plain_bucket_ignores_retention(s3: Any) -> None:
    store = open_store(f"s3://{make_bucket(s3, lock=False)}/backups")
    assert store.object_lock is False
    info = store.put("b1/manifest.json", b"{}", retain_until=tomorrow())
    assert (info.lock_mode, info.retain_until) == (None, None)
    assert store.head("b1/manifest.json").lock_mode is None
    store.delete("b1/manifest.json")
    assert store.list("") == []


def test_folder_ignores_retention(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    assert store.object_lock is False
    info = store.put("m", b"{}", retain_until=tomorrow())
    assert (info.lock_mode, info.retain_until) == (None, None)
    store.delete("m")
    assert store.list("") == []


# ------------------------------------------------------------------ delete and destroy


@pytest.mark.parametrize("remove", ["delete", "destroy"])
def test_delete_and_destroy_remove_every_version(store: ObjectStore, remove: str) -> None:
    key, sibling = "keyring/plan-1", "keyring/plan-10"
    store.put(sibling, b"sibling key")
    store.put(key, b"version 1")
    store.put(key, b"version 2")
    if isinstance(store, S3Store):  # a delete marker between versions
        store.client.delete_object(Bucket=store.bucket, Key=store.full_key(key))
    store.put(key, b"version 3")
    if isinstance(store, S3Store):
        expected = 4 if store.object_lock else 1  # lock-enabled buckets are versioned
        assert len(raw_versions(store, key)) == expected

    getattr(store, remove)(key)

    with pytest.raises(ObjectMissing, match="plan-1"):
        store.get(key)
    assert store.list("keyring/") == [sibling]
    assert store.get(sibling) == b"sibling key"
    if isinstance(store, S3Store):
        assert raw_versions(store, key) == []
        assert len(raw_versions(store, sibling)) == 1
    if isinstance(store, FileStore):
        assert not (store.root / "keyring" / "plan-1").exists()
    getattr(store, remove)(key)  # again: nothing left to remove is fine


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_destroy_aborts_pending_uploads_of_the_key(locked_store: S3Store) -> None:
    locked_store.put("keyring/plan-2", b"old")
    writer = locked_store.writer("keyring/plan-2")
    writer.write(b"k" * PART_SIZE)
    del writer
    other = locked_store.writer("keyring/plan-20")
    other.write(b"k" * PART_SIZE)
    locked_store.destroy("keyring/plan-2")
    assert raw_versions(locked_store, "keyring/plan-2") == []
    assert pending_uploads(locked_store) == [locked_store.full_key("keyring/plan-20")]
    other.abort()


def test_file_destroy_zeroes_before_unlinking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"file://{tmp_path}")
    assert isinstance(store, FileStore)
    store.put("k", b"secret key material")
    seen: list[bytes] = []
    real_unlink = Path.unlink

    def spy(path: Path, missing_ok: bool = False) -> None:
        seen.append(path.read_bytes())
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", spy)
    store.destroy("k")
    assert seen == [bytes(len(b"secret key material"))]
    assert not (tmp_path / "k").exists()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "url", ["ftp://x", "s3://", "s3:///prefix", "s3://A_B/x", "file://", "backups", ""]
)
def test_bad_urls_are_refused_in_one_line(url: str) -> None:
    with pytest.raises((ValueError, StoreError)) as caught:
        open_store(url)
    assert "\n" not in str(caught.value)
    assert str(caught.value)


def test_unknown_bucket_is_named(aws: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store("s3://no-such-bucket-resultsvc/backups")
    message = str(caught.value)
    assert "no-such-bucket-resultsvc" in message
    assert "NoSuchBucket" in message
    assert "testing" not in message  # the (fake) credentials never appear
    assert "\n" not in message


def test_missing_object_is_named(store: ObjectStore) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.get("b9/chunk-000042"),
        lambda: store.get_range("b9/chunk-000042", 0, 10),
        lambda: store.get_range("b9/chunk-000042", 0, 0),
        lambda: store.head("b9/chunk-000042"),
    ]
    for call in calls:
        with pytest.raises(ObjectMissing) as caught:
            call()
        assert "b9/chunk-000042" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert "testing" not in str(caught.value)


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/etc/passwd", "a//b", "a/./b", "", "a\\b"]
)
def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.writer(key),
        lambda: store.get(key),
        lambda: store.head(key),
        lambda: store.delete(key),
        lambda: store.destroy(key),
    ):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        store.list("../")
    assert store.list("") == []


# ------------------------------------------------------------------ the folder store


def test_relative_folder_resolves_against_cwd_and_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("file://./var/backups")
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "var" / "backups"
    assert store.url == f"file://{tmp_path}/var/backups"
    assert stat.S_IMODE((tmp_path / "var" / "backups").stat().st_mode) == 0o700
    store.put("b1/chunk", b"c")
    assert stat.S_IMODE((tmp_path / "var" / "backups" / "b1").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var" / "backups" / "b1" / "chunk").stat().st_mode) == 0o600


def test_folder_ignores_temp_files_and_refuses_their_names(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put("b1/chunk", b"c")
    (tmp_path / "b1" / ".tmp-0123456789abcdef-chunk2").write_bytes(b"half")
    assert store.list("") == ["b1/chunk"]
    with pytest.raises(ValueError):
        store.put("b1/.tmp-0123456789abcdef-x", b"x")
    assert store.abort_incomplete("b1/chunk2") == 1
    assert os.listdir(tmp_path / "b1") == ["chunk"]
