"""S3 failing under backups and restore drills: 500, 503, SlowDown, refusals (PostgreSQL).

The backup store is an Object Lock bucket on moto, reached through the proxy
of ``tests/aws_proxy.py`` (``AWS_ENDPOINT_URL_S3``), which answers chosen
requests with an S3 error instead of forwarding them. Faults are counted
(every n-th PUT, every GET of one key), never random, so every run fails the
same requests. The store's client retries in botocore's adaptive mode (10
retries, see ``retention/stores.py``): passing errors must be ridden out
with an exact result, lasting ones must fail the backup or the drill in one
line that names the store and the object, leaving nothing half-done listed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from retention.backup import BackupFailed
from retention.catalog import BackupInfo, manifest_key, pack_key
from service.backups import Backups
from service.runtime import Runtime
from service.scheduler import JOBS, JobRunner, job_status
from service.settings import Settings
from tests.aws_proxy import AwsProxy, Fault, Recorded, aws_proxy
from tests.reliability_support import (
    BACKUP_ID,
    EveryNth,
    FirstPerKey,
    Tenant,
    aggregates_up_to,
    assert_one_line_failure,
    big_batches,
    log_rows,
    make_locked_bucket,
    new_tenant,
    object_key,
    operations,
    record_run,
    run_cli,
    s3_operation,
    small_run,
)
from tests.test_drills import ScratchWatch

pytestmark = pytest.mark.postgres

BACKUP_JOB = next(spec for spec in JOBS if spec.name == "backup")
RETRIES = 10
"""botocore attempts a request 1 + 10 times (``max_attempts`` in ``retention/stores.py``)."""


@pytest.fixture
def database_url(pg_url: str) -> str:
    return pg_url


@dataclass
class S3Stack:
    runtime: Runtime
    proxy: AwsProxy
    s3: Any  # a boto3 client straight to moto: what is really in the bucket
    bucket: str
    env: dict[str, str]  # for `resultsvc` processes: the settings and the proxy's endpoint
    tenant: Tenant

    @property
    def root(self) -> str:
        return "prefix/"

    def backups(self) -> Backups:
        """Opened anew: a new S3 client, as each command and each job gets."""
        return Backups.open(self.runtime)

    def keys(self) -> list[str]:
        """Every key under the store's prefix (backups and keyring), straight from moto."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.root
        )
        return sorted(
            entry["Key"][len(self.root) :] for page in pages for entry in page.get("Contents", [])
        )

    def uploads(self) -> list[str]:
        """Multipart uploads left unfinished in the bucket."""
        answer = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    def catch_up(self) -> None:
        self.runtime.projector.catch_up()


@pytest.fixture
def stack(
    aws: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3Stack]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=aws)
    bucket = make_locked_bucket(s3)
    env = {
        "RESULTSVC_DATABASE_URL": database_url,
        "RESULTSVC_BACKUP_URL": f"s3://{bucket}/prefix",
        "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
    }
    with aws_proxy(aws) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        env["AWS_ENDPOINT_URL_S3"] = proxy.url
        with Runtime.open(Settings.from_env(env)) as runtime:
            tenant = new_tenant(runtime.app, "s3-faults")
            yield S3Stack(runtime, proxy, s3, bucket, env, tenant)


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _chain_rows(backups: Backups, backup_id: str) -> list[tuple[int, Any, int, str, bytes]]:
    """Every record a restore of ``backup_id`` replays, as the log's rows."""
    return [
        (r.position, r.originator_id, r.originator_version, r.topic, bytes(r.state))
        for member in backups.reader.chain(backup_id)
        for r in backups.reader.records(member.id)
    ]


def _assert_locked(stack: S3Stack, backup: BackupInfo) -> None:
    """Each object of the backup is locked (COMPLIANCE) at least until the chain expires."""
    names = [manifest_key(backup.id)] + [
        pack_key(backup.id, p["name"]) for p in backup.manifest["packs"]
    ]
    for name in names:
        head = stack.s3.head_object(Bucket=stack.bucket, Key=stack.root + name)
        assert head["ObjectLockMode"] == "COMPLIANCE", name
        assert head["ObjectLockRetainUntilDate"] >= backup.expires_at.astimezone(UTC), name


def _retried(proxy: AwsProxy, faulted: list[Recorded]) -> list[str]:
    """Faulted requests that were never sent again and answered: should be none."""
    with proxy.lock:
        requests = list(proxy.requests)
    failed = {id(r) for r in faulted}
    missing = []
    for request in faulted:
        after = requests[requests.index(request) + 1 :]
        if not any(
            r.method == request.method and r.path == request.path and id(r) not in failed
            for r in after
        ):
            missing.append(f"{s3_operation(request)} {request.path}")
    return missing


# ============================================= 1. passing errors: retried, exact


def test_a_full_and_an_incremental_ride_out_500_503_and_slowdown_and_restore_exactly(
    stack: S3Stack,
) -> None:
    app, tenant = stack.runtime.app, stack.tenant
    small_run(app, tenant, "weekly", seed=1)
    record_run(app, tenant, "nightly", big_batches(5_200, 10, seed=2))  # ~9 MB: two parts
    slow_down = Fault(503, "SlowDown", "Please reduce your request rate.")
    faults: list[EveryNth | FirstPerKey] = [
        EveryNth(3, slow_down, operations("PutObject")),
        EveryNth(2, slow_down, operations("UploadPart")),
        FirstPerKey(
            Fault(500, "InternalError", "We encountered an internal error."),
            operations(
                "CreateMultipartUpload",
                "CompleteMultipartUpload",
                "PutObjectTagging",
                "PutObjectRetention",
            ),
        ),
        EveryNth(3, Fault(503, "ServiceUnavailable", "Please retry."), _method("GET")),
    ]
    stack.proxy.rules.extend(faults)

    backups = stack.backups()
    full = backups.writer.run(full=True).info
    small_run(app, tenant, "deploy", seed=3)  # a new plan: its key goes to the keyring
    record_run(app, tenant, "nightly", big_batches(2_000, 10, seed=4))  # one put_object
    incremental = backups.writer.run().info
    assert (full.kind, incremental.kind, incremental.parent) == ("full", "incremental", full.id)
    assert incremental.first_position == full.last_position + 1

    faulted = [request for rule in faults for request in rule.faulted]
    hit = Counter(s3_operation(request) for request in faulted)
    assert set(hit) >= {
        "PutObject",  # plan keys, packs, manifests
        "UploadPart",
        "CreateMultipartUpload",
        "CompleteMultipartUpload",
        "PutObjectTagging",  # the multipart pack's SHA-256
        "PutObjectRetention",  # its Object Lock, which moto drops on multipart uploads
        "GetObject",
    }, hit
    assert _retried(stack.proxy, faulted) == []

    # What was written is exactly the log, every object locked, no upload left open.
    for backup in (full, incremental):
        report = backups.reader.verify(backup.id)
        assert report.ok, report.problems
        _assert_locked(stack, backup)
    assert _chain_rows(backups, incremental.id) == log_rows(app, incremental.last_position)
    assert stack.uploads() == []
    assert backups.catalog.ids() == [full.id, incremental.id]

    # A drill through the same faults, and the first read of every pack failing
    # too, passes with exact counts.
    packs = FirstPerKey(
        Fault(500, "InternalError", "We encountered an internal error."),
        lambda r: s3_operation(r) == "GetObject" and r.path.endswith(".rbp"),
    )
    stack.proxy.rules.insert(0, packs)
    drill, _ = backups.drill(incremental.id)
    assert (drill.passed, drill.reason, drill.mismatches) == (True, "", [])
    assert drill.chain == [full.id, incremental.id]
    assert drill.events_restored == len(log_rows(app, incremental.last_position))
    assert drill.aggregates_compared == aggregates_up_to(app, incremental.last_position)
    assert packs.keys == {
        f"GetObject {stack.root}{pack_key(backup.id, pack['name'])}"
        for backup in (full, incremental)
        for pack in backup.manifest["packs"]
    }
    assert _retried(stack.proxy, packs.faulted) == []


def _method(name: str) -> Any:
    return lambda request: request.method == name


# ======================================= 2. lasting errors: a clean, loud failure

FAILING_WRITES = {
    # every PUT refused, as a bucket policy denying s3:PutObject does
    "every PUT refused": (
        lambda request: request.method == "PUT",
        Fault(403, "AccessDenied", "Access Denied"),
    ),
    # every part refused (a checksum S3 does not accept): the upload must be
    # aborted, not left open
    "every UploadPart refused": (
        operations("UploadPart"),
        Fault(400, "BadDigest", "The SHA256 you specified did not match the calculated checksum."),
    ),
    # the completion refused: the upload must be aborted too
    "every CompleteMultipartUpload refused": (
        operations("CompleteMultipartUpload"),
        Fault(400, "InvalidPart", "One or more of the specified parts could not be found."),
    ),
}
"""4xx answers, which botocore does not retry. A 5xx on every request ends the
same way after 10 retries, ~23 s of backoff on average: the drill test below
pays that once."""


@pytest.mark.parametrize("case", list(FAILING_WRITES))
def test_a_backup_whose_writes_keep_failing_fails_cleanly_and_the_next_one_works(
    stack: S3Stack, case: str, tmp_path: Path
) -> None:
    match, fault = FAILING_WRITES[case]
    multipart = "PUT" not in case
    app, tenant = stack.runtime.app, stack.tenant
    small_run(app, tenant, "nightly", seed=1)
    first = stack.backups().writer.run(full=True).info
    if multipart:  # over one 8 MiB part: the pack goes up as a multipart upload
        record_run(app, tenant, "nightly", big_batches(5_200, 10, seed=2))
    else:  # the same plans: no new key for the keyring, the pack is the first PUT
        small_run(app, tenant, "nightly", seed=2)
    keys_before = stack.keys()
    head = app.head_position()
    rule = EveryNth(1, fault, match)
    stack.proxy.rules.append(rule)

    # The command: non-zero, one line naming the store, the object and S3's answer.
    failed = run_cli(["backup", "run"], tmp_path, stack.env)
    where = f"s3://{stack.bucket}/prefix/backups/"
    line = assert_one_line_failure(failed, where, f"{fault.code} ({fault.message})")
    found = BACKUP_ID.search(line)
    assert found is not None, line
    assert f"{where}{found.group(0)}/pack-000000.rbp: {fault.code}" in line, line
    assert rule.seen == 1  # refused, not retried

    # The scheduler's job fails the same way and records why.
    runner = JobRunner(stack.runtime)
    assert runner.run(BACKUP_JOB) == "failed"
    status = {job["job"]: job for job in job_status(stack.runtime.views)}["backup"]
    assert status["last_success"] is None and status["last_failure"] is not None
    reason = str(status["last_error"])
    assert reason.startswith(f"{BackupFailed.__name__}: backup "), reason
    assert where in reason and f"{fault.code} ({fault.message})" in reason, reason
    assert rule.seen == 2

    # Nothing of either is listed or left: no manifest, no object, no open
    # upload, no record in the log; `backup list` shows the job's failure.
    assert stack.keys() == keys_before
    assert stack.uploads() == []
    assert app.head_position() == head
    listed = _json(run_cli(["backup", "list", "--json"], tmp_path, stack.env))
    assert [b["id"] for b in listed["backups"]] == [first.id]
    assert {job["job"]: job for job in listed["jobs"]}["backup"] == status

    # Once S3 takes writes again, the next backup follows the last complete
    # one: by the command after a refused PUT, by the job after a refused part.
    stack.proxy.rules.remove(rule)
    if multipart:
        assert runner.run(BACKUP_JOB) == "done"
        after = {job["job"]: job for job in job_status(stack.runtime.views)}["backup"]
        assert after["last_success"] is not None and after["last_error"] == reason
        latest = stack.backups().catalog.all()[-1]
        taken: dict[str, Any] = {
            "id": latest.id,
            "kind": latest.kind,
            "parent": latest.parent,
            "first_position": latest.first_position,
            "last_position": latest.last_position,
        }
    else:
        taken = _json(run_cli(["backup", "run", "--json"], tmp_path, stack.env))
    assert (taken["kind"], taken["parent"]) == ("incremental", first.id)
    assert (taken["first_position"], taken["last_position"]) == (first.last_position + 1, head)
    verified = _json(run_cli(["backup", "verify", taken["id"], "--json"], tmp_path, stack.env))
    assert verified["ok"] is True and verified["chain"] == [first.id, taken["id"]]
    assert verified["records"] == len(log_rows(app, head)) - len(log_rows(app, first.last_position))


def test_when_writes_and_the_clean_up_are_refused_the_reason_is_the_refused_write(
    stack: S3Stack, tmp_path: Path
) -> None:
    """A bucket policy that lets the service read but neither write nor delete."""
    app, tenant = stack.runtime.app, stack.tenant
    small_run(app, tenant, "nightly", seed=1)
    first = stack.backups().writer.run(full=True).info
    record_run(app, tenant, "nightly", big_batches(5_200, 10, seed=2))
    refused = EveryNth(
        1, Fault(403, "AccessDenied", "Access Denied"), lambda r: r.method in ("PUT", "DELETE")
    )
    stack.proxy.rules.append(refused)

    failed = run_cli(["backup", "run"], tmp_path, stack.env)
    line = assert_one_line_failure(failed, f"s3://{stack.bucket}/prefix/backups/", "AccessDenied")
    assert [s3_operation(r) for r in refused.faulted] == ["UploadPart", "AbortMultipartUpload"]
    listed = _json(run_cli(["backup", "list", "--json"], tmp_path, stack.env))
    assert [b["id"] for b in listed["backups"]] == [first.id]
    # The upload could not be aborted: it stays open until a sweep can abort it.
    assert len(stack.uploads()) == 1
    assert ": write s3://" in line, line


# ================================================ 3. restore drills, S3 reads failing


@dataclass
class Chain:
    full: BackupInfo
    incremental: BackupInfo

    def pack(self, backup: BackupInfo) -> str:
        return pack_key(backup.id, backup.manifest["packs"][0]["name"])


def _two_backups(stack: S3Stack) -> Chain:
    app, tenant = stack.runtime.app, stack.tenant
    small_run(app, tenant, "nightly", seed=1)
    record_run(app, tenant, "nightly", big_batches(1_500, 10, seed=2))
    backups = stack.backups()
    full = backups.writer.run(full=True).info
    small_run(app, tenant, "weekly", seed=3)
    record_run(app, tenant, "nightly", big_batches(500, 10, seed=4))
    incremental = backups.writer.run().info
    assert incremental.parent == full.id
    return Chain(full, incremental)


def _drills(stack: S3Stack) -> list[dict[str, Any]]:
    stack.catch_up()
    items: list[dict[str, Any]] = stack.runtime.queries.list_drills(None, 100).items
    return items


def test_a_drill_through_503s_on_every_third_read_passes_with_exact_counts(
    stack: S3Stack, database_url: str, tmp_path: Path
) -> None:
    chain = _two_backups(stack)
    app = stack.runtime.app
    rule = EveryNth(3, Fault(503, "ServiceUnavailable", "Please retry."), _method("GET"))
    stack.proxy.rules.append(rule)
    watch = ScratchWatch(database_url)

    report = _json(run_cli(["restore-drill", "--latest", "--json"], tmp_path, stack.env))
    last = chain.incremental.last_position
    assert (report["backup_id"], report["passed"], report["reason"]) == (
        chain.incremental.id,
        True,
        "",
    )
    assert report["chain"] == [chain.full.id, chain.incremental.id]
    assert report["events_restored"] == len(log_rows(app, last))
    assert report["aggregates_compared"] == aggregates_up_to(app, last)
    assert report["objects_verified"] == 4  # two manifests, two packs
    assert report["mismatches"] == [] and report["views_rebuilt"] == 3
    watch.assert_clean(report["scratch"])
    hit = Counter(s3_operation(request) for request in rule.faulted)
    assert hit["GetObject"] >= 2 and _retried(stack.proxy, rule.faulted) == [], hit
    assert [(d["backup_id"], d["passed"]) for d in _drills(stack)] == [(chain.incremental.id, True)]


LASTING_READS = ["one pack always 500", "one pack refused once the drill loads"]


@pytest.mark.parametrize("case", LASTING_READS)
def test_a_drill_that_cannot_read_a_pack_fails_naming_it_and_leaves_no_scratch(
    stack: S3Stack, case: str, database_url: str, tmp_path: Path
) -> None:
    chain = _two_backups(stack)
    if case == LASTING_READS[0]:
        # The full's pack, a member of the chain: every read of it fails.
        key, reads_before = chain.pack(chain.full), 0
        fault = Fault(500, "InternalError", "We encountered an internal error.")
    else:
        # The target's pack reads fine while verified, then is refused: the
        # drill fails after its scratch store was created and loaded.
        key, reads_before = chain.pack(chain.incremental), 1
        fault = Fault(403, "AccessDenied", "Access Denied")
    reads = Counter[str]()

    def lasting(request: Recorded) -> Fault | None:
        if s3_operation(request) != "GetObject" or object_key(request) != stack.root + key:
            return None
        reads[key] += 1
        return fault if reads[key] > reads_before else None

    stack.proxy.rules.append(lasting)
    watch = ScratchWatch(database_url)
    head = stack.runtime.app.head_position()
    keys = stack.keys()

    result = run_cli(["restore-drill", "--latest", "--json"], tmp_path, stack.env)
    where = f"s3://{stack.bucket}/prefix/{key}"
    line = assert_one_line_failure(
        result, f"drill of {chain.incremental.id} FAILED", where, fault.code
    )
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["reason"] == f"StoreError: get {where}: {fault.code} ({fault.message})"
    assert line.endswith(report["reason"])
    assert report["events_restored"] == 0  # a failed load leaves nothing restored
    if fault.status >= 500:
        assert reads[key] == 1 + RETRIES  # every attempt botocore makes, then given up
        assert report["scratch"] == ""  # stopped while verifying: no scratch was made
        assert "decrypt and load" not in report["steps"]
    else:
        assert reads[key] == 2  # verified once, refused at the load: no retry of a 403
        assert report["scratch"].startswith("scratch PostgreSQL database resultsvc_drill_")
        assert "decrypt and load" in report["steps"] and "rebuild views" not in report["steps"]
    watch.assert_clean(report["scratch"])

    # Recorded: an event right after the head, and the drills view says why.
    assert stack.runtime.app.head_position() == head + 1
    drills = _drills(stack)
    assert [(d["backup_id"], d["passed"], d["reason"]) for d in drills] == [
        (chain.incremental.id, False, report["reason"])
    ]
    assert drills[0]["report"] == report
    assert stack.keys() == keys  # a drill only reads the store
    stack.proxy.rules.remove(lasting)
    assert stack.backups().reader.verify(chain.incremental.id).ok
