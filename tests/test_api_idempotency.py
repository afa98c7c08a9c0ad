"""``Idempotency-Key`` on every appending route, on both stores.

Same key and body: the first answer again, byte for byte, and nothing
appended. Same key with another body or path: 422. A key still running: 409.
Keys belong to a team. Eight concurrent retries append once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.idempotency import STALE_AFTER, request_digest
from service.runtime import Runtime
from service.samples import findings
from service.settings import Settings

PROBLEM = "application/problem+json"
BATCH = list(findings(7, seed=3))


@dataclass
class Team:
    id: str
    account: str
    plan: str
    run: str
    token: str  # ingest + read + compliance

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _team(runtime: Runtime, name: str) -> Team:
    app = runtime.app
    team, _ = app.create_team(name)
    account, _ = app.link_account_role(
        team.id, "arn:aws:iam::123456789012:role/scanner", verified=False, actor="test"
    )
    plan, _ = app.create_plan(team.id, account.id, "nightly")
    run, _ = app.start_run(team.id, plan.id)
    token = runtime.tokens.create(str(team.id), frozenset({"ingest", "read", "compliance"}))
    runtime.projector.catch_up()
    return Team(str(team.id), str(account.id), str(plan.id), str(run.id), token)


@pytest.fixture
def runtime(database_url: str, tmp_path: Path) -> Iterator[Runtime]:
    """conftest's ``runtime``, with backups and the master key in this test's own folder."""
    settings = Settings.from_env(
        {
            "RESULTSVC_DATABASE_URL": database_url,
            "RESULTSVC_BACKUP_URL": f"file://{tmp_path}/backups",
            "RESULTSVC_MASTER_KEY": f"file://{tmp_path}/master.key",
        }
    )
    with Runtime.open(settings) as opened:
        yield opened


@pytest.fixture
def team_a(runtime: Runtime) -> Team:
    return _team(runtime, "A")


@pytest.fixture
def team_b(runtime: Runtime) -> Team:
    return _team(runtime, "B")


@pytest.fixture
def ops(runtime: Runtime) -> dict[str, str]:
    return {"Authorization": f"Bearer {runtime.tokens.create(None, frozenset({'ops'}))}"}


def _post(api: Any, path: str, body: Any, headers: dict[str, str], key: str | None) -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return api.post(path, content=orjson.dumps(body), headers={**headers, **extra, **_JSON})


_JSON = {"Content-Type": "application/json"}


def _run_view(api: Any, team: Team) -> dict[str, Any]:
    response = api.get(f"/v1/runs/{team.run}", headers=team.headers)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def _assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail", "errors"} <= set(body)
    assert body["status"] == status
    if field is not None:
        assert field in [error["field"] for error in body["errors"]], body
    return body


# ------------------------------------------------------------- results


def test_a_replay_answers_the_same_bytes_and_appends_nothing(
    api: Any, runtime: Runtime, team_a: Team
) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    first = _post(api, path, {"results": BATCH}, team_a.headers, "batch-1")
    assert first.status_code == 201, first.text
    assert first.json()["accepted"] == len(BATCH)
    head = runtime.app.head_position()
    assert first.json()["position"] == head

    for _ in range(3):
        again = _post(api, path, {"results": BATCH}, team_a.headers, "batch-1")
        assert again.status_code == first.status_code
        assert again.content == first.content
        assert again.headers["content-type"] == "application/json"
        assert runtime.app.head_position() == head

    view = _run_view(api, team_a)
    assert view["total"] == len(BATCH)
    assert sum(view["counts"]["by_status"].values()) == len(BATCH)
    page = api.get(f"/v1/runs/{team_a.run}/results?limit=1000", headers=team_a.headers).json()
    assert len(page["items"]) == len(BATCH)
    # Without a key, the same batch is a new batch.
    other = _post(api, path, {"results": BATCH}, team_a.headers, None)
    assert other.status_code == 201 and other.json()["batch"] == 2


def test_same_key_with_another_body_is_422(api: Any, runtime: Runtime, team_a: Team) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    assert _post(api, path, {"results": BATCH}, team_a.headers, "k").status_code == 201
    head = runtime.app.head_position()
    for body in ({"results": BATCH[:1]}, {"results": list(reversed(BATCH))}):
        refused = _post(api, path, body, team_a.headers, "k")
        _assert_problem(refused, 422, "Idempotency-Key")
    # Same JSON, other bytes (spacing) is another body too: the digest is of the bytes.
    spaced = orjson.dumps({"results": BATCH}, option=orjson.OPT_INDENT_2)
    refused = api.post(
        path, content=spaced, headers={**team_a.headers, **_JSON, "Idempotency-Key": "k"}
    )
    _assert_problem(refused, 422, "Idempotency-Key")
    assert runtime.app.head_position() == head
    assert _run_view(api, team_a)["total"] == len(BATCH)


def test_same_key_on_another_path_is_422(api: Any, runtime: Runtime, team_a: Team) -> None:
    results = f"/v1/runs/{team_a.run}/results"
    assert _post(api, results, {"results": BATCH}, team_a.headers, "shared").status_code == 201
    head = runtime.app.head_position()
    second_run = api.post(
        f"/v1/plans/{team_a.plan}/runs", headers={**team_a.headers, "Idempotency-Key": "shared"}
    )
    _assert_problem(second_run, 422, "Idempotency-Key")
    complete = _post(
        api, f"/v1/runs/{team_a.run}/complete", {"status": "succeeded"}, team_a.headers, "shared"
    )
    _assert_problem(complete, 422, "Idempotency-Key")
    assert runtime.app.head_position() == head
    assert _run_view(api, team_a)["status"] == "running"


def test_keys_belong_to_a_team(api: Any, runtime: Runtime, team_a: Team, team_b: Team) -> None:
    # A sends B's run the batch under key K: 404, and that answer is remembered for A.
    b_path = f"/v1/runs/{team_b.run}/results"
    refused = _post(api, b_path, {"results": BATCH}, team_a.headers, "K")
    _assert_problem(refused, 404)
    # B sends exactly the same request with the same key: B's own, first, request.
    accepted = _post(api, b_path, {"results": BATCH}, team_b.headers, "K")
    assert accepted.status_code == 201, accepted.text
    # And A may use K for its own run? No: A's K is taken by the 404 (other path): 422.
    mine = _post(api, f"/v1/runs/{team_a.run}/results", {"results": BATCH}, team_a.headers, "K")
    _assert_problem(mine, 422, "Idempotency-Key")
    # Another key of A's own, used by B too, on their own runs: both append.
    for team in (team_a, team_b):
        path = f"/v1/runs/{team.run}/results"
        answer = _post(api, path, {"results": BATCH[:2]}, team.headers, "L")
        assert answer.status_code == 201, answer.text
    assert _run_view(api, team_a)["total"] == 2
    assert _run_view(api, team_b)["total"] == len(BATCH) + 2


def test_a_refusal_is_replayed_as_the_same_refusal(
    api: Any, runtime: Runtime, team_a: Team
) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    bad = [dict(item) for item in BATCH]
    bad[3]["severity"] = "catastrophic"
    head = runtime.app.head_position()
    first = _post(api, path, {"results": bad}, team_a.headers, "bad-batch")
    body = _assert_problem(first, 422, "results[3].severity")
    again = _post(api, path, {"results": bad}, team_a.headers, "bad-batch")
    assert again.status_code == 422 and again.content == first.content
    assert again.headers["content-type"] == PROBLEM
    assert body == again.json()
    assert runtime.app.head_position() == head
    # The corrected batch needs a new key: this one is spent on the refusal.
    fixed = _post(api, path, {"results": BATCH}, team_a.headers, "bad-batch")
    _assert_problem(fixed, 422, "Idempotency-Key")
    assert runtime.app.head_position() == head


def test_a_conflict_is_replayed_even_after_the_state_changed(
    api: Any, runtime: Runtime, team_a: Team
) -> None:
    ended = _post(
        api, f"/v1/runs/{team_a.run}/complete", {"status": "failed"}, team_a.headers, "end"
    )
    assert ended.status_code == 200, ended.text
    path = f"/v1/runs/{team_a.run}/results"
    late = _post(api, path, {"results": BATCH}, team_a.headers, "late")
    _assert_problem(late, 409)
    head = runtime.app.head_position()
    assert _post(api, path, {"results": BATCH}, team_a.headers, "late").content == late.content
    again = _post(
        api, f"/v1/runs/{team_a.run}/complete", {"status": "failed"}, team_a.headers, "end"
    )
    assert again.status_code == 200 and again.content == ended.content
    assert runtime.app.head_position() == head


def test_a_key_still_running_is_409(api: Any, runtime: Runtime, team_a: Team) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    raw = orjson.dumps({"results": BATCH})
    digest = request_digest("POST", path, raw)
    assert runtime.idempotency.begin(team_a.id, "in-flight", digest) is None
    head = runtime.app.head_position()
    headers = {**team_a.headers, **_JSON, "Idempotency-Key": "in-flight"}
    busy = api.post(path, content=raw, headers=headers)
    _assert_problem(busy, 409)
    assert busy.headers["retry-after"].isdigit()
    assert runtime.app.head_position() == head
    # Another body under the running key is still "another request": 422, not 409.
    other = api.post(path, content=orjson.dumps({"results": BATCH[:1]}), headers=headers)
    _assert_problem(other, 422, "Idempotency-Key")
    # When the first request ends, its answer is what the retry gets.
    runtime.idempotency.finish(team_a.id, "in-flight", 201, b'{"stored":"answer"}')
    done = api.post(path, content=raw, headers=headers)
    assert done.status_code == 201 and done.content == b'{"stored":"answer"}'
    assert runtime.app.head_position() == head
    assert _run_view(api, team_a)["total"] == 0


def test_a_claim_left_running_too_long_is_taken_over(
    api: Any, runtime: Runtime, team_a: Team
) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    raw = orjson.dumps({"results": BATCH})
    runtime.idempotency.begin(team_a.id, "orphan", request_digest("POST", path, raw))
    from datetime import UTC, datetime

    old = (datetime.now(UTC) - STALE_AFTER * 2).isoformat()
    with runtime.views.writing() as cur:
        cur.execute(
            "UPDATE idempotency_keys SET created_at = ? WHERE scope = ? AND key = ?",
            [old, team_a.id, "orphan"],
        )
    headers = {**team_a.headers, **_JSON, "Idempotency-Key": "orphan"}
    taken = api.post(path, content=raw, headers=headers)
    assert taken.status_code == 201, taken.text
    head = runtime.app.head_position()
    assert api.post(path, content=raw, headers=headers).content == taken.content
    assert runtime.app.head_position() == head
    assert _run_view(api, team_a)["total"] == len(BATCH)


@pytest.mark.parametrize(
    ("key", "status"),
    [
        ("k" * 256, 422),
        ("k" * 1000, 422),
        ("clé", 400),
        ("white space", 400),
        ("tab\there", 400),
        ("", 400),
    ],
    ids=["256-chars", "1000-chars", "non-ascii", "space", "tab", "empty"],
)
def test_bad_keys_are_refused(
    api: Any, runtime: Runtime, team_a: Team, key: str, status: int
) -> None:
    head = runtime.app.head_position()
    response = api.post(
        f"/v1/runs/{team_a.run}/results",
        content=orjson.dumps({"results": BATCH}),
        headers={**team_a.headers, **_JSON, "Idempotency-Key": key.encode()},
    )
    _assert_problem(response, status, "Idempotency-Key")
    assert runtime.app.head_position() == head


def test_the_longest_key_is_accepted(api: Any, team_a: Team) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F)) * 3  # every printable, 282 chars
    key = key[:255]
    path = f"/v1/runs/{team_a.run}/results"
    first = _post(api, path, {"results": BATCH}, team_a.headers, key)
    assert first.status_code == 201, first.text
    assert _post(api, path, {"results": BATCH}, team_a.headers, key).content == first.content
    assert _run_view(api, team_a)["total"] == len(BATCH)


# ------------------------------------------------------- every appending route


Request = tuple[str, str, Any]  # method, path, body (None: no body)

APPENDING: dict[str, Callable[[Team], Request]] = {
    "create-team": lambda t: ("POST", "/v1/teams", {"name": "Green"}),
    "create-plan": lambda t: (
        "POST",
        "/v1/plans",
        {"team_id": t.id, "account_id": t.account, "name": "weekly"},
    ),
    "start-run": lambda t: ("POST", f"/v1/plans/{t.plan}/runs", None),
    "results": lambda t: ("POST", f"/v1/runs/{t.run}/results", {"results": BATCH}),
    "complete": lambda t: ("POST", f"/v1/runs/{t.run}/complete", {"status": "succeeded"}),
    "exclusion": lambda t: (
        "POST",
        f"/v1/plans/{t.plan}/backup-exclusion",
        {"reason": "asked", "ticket": "T-9"},
    ),
    "purge-plan": lambda t: ("POST", "/v1/display-purges", {"plan_id": t.plan}),
    "purge-team": lambda t: ("POST", "/v1/display-purges", {"team_id": t.id}),
    "unlink": lambda t: ("DELETE", f"/v1/accounts/{t.account}", None),
    "backup": lambda t: ("POST", "/v1/backups", {"full": True}),
}


@pytest.mark.parametrize("name", list(APPENDING))
def test_every_appending_route_replays(
    api: Any, runtime: Runtime, team_a: Team, ops: dict[str, str], name: str
) -> None:
    method, path, body = APPENDING[name](team_a)
    headers = dict(ops if name in ("create-team", "backup") else team_a.headers)
    content = None
    if body is not None:
        headers.update(_JSON)
        content = orjson.dumps(body)
    keyed = {**headers, "Idempotency-Key": f"once-{name}"}
    before = runtime.app.head_position()
    first = api.request(method, path, headers=keyed, content=content)
    assert first.status_code in (200, 201), first.text
    head = runtime.app.head_position()
    assert head > before
    assert first.json()["position"] == head
    again = api.request(method, path, headers=keyed, content=content)
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert runtime.app.head_position() == head
    # Without the key the same request is a new one: it appends again or conflicts.
    fresh = api.request(method, path, headers=headers, content=content)
    assert (fresh.status_code, fresh.content) != (first.status_code, first.content)


# ------------------------------------------------------------ concurrency


def test_concurrent_retries_append_once(api: Any, runtime: Runtime, team_a: Team) -> None:
    path = f"/v1/runs/{team_a.run}/results"
    raw = orjson.dumps({"results": BATCH})
    headers = {**team_a.headers, **_JSON, "Idempotency-Key": "storm"}
    before = runtime.app.head_position()
    gate = threading.Barrier(8)
    answers: list[Any] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            gate.wait(timeout=10)
            answers.append(api.post(path, content=raw, headers=headers))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(answers) == 8
    created = [a for a in answers if a.status_code == 201]
    busy = [a for a in answers if a.status_code == 409]
    assert len(created) + len(busy) == 8, [(a.status_code, a.text) for a in answers]
    assert created, "no request got the answer"
    assert len({a.content for a in created}) == 1
    for answer in busy:
        _assert_problem(answer, 409)
    position = created[0].json()["position"]
    assert created[0].json()["batch"] == 1
    assert runtime.app.head_position() == position
    single = position - before  # events one keyed batch appends: batch, run marker, receipt
    assert single == 3, f"one batch appended {single} events: appended more than once?"
    assert _run_view(api, team_a)["total"] == len(BATCH)
    # Settled: one more retry is a replay.
    assert api.post(path, content=raw, headers=headers).content == created[0].content


def test_uuid_keys_from_clients_are_fine(api: Any, team_a: Team) -> None:
    key = str(uuid.uuid4())
    path = f"/v1/plans/{team_a.plan}/runs"
    first = api.post(path, headers={**team_a.headers, "Idempotency-Key": key})
    second = api.post(path, headers={**team_a.headers, "Idempotency-Key": key})
    assert first.status_code == 201 and second.content == first.content
    runs = api.get(f"/v1/plans/{team_a.plan}/runs", headers=team_a.headers).json()["items"]
    assert len(runs) == 2  # the fixture's run and this one, once
