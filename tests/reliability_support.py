"""Helpers of the reliability tests (``test_reliability_kill.py``, ``test_reliability_s3.py``).

Processes are the installed ``resultsvc`` script, started and stopped by id;
waits are bounded polls of a condition (never a sleep standing in for one);
S3 faults are counted, so the same requests fail on every run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

from domain.application import ResultsApp
from service.samples import batches, findings
from tests.aws_proxy import Fault, Recorded

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
ROLE_ARN = "arn:aws:iam::123456789012:role/resultsvc/Reliability"
REGION = "eu-west-1"
BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}([0-9]{6})?Z-[0-9a-f]{8}")

T = TypeVar("T")


# ------------------------------------------------------------------ waiting


def wait_until(
    probe: Callable[[], T | None], what: str, *, timeout: float = 120.0, every: float = 0.01
) -> T:
    """Poll ``probe`` until it returns something other than None/False; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)


# ------------------------------------------------------------------ processes


def cli_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without RESULTSVC_* settings, then ``env`` on top."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSVC_")}
    environ.update(env)
    return environ


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str], *, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RESULTSVC, *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    args: list[str], cwd: Path, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``resultsvc ARGS``; its output goes to ``log`` (a pipe nobody reads could fill)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [RESULTSVC, *args], cwd=cwd, env=cli_env(env), stdout=out, stderr=subprocess.STDOUT
        )


def sigkill(process: subprocess.Popen[Any]) -> None:
    """SIGKILL exactly this process and reap it; it must not have exited by itself before."""
    assert process.poll() is None, f"the process had already exited ({process.returncode})"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def stop(process: subprocess.Popen[Any]) -> None:
    """Clean-up for a ``finally``: kill this process (by its own handle) if it still runs."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def tail(log: Path, lines: int = 30) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit non-zero, one line on stderr naming every needle, no traceback; returns the line."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ data


@dataclass
class Tenant:
    team: UUID
    account: UUID
    plans: dict[str, UUID] = field(default_factory=dict)
    runs: dict[UUID, UUID] = field(default_factory=dict)  # run -> plan

    def plan(self, app: ResultsApp, name: str) -> UUID:
        if name not in self.plans:
            plan, _ = app.create_plan(self.team, self.account, name)
            self.plans[name] = plan.id
        return self.plans[name]


def new_tenant(app: ResultsApp, name: str = "reliability") -> Tenant:
    team, _ = app.create_team(f"{name}-{uuid.uuid4().hex[:6]}")
    account, _ = app.link_account_role(team.id, ROLE_ARN, verified=False, actor="test")
    return Tenant(team.id, account.id)


def big_batches(count: int, size: int, *, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Findings whose message is 3,000 hex characters of noise: ~1.5 KB each once stored.

    A few thousand of them make a backup of several 8 MiB parts, which would
    otherwise take hundreds of thousands of ordinary findings to ingest.
    """
    noise = random.Random(seed)
    for batch in batches(count, size, seed=seed):
        for finding in batch:
            finding["message"] = noise.randbytes(1500).hex()
        yield batch


def record_run(
    app: ResultsApp,
    tenant: Tenant,
    plan_name: str,
    chunks: Iterator[list[dict[str, Any]]],
    *,
    end: str | None = "succeeded",
) -> UUID:
    """A run of ``plan_name`` with these batches, ended as ``end`` (None: left running)."""
    run, _ = app.start_run(tenant.team, tenant.plan(app, plan_name))
    for chunk in chunks:
        app.record_results(tenant.team, run.id, chunk)
    if end is not None:
        app.complete_run(tenant.team, run.id, end)
    tenant.runs[run.id] = tenant.plans[plan_name]
    return run.id


def small_run(app: ResultsApp, tenant: Tenant, plan_name: str, *, seed: int) -> UUID:
    return record_run(app, tenant, plan_name, batches(40, 10, seed=seed))


def marked_findings(count: int, marker: str, *, seed: int) -> list[dict[str, Any]]:
    """``count`` findings whose messages say which batch they belong to: ``marker #i``."""
    found = list(findings(count, seed=seed))
    for index, finding in enumerate(found):
        finding["message"] = f"{marker} #{index}"
    return found


Row = tuple[int, UUID, int, str, bytes]


def log_rows(app: ResultsApp, last: int, topics: list[str] | None = None) -> list[Row]:
    """The event log's notifications up to ``last`` as comparable tuples."""
    rows: list[Row] = []
    start = 0
    while start < last:
        page = app.recorder.select_notifications(
            start=start, limit=500, stop=last, inclusive_of_start=False, topics=topics or ()
        )
        if not page:
            break
        rows.extend(
            (n.id, UUID(str(n.originator_id)), n.originator_version, n.topic, bytes(n.state))
            for n in page
        )
        start = page[-1].id
    return rows


def aggregates_up_to(app: ResultsApp, last: int) -> int:
    """How many aggregates have events at or before ``last`` (what a drill compares)."""
    return len({row[1] for row in log_rows(app, last)})


# ------------------------------------------------------------------ S3


def make_locked_bucket(client: Any) -> str:
    name = f"rs-reliability-{uuid.uuid4().hex[:12]}"
    client.create_bucket(
        Bucket=name,
        CreateBucketConfiguration={"LocationConstraint": REGION},
        ObjectLockEnabledForBucket=True,
    )
    return name


def s3_operation(request: Recorded) -> str:
    """The S3 API operation of a path-style request, from its method and query."""
    parts = urlsplit(request.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    has_key = parts.path.strip("/").count("/") >= 1
    method = request.method
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        if "tagging" in query:
            return "PutObjectTagging"
        if "retention" in query:
            return "PutObjectRetention"
        return "PutObject" if has_key else "PutBucket"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "Post"
    if method == "GET":
        if "object-lock" in query:
            return "GetObjectLockConfiguration"
        if "tagging" in query:
            return "GetObjectTagging"
        if "uploads" in query:
            return "ListMultipartUploads"
        if "versions" in query:
            return "ListObjectVersions"
        return "GetObject" if has_key else "ListObjects"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return "HeadObject" if method == "HEAD" and has_key else method


def object_key(request: Recorded) -> str:
    """``prefix/backups/<id>/pack-000000.rbp`` of a path-style request (bucket left out)."""
    return urlsplit(request.path).path.lstrip("/").split("/", 1)[1]


@dataclass
class EveryNth:
    """A proxy rule: every ``n``-th request ``match`` selects answers ``fault`` (counted here).

    Rules run under the proxy's lock, so the count is exact and the same
    requests fail on every run: no randomness.
    """

    n: int
    fault: Fault
    match: Callable[[Recorded], bool]
    seen: int = 0
    faulted: list[Recorded] = field(default_factory=list)

    def __call__(self, request: Recorded) -> Fault | None:
        if not self.match(request):
            return None
        self.seen += 1
        if self.seen % self.n:
            return None
        self.faulted.append(request)
        return self.fault


def operations(*names: str) -> Callable[[Recorded], bool]:
    return lambda request: s3_operation(request) in names


@dataclass
class FirstPerKey:
    """A proxy rule: the first request of each operation on each object ``match`` selects
    answers ``fault``; the retries go through."""

    fault: Fault
    match: Callable[[Recorded], bool]
    faulted: list[Recorded] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def __call__(self, request: Recorded) -> Fault | None:
        if not self.match(request):
            return None
        key = f"{s3_operation(request)} {object_key(request)}"
        if key in self.keys:
            return None
        self.keys.add(key)
        self.faulted.append(request)
        return self.fault
