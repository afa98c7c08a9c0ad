"""Handed-over AWS access keys never persist: a scan of every byte the service wrote.

The promise (``POST /v1/teams/{team}/accounts`` with ``method=access_keys``):
the keys make the team's role in the customer's account and are forgotten.
Not in an event, a table, a log line, an error answer, a traceback, a metric,
a backup, a temporary file or the idempotency store.

The test runs ``resultsvc serve --log-level debug`` as deployed, against a
customer account made in moto (an IAM user's real access key id, and a canary
as its secret: the moto session server does not check signatures), sends the
keys down every path they can take (a link, an idempotent link and its
replay, refusals of every kind), stops the server, takes a backup, and then
scans everything: the sandbox folders (database files, backups, master key,
logs, TMPDIR, HOME, working folder), the database row by row (and as
``pg_dump`` prints it), every HTTP answer, and the decrypted backup records.
Event states are zstd frames and PostgreSQL prints ``bytea`` as hex, so the
scanner also looks inside both. Control needles prove each scan can see what
it looks for.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import string
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode
from uuid import UUID

import boto3
import psycopg
import pytest
import zstandard
from psycopg import sql

from service.database import parse_database_url
from service.logs import QUIET
from tests.aws_proxy import AwsProxy, Fault, Recorded, aws_proxy
from tests.conftest import free_port

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient

RESULTSVC = str(Path(sys.executable).parent / "resultsvc")
PG_DUMP = "/usr/bin/pg_dump"
PRINCIPAL_ARN = "arn:aws:iam::123456789012:role/resultsvc-platform"
REGION = "eu-west-1"
START_SECONDS = 30.0
COMMAND_SECONDS = 60.0
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PG_HEX = re.compile(rb"\\x((?:[0-9a-f]{2}){8,})")  # bytea as pg_dump prints it
MAX_LAYERS = 3
# The moto server (the fake AWS) runs in the test process and logs there too: not the service.
MOTO_LOGGERS = ("moto", "werkzeug", "flask_cors")


# ----------------------------------------------------------- the customer's account


@dataclass(frozen=True)
class Customer:
    """An AWS account in moto, an IAM user's access key id in it, and a canary secret."""

    account_id: str
    access_key_id: str
    secret: str
    admin_iam: IAMClient  # acts in the customer's account, for the test's own set-up only

    def needles(self) -> dict[str, dict[str, str]]:
        """What must never persist; matched case-insensitively (lower-cased copies too)."""
        return {
            "secret": {
                "plain": self.secret,
                "url-encoded": quote(self.secret, safe=""),
                "json-escaped": self.secret.replace("/", "\\/"),
                "first 32 characters": self.secret[:32],
            },
            "access key id": {"plain": self.access_key_id},
        }

    def keys_body(self, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "method": "access_keys",
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret,
            "profile": "full",
        }
        body.update(changes)
        return body

    def foreign_role(self, name: str) -> None:
        """A role of that name in the customer's account that trusts someone else."""
        self.admin_iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": "arn:aws:iam::210987654321:root"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )


def canary_secret() -> str:
    """Matches the secret format ``[A-Za-z0-9/+=]{16,128}``; ``/`` and ``+`` make its
    URL-encoded and JSON-escaped forms differ from it."""
    alnum = string.ascii_letters + string.digits

    def chunk(size: int) -> str:
        return "".join(secrets.choice(alnum) for _ in range(size))

    return f"CANARYsecret{chunk(20)}/{chunk(6)}+{chunk(4)}"


def make_customer(endpoint: str) -> Customer:
    account = str(10**11 + secrets.randbelow(9 * 10**11))
    sts = boto3.client(
        "sts",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    creds = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/admin", RoleSessionName="setup")[
        "Credentials"
    ]
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    user = f"linker-{secrets.token_hex(4)}"
    iam.create_user(UserName=user)
    key_id = str(iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"])
    return Customer(account, key_id, canary_secret(), iam)


# ---------------------------------------------------------------------- the scanner


@dataclass(frozen=True)
class Hit:
    needle: str
    variant: str
    where: str
    offset: int

    def __str__(self) -> str:
        return f"{self.needle} ({self.variant}) in {self.where} at byte {self.offset}"


def _zstd_frames(data: bytes) -> Iterator[tuple[str, bytes]]:
    view = memoryview(data)
    start = data.find(ZSTD_MAGIC)
    while start >= 0:
        try:
            plain = zstandard.ZstdDecompressor().decompressobj().decompress(view[start:])
        except zstandard.ZstdError:
            plain = b""
        if plain:
            yield f"zstd frame at byte {start}", plain
        start = data.find(ZSTD_MAGIC, start + 1)


def _pg_hex(data: bytes) -> Iterator[tuple[str, bytes]]:
    for match in PG_HEX.finditer(data):
        yield f"bytea hex at byte {match.start()}", bytes.fromhex(match.group(1).decode())


@dataclass
class Scanner:
    """Finds needles in bytes, and inside the zstd frames and hex bytea those bytes hold."""

    needles: Mapping[str, Mapping[str, str]]
    hits: list[Hit] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=dict)

    def scan(self, where: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self.scanned[where] = len(raw)
        self._scan(where, raw, 0)

    def _scan(self, where: str, data: bytes, depth: int) -> None:
        lowered = data.lower()
        for name, variants in self.needles.items():
            for variant, value in variants.items():
                offset = lowered.find(value.lower().encode())
                if offset >= 0:
                    self.hits.append(Hit(name, variant, where, offset))
        if depth < MAX_LAYERS:
            for layer, inner in [*_zstd_frames(data), *_pg_hex(data)]:
                self._scan(f"{where} > {layer}", inner, depth + 1)

    def scan_tree(self, root: Path, label: str) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.scan(f"{label}/{path.relative_to(root)}", path.read_bytes())

    def found(self, needle: str) -> set[str]:
        """Where a needle was found (the location, layers included, without offsets)."""
        return {hit.where for hit in self.hits if hit.needle == needle}


# ------------------------------------------------------------- the service, sandboxed


@dataclass
class Answer:
    status: int
    body: bytes
    headers: list[tuple[str, str]]

    def json(self) -> Any:
        return json.loads(self.body)

    def raw(self) -> bytes:
        head = "\n".join(f"{name}: {value}" for name, value in self.headers)
        return head.encode() + b"\n\n" + self.body


@dataclass
class Sandbox:
    """Every folder the service may write to, inside the test's own tmp folder."""

    root: Path
    database_url: str
    moto: str  # the moto server: the test's own set-up talks to it directly
    aws: str  # what the service is given as AWS_ENDPOINT_URL: the proxy in front of moto
    answers: list[tuple[str, Answer]] = field(default_factory=list)
    tmp: Path = field(init=False)  # TMPDIR, TMP, TEMP
    home: Path = field(init=False)  # HOME
    cwd: Path = field(init=False)  # the working folder of every command
    logs: Path = field(init=False)  # stdout and stderr of every command
    backups: Path = field(init=False)  # RESULTSVC_BACKUP_URL

    def __post_init__(self) -> None:
        self.tmp, self.home, self.cwd, self.logs, self.backups = (
            self.root / name for name in ("tmp", "home", "cwd", "logs", "backups")
        )
        for folder in (self.tmp, self.home, self.cwd, self.logs):
            folder.mkdir(parents=True)

    def env(self) -> dict[str, str]:
        kept = {
            name: value
            for name, value in os.environ.items()
            if name in ("PATH", "LANG", "LC_ALL", "LC_CTYPE") or name.startswith("PG")
        }
        return kept | {
            "RESULTSVC_DATABASE_URL": self.database_url,
            "RESULTSVC_BACKUP_URL": f"file://{self.backups}",
            "RESULTSVC_MASTER_KEY": f"file://{self.root}/keys/master.key",
            "RESULTSVC_AWS_PRINCIPAL_ARN": PRINCIPAL_ARN,
            "AWS_ENDPOINT_URL": self.aws,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "TMPDIR": str(self.tmp),
            "TMP": str(self.tmp),
            "TEMP": str(self.tmp),
            "HOME": str(self.home),
        }

    def run(self, name: str, *args: str, stdin: bytes = b"", expect: int = 0) -> str:
        """Run a CLI command with the service's environment; its output goes to logs/."""
        out, err = self.logs / f"{name}.stdout", self.logs / f"{name}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            done = subprocess.run(
                [RESULTSVC, *args],
                cwd=self.cwd,
                env=self.env(),
                input=stdin,
                stdout=stdout,
                stderr=stderr,
                timeout=COMMAND_SECONDS,
                check=False,
            )
        assert done.returncode == expect, f"resultsvc {' '.join(args)}: {err.read_text()}"
        return out.read_text() if expect == 0 else err.read_text()

    @property
    def schema(self) -> str:
        return parse_database_url(self.database_url).schema


class Server:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.port = free_port()
        self.stderr_path = sandbox.logs / "serve.stderr"
        with (
            (sandbox.logs / "serve.stdout").open("wb") as stdout,
            self.stderr_path.open("wb") as stderr,
        ):
            self.process = subprocess.Popen(
                [RESULTSVC, "serve", "--port", str(self.port), "--log-level", "debug"],
                cwd=sandbox.cwd,
                env=sandbox.env(),
                stdout=stdout,
                stderr=stderr,
            )

    def wait_ready(self) -> None:
        """Poll /healthz; between attempts, wait (at most 50 ms) for the process to exit."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                if self.call("GET", "/healthz", record=False).status == 200:
                    return
            except OSError:
                pass
            try:
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise AssertionError("the server did not answer /healthz") from None
                continue
            raise AssertionError(f"the server exited ({code}): {self.stderr_path.read_text()}")

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        record: bool = True,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        payload = raw if raw is not None else None
        if body is not None:
            payload = json.dumps(body).encode()
        if payload is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=payload, headers=sent)
            response = conn.getresponse()
            answer = Answer(response.status, response.read(), response.getheaders())
        finally:
            conn.close()
        if record:
            self.sandbox.answers.append((f"{method} {path}", answer))
        return answer

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------ what the database holds


def _cell_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def database_rows(url: str) -> Iterator[tuple[str, bytes]]:
    """Every row of every table the service made, as bytes (``bytea``/BLOB cells whole)."""
    config = parse_database_url(url)
    if config.kind == "sqlite":
        assert config.sqlite_path is not None
        conn = sqlite3.connect(f"file:{config.sqlite_path}?mode=ro", uri=True)
        try:
            tables = [
                str(row[0])
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            assert tables, "the SQLite database has no tables"
            for table in tables:
                quoted = '"' + table.replace('"', '""') + '"'
                for number, row in enumerate(conn.execute(f"SELECT * FROM {quoted}")):
                    yield f"table {table} row {number}", b"\x00".join(map(_cell_bytes, row))
        finally:
            conn.close()
        return
    with psycopg.connect(config.conninfo()) as pg:
        tables = [
            str(row[0])
            for row in pg.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                [config.schema],
            )
        ]
        assert tables, f"schema {config.schema} has no tables"
        for table in tables:
            query = sql.SQL("SELECT * FROM {}").format(sql.Identifier(config.schema, table))
            for number, row in enumerate(pg.execute(query)):
                yield f"table {table} row {number}", b"\x00".join(map(_cell_bytes, row))


def pg_pages(url: str) -> dict[str, bytes] | None:
    """The schema's tables, TOAST tables and indexes as stored on disk, after a CHECKPOINT.

    Dead row versions (an updated or deleted row) are gone from ``pg_dump`` but stay in
    the pages until a vacuum. ``None`` when the server's data folder is not readable
    from here (a server in another container or host).
    """
    config = parse_database_url(url)
    with psycopg.connect(config.conninfo(), autocommit=True) as pg:
        setting = pg.execute("SELECT current_setting('data_directory', true)").fetchone()
        folder = Path(str(setting[0])) if setting and setting[0] else None
        if folder is None or not os.access(folder, os.R_OK | os.X_OK):
            return None
        pg.execute("CHECKPOINT")  # every dirty page of this test's writes onto disk
        rows = pg.execute(
            """
            WITH tables AS (
                SELECT c.oid, c.reltoastrelid FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relkind IN ('r', 'm')
            ), relations AS (
                SELECT oid FROM tables
                UNION SELECT reltoastrelid FROM tables WHERE reltoastrelid <> 0
            )
            SELECT r.oid::regclass::text, pg_relation_filepath(r.oid) FROM relations r
            UNION ALL
            SELECT i.indexrelid::regclass::text, pg_relation_filepath(i.indexrelid)
            FROM pg_index i JOIN relations r ON i.indrelid = r.oid
            """,
            [config.schema],
        ).fetchall()
    pages: dict[str, bytes] = {}
    for name, relative in rows:
        for path in sorted((folder / str(relative)).parent.glob(f"{Path(relative).name}*")):
            if path.name == Path(relative).name or re.fullmatch(r"\d+\.\d+", path.name):
                pages[f"{name} ({path.relative_to(folder)})"] = path.read_bytes()
    assert pages, f"no relation file of schema {config.schema} under {folder}"
    return pages


def pg_dump(url: str) -> bytes:
    config = parse_database_url(url)
    env = {**os.environ, **({"PGPASSWORD": config.password} if config.password else {})}
    done = subprocess.run(
        [
            PG_DUMP,
            f"--schema={config.schema}",
            "-h",
            config.host,
            "-p",
            str(config.port),
            "-U",
            config.user,
            config.dbname,
        ],
        env=env,
        capture_output=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def backup_records(sandbox: Sandbox) -> Iterator[tuple[str, bytes]]:
    """Every record of every backup, decrypted by the service's own reader."""
    from service.backups import Backups
    from service.runtime import Runtime
    from service.settings import Settings

    settings = Settings.from_env({k: v for k, v in sandbox.env().items() if "RESULTSVC_" in k})
    with Runtime.open(settings) as runtime:
        backups = Backups.open(runtime)
        ids = backups.catalog.ids()
        assert ids, "no backup was written"
        for backup_id in ids:
            for record in backups.reader.records(backup_id):
                yield (
                    f"backup {backup_id} record at position {record.position}",
                    record.topic.encode() + b"\x00" + bytes(record.state),
                )


# ----------------------------------------------------------------- the scan, end to end


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[AwsProxy]:
    with aws_proxy(moto_endpoint) as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sandbox(
    request: pytest.FixtureRequest, tmp_path: Path, moto_endpoint: str, proxy: AwsProxy
) -> Sandbox:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/db/resultsvc.db"
    else:
        url = request.getfixturevalue("pg_url")
    return Sandbox(tmp_path, url, moto_endpoint, proxy.url)


@contextmanager
def fault(proxy: AwsProxy, action: str, answer: Fault, role: str | None = None) -> Iterator[None]:
    """AWS answers ``answer`` to ``action`` (on ``role`` only, if given) within the block."""

    def rule(request: Recorded) -> Fault | None:
        hit = request.action == action and role in (None, request.form.get("RoleName"))
        return answer if hit else None

    proxy.rules.append(rule)
    try:
        yield
    finally:
        proxy.rules.remove(rule)


def test_handed_over_keys_leave_no_byte_anywhere(sandbox: Sandbox, proxy: AwsProxy) -> None:
    customer = make_customer(sandbox.moto)
    control = sandbox.tmp / "control-canary.txt"
    control.write_text(f"{customer.access_key_id}\n{customer.secret}\n")

    ops = (
        sandbox.run("tokens-create", "tokens", "create", "--scope", "ops").strip().splitlines()[-1]
    )
    server = Server(sandbox)
    try:
        server.wait_ready()
        teams = {}
        for name in ("linked", "idempotent", "colliding", "denied", "flaky", "cli"):
            made = server.call("POST", "/v1/teams", ops, {"name": f"scan-{name}"})
            assert made.status == 201, made.body
            teams[name] = made.json()
        linked, idempotent, colliding, denied, flaky, by_cli = (teams[n]["id"] for n in teams)
        customer.foreign_role(f"resultsvc-{colliding}")

        def link(
            team: str,
            body: Any = None,
            *,
            raw: bytes | None = None,
            key: str = "",
            form: bool = False,
        ) -> Answer:
            headers = {"Idempotency-Key": key} if key else {}
            if form:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            return server.call(
                "POST", f"/v1/teams/{team}/accounts", ops, body, raw=raw, headers=headers
            )

        # 1. A link: the role is made with the keys, the answer holds neither.
        done = link(linked, customer.keys_body())
        assert done.status == 201, done.body
        outcome = done.json()
        role_arn = f"arn:aws:iam::{customer.account_id}:role/resultsvc-{linked}"
        assert outcome["role_arn"] == role_arn and outcome["method"] == "access_keys"
        assert customer.access_key_id.encode() not in done.body
        assert customer.secret.encode() not in done.body

        # 2. The same with an Idempotency-Key, then its replay.
        first = link(idempotent, customer.keys_body(), key="link-once")
        assert first.status == 201, first.body
        again = link(idempotent, customer.keys_body(), key="link-once")
        assert (again.status, again.body) == (first.status, first.body)

        # 3. Refusals that carry the keys.
        refusals: list[tuple[str, Answer, int]] = [
            ("bogus profile", link(linked, customer.keys_body(profile="bogus")), 422),
            (
                "unknown field holding the secret",
                link(linked, customer.keys_body(note=customer.secret)),
                422,
            ),
            (
                "lower-case access key id",
                link(
                    linked,
                    customer.keys_body(access_key_id=customer.access_key_id.lower()),
                    key="lower-case",
                ),
                422,
            ),
            (
                "secret with a space",
                link(
                    linked,
                    customer.keys_body(
                        secret_access_key=f"{customer.secret[:36]} {customer.secret[36:]}"
                    ),
                ),
                422,
            ),
            (
                "malformed JSON",
                link(linked, raw=json.dumps(customer.keys_body()).encode()[:-1] + b",}"),
                400,
            ),
            (
                "keys form-encoded",
                link(linked, raw=urlencode(customer.keys_body()).encode(), form=True),
                422,
            ),
            (
                "keys under method role",
                link(linked, customer.keys_body(method="role")),
                422,
            ),
            (
                "AWS side refuses: a foreign role of that name",
                link(colliding, customer.keys_body(), key="collides"),
                422,
            ),
        ]
        for case, answer, status in refusals:
            assert answer.status == status, (case, answer.body)
        assert "already exists" in refusals[-1][1].json()["detail"]

        # AWS's own refusals and failures (injected by the proxy in front of moto).
        with fault(proxy, "GetCallerIdentity", Fault(403, "InvalidClientTokenId")):
            bad_keys = link(denied, customer.keys_body())
        assert bad_keys.status == 422 and "did not accept" in bad_keys.json()["detail"]
        with fault(proxy, "CreateRole", Fault(403, "AccessDenied"), f"resultsvc-{denied}"):
            not_allowed = link(denied, customer.keys_body(), key="denied")
        assert not_allowed.status == 422 and "iam:CreateRole" in not_allowed.json()["detail"]
        with fault(proxy, "CreateRole", Fault(500, "InternalFailure"), f"resultsvc-{flaky}"):
            failed = link(flaky, customer.keys_body(), key="flaky")
        assert failed.status == 503, failed.body
        with fault(proxy, "GetCallerIdentity", Fault(200, "Garbled")):  # no Arn in it
            unforeseen = link(flaky, customer.keys_body(), key="flaky")
        assert unforeseen.status == 503 and "unexpectedly" in unforeseen.json()["detail"]
        retried = link(flaky, customer.keys_body(), key="flaky")  # a 5xx released the key
        assert retried.status == 201, retried.body
        # The keys did reach AWS (signed requests name the access key id), and only there.
        signed = [r.headers.get("Authorization", "") for r in proxy.actions("CreateRole")]
        assert any(f"Credential={customer.access_key_id}/" in header for header in signed)

        # 4. What operators and the UI read.
        metrics = server.call("GET", "/metrics")
        assert metrics.status == 200 and b"resultsvc_http_requests_total" in metrics.body
        accounts = server.call(
            "GET", f"/v1/teams/{linked}/accounts?after={outcome['position']}", ops
        )
        assert accounts.status == 200, accounts.body
        assert [item["role_arn"] for item in accounts.json()["items"]] == [role_arn]

        assert server.stop() == 0
    finally:
        server.kill()

    # 5. The CLI's way in (keys on stdin, never as arguments): a link and two refusals.
    keys = f"{customer.access_key_id}\n{customer.secret}\n".encode()
    cli_link = json.loads(
        sandbox.run("link-keys", "accounts", "link-keys", by_cli, "--json", stdin=keys)
    )
    assert cli_link["role_arn"].endswith(f":role/resultsvc-{by_cli}")
    refused = sandbox.run(
        "link-keys-collides", "accounts", "link-keys", colliding, stdin=keys, expect=1
    )
    assert "already exists" in refused and len(refused.strip().splitlines()) == 1, refused
    lower = f"{customer.access_key_id.lower()}\n{customer.secret}\n".encode()
    refused = sandbox.run("link-keys-lower", "accounts", "link-keys", by_cli, stdin=lower, expect=1)
    assert "upper-case letters" in refused and len(refused.strip().splitlines()) == 1, refused

    # 6. After the server: a backup and the views' status, as an operator runs them.
    taken = json.loads(sandbox.run("backup-run", "backup", "run", "--json"))
    assert taken["events"] > 0
    sandbox.run("projections-status", "projections", "status")

    # ---- the scan
    external_id = teams["linked"]["external_id"]
    scanner = Scanner(
        {
            **customer.needles(),
            "external id": {"plain": external_id},
            "role arn": {"plain": role_arn},
        }
    )
    scanner.scan_tree(sandbox.root, "sandbox")  # db files, backups, keys, logs, tmp, home, cwd
    on_sqlite = parse_database_url(sandbox.database_url).kind == "sqlite"
    pages: dict[str, bytes] | None = None
    if not on_sqlite:
        scanner.scan(f"pg_dump --schema={sandbox.schema}", pg_dump(sandbox.database_url))
        pages = pg_pages(sandbox.database_url)
        if pages is None:
            warnings.warn(
                "PostgreSQL data folder not readable here: pages not scanned", stacklevel=1
            )
        for where, data in (pages or {}).items():
            scanner.scan(f"postgresql pages of {where}", data)
    for where, row in database_rows(sandbox.database_url):
        scanner.scan(f"database {where}", row)
    for where, answer in sandbox.answers:
        scanner.scan(f"HTTP answer to {where}", answer.raw())
    for where, record in backup_records(sandbox):
        scanner.scan(where, record)

    # Not vacuous: the control file, the logs, the right database, inside event states.
    assert scanner.found("secret") >= {"sandbox/tmp/control-canary.txt"}
    assert scanner.found("access key id") >= {"sandbox/tmp/control-canary.txt"}
    server_log = (sandbox.logs / "serve.stderr").read_bytes()
    assert b"DEBUG" in server_log and b"Uvicorn running on" in server_log
    for name in ("tokens-create", "backup-run", "projections-status"):
        assert (sandbox.logs / f"{name}.stdout").stat().st_size > 0, name
    database = "sandbox/db/resultsvc.db" if on_sqlite else "pg_dump"
    assert any(w.startswith(database) for w in scanner.found("external id"))
    if pages is not None:
        assert any(w.startswith("postgresql pages") for w in scanner.found("external id"))
        assert any(
            w.startswith("postgresql pages") and "zstd" in w for w in scanner.found("role arn")
        )
    assert any(w.startswith(database) and "zstd" in w for w in scanner.found("role arn"))
    assert any(w.startswith("database table") and "zstd" in w for w in scanner.found("role arn"))
    assert any(w.startswith("backup ") and "zstd" in w for w in scanner.found("role arn"))
    scanned = set(scanner.scanned)
    assert {"sandbox/logs/serve.stderr", "sandbox/keys/master.key"} <= scanned
    assert any(w.startswith("sandbox/backups/") and w.endswith(".rbp") for w in scanned)

    leaks = [
        str(hit)
        for hit in scanner.hits
        if hit.needle in ("secret", "access key id")
        and hit.where != "sandbox/tmp/control-canary.txt"
    ]
    assert not leaks, "the keys persisted:\n" + "\n".join(sorted(leaks))


# ------------------------------------------------------------------- in-process logs


def _logged_text(record: logging.LogRecord) -> str:
    parts = [record.getMessage(), repr(record.msg), repr(record.args), record.exc_text or ""]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        parts.append(record.stack_info)
    parts.append(repr({k: v for k, v in vars(record).items() if k not in ("exc_info",)}))
    return "\n".join(parts)


def test_in_process_links_log_nothing_of_the_keys(
    database_url: str,
    tmp_path: Path,
    aws: str,
    proxy: AwsProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.runtime import Runtime
    from service.settings import Settings

    customer = make_customer(aws)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the service reaches moto through it
    settings = Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/keys/master.key",
            "RESULTSVC_AWS_PRINCIPAL_ARN": PRINCIPAL_ARN,
        }
    )
    # Every logger at DEBUG, except the AWS and HTTP libraries, which the service keeps at
    # WARNING whatever level is asked for (service.logs; botocore logs signed headers).
    # (caplog.set_level also sets its handler's level: the last call, on the root, says DEBUG.)
    for name in QUIET:
        caplog.set_level(logging.WARNING, logger=name)
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] not in QUIET:
            caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.DEBUG)

    with Runtime.open(settings) as runtime:
        team, _ = runtime.app.create_team("in-process")
        other, _ = runtime.app.create_team("in-process-colliding")
        customer.foreign_role(f"resultsvc-{other.id}")
        ops = runtime.tokens.create(None, frozenset({"ops"}))
        auth = {"Authorization": f"Bearer {ops}"}
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:

            def link(team_id: UUID, body: Any, **headers: str) -> Any:
                return client.post(
                    f"/v1/teams/{team_id}/accounts", json=body, headers={**auth, **headers}
                )

            done = link(team.id, customer.keys_body(), **{"Idempotency-Key": "k"})
            assert done.status_code == 201, done.text
            assert link(team.id, customer.keys_body(), **{"Idempotency-Key": "k"}).json() == (
                done.json()
            )
            collided = link(other.id, customer.keys_body())
            assert collided.status_code == 422 and "already exists" in collided.text
            with fault(proxy, "GetCallerIdentity", Fault(403, "InvalidClientTokenId")):
                assert link(team.id, customer.keys_body()).status_code == 422
            with fault(proxy, "GetCallerIdentity", Fault(200, "Garbled")):
                assert link(team.id, customer.keys_body()).status_code == 503
            with fault(proxy, "AttachRolePolicy", Fault(500, "InternalFailure")):
                assert link(team.id, customer.keys_body()).status_code == 503
            lower = customer.keys_body(access_key_id=customer.access_key_id.lower())
            assert link(team.id, lower).status_code == 422
            assert link(team.id, customer.keys_body(profile="bogus")).status_code == 422
            assert link(team.id, customer.keys_body(note=customer.secret)).status_code == 422
            malformed = client.post(
                f"/v1/teams/{team.id}/accounts",
                content=json.dumps(customer.keys_body()).encode()[:-1],
                headers={**auth, "Content-Type": "application/json"},
            )
            assert malformed.status_code == 400

    # Not vacuous: a record carrying the canary on purpose is the only one found.
    logging.getLogger("tests.secret_scan").debug(
        "control %s %s", customer.access_key_id, customer.secret
    )
    assert any(record.name.startswith("httpx") for record in caplog.records), sorted(
        {r.name for r in caplog.records}
    )
    needles = [
        value.lower() for variants in customer.needles().values() for value in variants.values()
    ]
    carrying = [
        f"{record.name} {record.levelname}: {record.getMessage()[:200]}"
        for record in caplog.records
        if record.name.split(".")[0] not in MOTO_LOGGERS
        and any(needle in _logged_text(record).lower() for needle in needles)
    ]
    assert carrying == [
        f"tests.secret_scan DEBUG: control {customer.access_key_id} {customer.secret}"
    ], "\n".join(carrying)
