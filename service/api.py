"""The HTTP API (FastAPI): ingest for internal services, display reads for the web UI.

Conventions, the same on every route:

- ``Authorization: Bearer <token>``; a token carries scopes and, except ops
  tokens, one team. Another team's resource answers 404 exactly like an
  unknown one. Missing or bad token: 401; wrong scope: 403.
- Errors are RFC 9457 ``application/problem+json`` with the offending fields.
- Every appending POST accepts ``Idempotency-Key`` and answers the log
  ``position`` it reached; every GET accepts ``after=<position>`` and waits
  (a few seconds at most) for the views to reach it, else 503 + Retry-After.
- Lists answer ``{"items": [...], "next_cursor": ...}`` and take ``cursor`` + ``limit``.

The domain does the work; this module maps HTTP onto it and back.
"""

import json
import logging
import threading
from collections.abc import Callable
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.application import AlreadyApplied
from domain.durations import parse_duration
from domain.errors import Conflict, DomainError, InvalidInput, NotFound
from projections.purge import purge_older_than
from projections.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    ViewsBehind,
    decode_cursor,
    encode_cursor,
)
from projections.sqlstore import TRANSIENT_ERRORS as PASSING_DB_ERRORS
from retention.backup import BackupFailed
from retention.catalog import BackupInfo
from retention.exclusions import exclude_plan
from retention.keys import MasterKeyError
from retention.stores import StoreError
from service import schemas
from service.account_link import AccessKeys, AwsUnavailable, LinkNotConfigured, LinkRefused
from service.backups import Backups, NoBackup
from service.body_limit import BodyLimit
from service.idempotency import IdempotencyRefused, request_digest
from service.metrics import Metrics
from service.problems import PROBLEM_MEDIA_TYPE, Problem, ProblemModel, problem_responses
from service.runtime import Runtime
from service.tokens import Principal

log = logging.getLogger("resultsvc.api")

MAX_BODY_BYTES = 8 * 1024 * 1024
WAIT_SECONDS = 5.0
READY_MAX_LAG = 10_000

bearer = HTTPBearer(auto_error=False, description="An API token: rsvc_<id>_<secret>")
Cursor = Annotated[str | None, Query(max_length=512, description="From next_cursor")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")]
After = Annotated[
    int | None,
    Query(ge=0, le=2**62, description="Wait until the views have processed this log position"),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Same key and body: the first answer again, nothing appended",
    ),
]

READ = ("read", "ops")
INGEST = ("ingest",)
COMPLIANCE = ("compliance",)


def create_app(runtime: Runtime, *, projector_thread: threading.Thread | None = None) -> FastAPI:
    """Build the API on an open runtime; ``projector_thread`` is this process's projector."""
    app = FastAPI(
        title="resultsvc",
        version="1.0",
        description=(__doc__ or "").split("\n\n", 1)[1],
    )
    metrics = Metrics(runtime)
    opened: list[Backups] = []
    opening = threading.Lock()

    def backups() -> Backups:
        """The backup side, opened on first use (the store may be remote)."""
        with opening:
            if not opened:
                opened.append(Backups.open(runtime))
            return opened[0]

    app.state.metrics = metrics
    queries, domain_app = runtime.queries, runtime.app

    # ------------------------------------------------------------ plumbing

    def principal_for(*scopes: str) -> Callable[..., Principal]:
        def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> Principal:
            if credentials is None:
                raise Problem(
                    401,
                    "Unauthorized",
                    "missing bearer token",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            found = runtime.tokens.authenticate(credentials.credentials)
            if found is None:
                raise Problem(
                    401,
                    "Unauthorized",
                    "invalid or revoked token",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not found.scopes & set(scopes):
                raise Problem(
                    403, "Forbidden", f"this needs a token with scope {' or '.join(scopes)}"
                )
            return found

        return dependency

    def team_of(principal: Principal, team: UUID | str) -> str:
        """The team a request acts for; another team's id is an unknown id."""
        if principal.team_id is not None and principal.team_id != str(team):
            raise NotFound("team", team)
        return str(team)

    def acting_team(principal: Principal) -> UUID:
        assert principal.team_id is not None  # ingest and compliance tokens carry a team
        return UUID(principal.team_id)

    async def wait(after: int | None) -> None:
        if after:
            if projector_thread is not None:
                runtime.projector.wake()
            await run_in_threadpool(queries.wait_for, after, WAIT_SECONDS)

    async def appending(
        request: Request,
        principal: Principal,
        key: str | None,
        status: int,
        command: Callable[[], dict[str, Any]],
        fingerprint: bytes | None = None,
    ) -> Response:
        """Run an appending command once per Idempotency-Key; answer JSON with its position.

        ``fingerprint`` replaces the body in the Idempotency-Key digest where
        the body holds secrets that must not be hashed into a stored row.
        """
        scope = principal.team_id or "ops"
        if key is not None:
            body = fingerprint if fingerprint is not None else await request.body()
            digest = request_digest(request.method, request.url.path, body)
            try:
                replay = await run_in_threadpool(runtime.idempotency.begin, scope, key, digest)
            except IdempotencyRefused as refused:
                if refused.status != 409:
                    raise
                # "In progress" may be a request whose answer was lost after its
                # commit (the database went away before the key was finished):
                # its receipt tells, and then the truthful answer is "applied".
                await run_in_threadpool(domain_app.raise_if_applied, f"http:{scope}", key, digest)
                raise
            if replay is not None:
                media = PROBLEM_MEDIA_TYPE if replay.status >= 400 else "application/json"
                return Response(replay.body, replay.status, media_type=media)
        try:
            if key is not None:
                payload = await run_in_threadpool(_once, scope, key, digest, request, command)
            else:
                payload = await run_in_threadpool(command)
            response: Response = Response(
                orjson.dumps(jsonable_encoder(payload)), status, media_type="application/json"
            )
            metrics.appended(request.scope.get("route"))
        except Exception as error:  # answered as a problem, and remembered with the key
            response = problem_for(error).response()
        if key is not None:
            try:
                await run_in_threadpool(
                    runtime.idempotency.finish,
                    scope,
                    key,
                    response.status_code,
                    bytes(response.body),
                )
            except PASSING_DB_ERRORS:
                # The command's answer stands; a retry finds its receipt (above).
                log.warning("Idempotency-Key outcome not stored: database unavailable")
        if projector_thread is not None and response.status_code < 400:
            runtime.projector.wake()
        return response

    def _once(
        scope: str, key: str, digest: str, request: Request, command: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The command, its events saved with a receipt of the key in the same transaction.

        The idempotency table answers replays; the receipt makes sure that
        even when its row was lost (the service died between commit and
        answer, or the database dropped the connection at commit) the command
        is never applied twice.
        """
        route = getattr(request.scope.get("route"), "path", request.url.path)
        with domain_app.receipted(f"http:{scope}", key, digest, f"{request.method} {route}"):
            return command()

    # ---------------------------------------------------------- error pages

    @app.exception_handler(Problem)
    async def on_problem(_: Request, problem: Problem) -> Response:
        return problem.response()

    @app.exception_handler(DomainError)
    async def on_domain_error(_: Request, error: DomainError) -> Response:
        return problem_for(error).response()

    @app.exception_handler(IdempotencyRefused)
    async def on_idempotency(_: Request, error: IdempotencyRefused) -> Response:
        return problem_for(error).response()

    @app.exception_handler(ViewsBehind)
    async def on_views_behind(_: Request, error: ViewsBehind) -> Response:
        return problem_for(error).response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, error: RequestValidationError) -> Response:
        errors = [
            {"field": _field_path(item.get("loc", ())), "rule": str(item.get("msg", "invalid"))}
            for item in error.errors()
        ]
        if any(item.get("type") == "json_invalid" for item in error.errors()):
            return _malformed_body().response()
        first = errors[0] if errors else {"field": "body", "rule": "invalid"}
        return Problem(
            422, "Invalid input", f"{first['field']}: {first['rule']}", errors=errors
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 400 and "parsing the body" in str(error.detail):
            return _malformed_body().response()  # e.g. JSON nested beyond the parser's depth
        titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
        return Problem(
            error.status_code,
            titles.get(error.status_code, "Error"),
            str(error.detail),
            headers=dict(error.headers or {}),
        ).response()

    @app.exception_handler(AlreadyApplied)
    async def on_already_applied(_: Request, error: AlreadyApplied) -> Response:
        return problem_for(error).response()

    for passing in PASSING_DB_ERRORS:

        @app.exception_handler(passing)
        async def on_database_gone(_: Request, error: Exception) -> Response:
            return problem_for(error).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_for(error).response()

    # ------------------------------------------------------------- routes

    created = problem_responses(400, 401, 403, 404, 409, 413, 422)
    read = problem_responses(400, 401, 403, 404, 422, 503)

    @app.post("/v1/teams", status_code=201, response_model=schemas.TeamCreated, responses=created)
    async def create_team(
        request: Request,
        body: schemas.TeamCreate,
        principal: Annotated[Principal, Depends(principal_for("ops"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Create a team (ops). Its External ID goes into customers' role trust policies."""

        def command() -> dict[str, Any]:
            team, position = domain_app.create_team(body.name)
            return {
                "id": team.id,
                "name": team.name,
                "external_id": team.external_id,
                "position": position,
            }

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get("/v1/teams/{team}", response_model=schemas.TeamOut, responses=read)
    async def get_team(
        team: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        return await run_in_threadpool(queries.get_team, principal.team_id, str(team))

    @app.get(
        "/v1/teams/{team}/accounts",
        response_model=schemas.Page[schemas.AccountOut],
        responses=read,
    )
    async def list_accounts(
        team: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        page = await run_in_threadpool(
            queries.list_accounts, principal.team_id, str(team), cursor, limit
        )
        return page.__dict__

    @app.post(
        "/v1/teams/{team}/accounts",
        status_code=201,
        response_model=schemas.AccountLinked,
        responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 503),
    )
    async def link_account(
        request: Request,
        team: UUID,
        body: Annotated[schemas.AccountLink, Body()],
        principal: Annotated[Principal, Depends(principal_for("ingest", "ops"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Link a customer's AWS account to the team, by role or with access keys used once.

        ``role``: the customer made a role trusting our principal with the
        team's External ID; it is assumed once to check it. ``access_keys``:
        the service makes that role (and its policy) with the keys, checks it,
        and forgets the keys: they are never stored, logged or echoed back.
        Refusals (422) say what to change on the customer's side. With
        access keys, an Idempotency-Key covers the method and profile only
        (the keys are not hashed into anything stored): retry with other
        keys under a new Idempotency-Key.
        """
        owner = UUID(team_of(principal, team))
        links = runtime.accounts
        fingerprint: bytes | None = None
        if isinstance(body, schemas.AccessKeysLink):
            keys_body = body
            # The keys stay out of the Idempotency-Key digest and of every answer.
            fingerprint = orjson.dumps({"method": body.method, "profile": body.profile})

            def command() -> dict[str, Any]:
                keys = AccessKeys(
                    keys_body.access_key_id.get_secret_value(),
                    keys_body.secret_access_key.get_secret_value(),
                )
                return links.link_with_keys(
                    owner, keys, keys_body.profile, actor=principal.actor
                ).as_dict()

        else:
            role_arn = body.role_arn

            def command() -> dict[str, Any]:
                return links.link_role(owner, role_arn, actor=principal.actor).as_dict()

        return await appending(request, principal, idempotency_key, 201, command, fingerprint)

    @app.delete("/v1/accounts/{account}", response_model=schemas.AccountUnlinked, responses=created)
    async def unlink_account(
        request: Request,
        account: UUID,
        principal: Annotated[Principal, Depends(principal_for("ingest", "ops"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Unlink an account: recorded; later runs against it are refused."""

        def command() -> dict[str, Any]:
            owner = (
                UUID(principal.team_id)
                if principal.team_id is not None
                else domain_app.team_of_account(account)
            )
            done = domain_app.unlink_account(owner, account, actor=principal.actor)
            return {"id": account, "position": done.position}

        return await appending(request, principal, idempotency_key, 200, command)

    @app.post("/v1/plans", status_code=201, response_model=schemas.PlanCreated, responses=created)
    async def create_plan(
        request: Request,
        body: schemas.PlanCreate,
        principal: Annotated[Principal, Depends(principal_for(*INGEST))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        def command() -> dict[str, Any]:
            team = UUID(team_of(principal, body.team_id))
            plan, position = domain_app.create_plan(team, body.account_id, body.name)
            return {
                "id": plan.id,
                "team_id": plan.team_id,
                "account_id": plan.account_id,
                "name": plan.name,
                "position": position,
            }

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get("/v1/teams/{team}/plans", response_model=schemas.Page[schemas.PlanOut], responses=read)
    async def list_plans(
        team: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        page = await run_in_threadpool(
            queries.list_plans, principal.team_id, str(team), cursor, limit
        )
        return page.__dict__

    @app.get("/v1/plans/{plan}", response_model=schemas.PlanOut, responses=read)
    async def get_plan(
        plan: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        return await run_in_threadpool(queries.get_plan, principal.team_id, str(plan))

    @app.post(
        "/v1/plans/{plan}/runs",
        status_code=201,
        response_model=schemas.RunStarted,
        responses=created,
    )
    async def start_run(
        request: Request,
        plan: UUID,
        principal: Annotated[Principal, Depends(principal_for(*INGEST))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Start a run of a plan; refused (409) when its account has been unlinked."""

        def command() -> dict[str, Any]:
            run, position = domain_app.start_run(acting_team(principal), plan)
            return {"id": run.id, "plan_id": plan, "status": run.status, "position": position}

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get("/v1/plans/{plan}/runs", response_model=schemas.Page[schemas.RunOut], responses=read)
    async def list_runs(
        plan: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        """A plan's runs, newest first."""
        await wait(after)
        page = await run_in_threadpool(
            queries.list_runs, principal.team_id, str(plan), cursor, limit
        )
        return page.__dict__

    @app.post(
        "/v1/runs/{run}/results",
        status_code=201,
        response_model=schemas.ResultsAccepted,
        responses=created,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ResultsBatch"}}
                },
            }
        },
    )
    async def record_results(
        request: Request,
        run: UUID,
        principal: Annotated[Principal, Depends(principal_for(*INGEST))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Append a batch of 1 to 1,000 results, whole or not at all."""
        # The hot write path: the body is parsed with orjson and checked once, by
        # domain.findings (the schema above documents the same rules).
        results = _results_of(await request.body())

        def command() -> dict[str, Any]:
            accepted = domain_app.record_results(acting_team(principal), run, results)
            return {
                "accepted": accepted.accepted,
                "batch": accepted.batch_no,
                "position": accepted.position,
            }

        return await appending(request, principal, idempotency_key, 201, command)

    @app.post("/v1/runs/{run}/complete", response_model=schemas.RunEnded, responses=created)
    async def complete_run(
        request: Request,
        run: UUID,
        body: schemas.RunComplete,
        principal: Annotated[Principal, Depends(principal_for(*INGEST))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """End a run as succeeded or failed; afterwards it refuses results (409)."""

        def command() -> dict[str, Any]:
            done = domain_app.complete_run(acting_team(principal), run, body.status, body.error)
            return {"id": run, "status": body.status, "position": done.position}

        return await appending(request, principal, idempotency_key, 200, command)

    @app.get("/v1/runs/{run}", response_model=schemas.RunOut, responses=read)
    async def get_run(
        run: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        return await run_in_threadpool(queries.get_run, principal.team_id, str(run))

    @app.get(
        "/v1/runs/{run}/results",
        response_model=schemas.Page[schemas.ResultOut],
        responses=read,
    )
    async def list_results(
        run: UUID,
        principal: Annotated[Principal, Depends(principal_for(*READ))],
        severity: Annotated[
            schemas.Severity | None, Query(description="Only this severity")
        ] = None,
        status: Annotated[schemas.Status | None, Query(description="Only this status")] = None,
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> Response:
        """A run's results in the order they were recorded."""
        await wait(after)
        page = await run_in_threadpool(
            lambda: queries.list_results(
                principal.team_id,
                str(run),
                severity=severity,
                status=status,
                cursor=cursor,
                limit=limit,
            )
        )
        # The hot read path: the page is already in the documented shape, so it
        # is encoded directly instead of being re-validated item by item.
        return Response(orjson.dumps(page.__dict__), media_type="application/json")

    @app.post(
        "/v1/plans/{plan}/backup-exclusion",
        status_code=201,
        response_model=schemas.ExclusionAccepted,
        responses=created,
    )
    async def request_exclusion(
        request: Request,
        plan: UUID,
        body: schemas.ExclusionCreate,
        principal: Annotated[Principal, Depends(principal_for(*COMPLIANCE))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Exclude a plan from backups (compliance): new backups leave it out, and its key
        is shredded so backups taken before can no longer decrypt it. Cannot be undone."""

        def command() -> dict[str, Any]:
            done = exclude_plan(
                domain_app,
                backups().keyring,
                acting_team(principal),
                plan,
                reason=body.reason,
                ticket=body.ticket,
                actor=principal.actor,
            )
            return {
                "plan_id": plan,
                "position": done.shredded_at_position,
                "copies_destroyed": done.copies_destroyed,
            }

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get(
        "/v1/backup-exclusions",
        response_model=schemas.Page[schemas.ExclusionOut],
        responses=read,
    )
    async def list_exclusions(
        principal: Annotated[Principal, Depends(principal_for("compliance", "ops"))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        await wait(after)
        page = await run_in_threadpool(queries.list_exclusions, principal.team_id, cursor, limit)
        return page.__dict__

    @app.post(
        "/v1/display-purges",
        status_code=201,
        response_model=schemas.PurgeAccepted,
        responses=created,
    )
    async def purge_display(
        request: Request,
        body: schemas.DisplayPurgeCreate,
        principal: Annotated[Principal, Depends(principal_for("ops", "compliance"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Purge results from display (never from backups): a plan, a team, or older runs."""

        def command() -> dict[str, Any]:
            given = [name for name in ("plan_id", "older_than") if getattr(body, name) is not None]
            if len(given) > 1 or (body.plan_id and body.team_id) or not (given or body.team_id):
                raise InvalidInput(
                    "body", "give exactly one of plan_id, team_id or older_than (+ team_id)"
                )
            if body.older_than is not None:
                age = parse_duration(body.older_than, "older_than")
                scope = team_of(principal, body.team_id) if body.team_id else principal.team_id
                positions = purge_older_than(
                    domain_app,
                    queries,
                    age,
                    actor=principal.actor,
                    reason=body.reason,
                    team=scope,
                )
            elif body.plan_id is not None:
                owner = queries.get_plan(principal.team_id, str(body.plan_id))["team_id"]
                positions = [
                    domain_app.purge_display(
                        UUID(owner), plan_id=body.plan_id, actor=principal.actor, reason=body.reason
                    ).position
                ]
            else:
                assert body.team_id is not None
                team = UUID(team_of(principal, body.team_id))
                positions = [
                    domain_app.purge_display(
                        team, actor=principal.actor, reason=body.reason
                    ).position
                ]
            position = positions[-1] if positions else domain_app.head_position()
            return {"purges": len(positions), "position": position}

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get("/v1/backups", response_model=schemas.Page[schemas.BackupOut], responses=read)
    async def list_backups(
        principal: Annotated[Principal, Depends(principal_for("ops"))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        """Complete backups, oldest first (the manifests in the store are the catalog)."""
        await wait(after)

        def page() -> dict[str, Any]:
            ids = backups().catalog.ids()
            if cursor:
                (last,) = decode_cursor(cursor, "backups", (str,))
                ids = [backup_id for backup_id in ids if backup_id > last]
            chosen = ids[:limit]
            more = len(ids) > limit
            items = [_backup_out(backups().catalog.get(backup_id)) for backup_id in chosen]
            return {
                "items": items,
                "next_cursor": encode_cursor("backups", [chosen[-1]]) if more else None,
            }

        return await run_in_threadpool(page)

    @app.post("/v1/backups", status_code=201, response_model=schemas.BackupTaken, responses=created)
    async def take_backup(
        request: Request,
        body: schemas.BackupCreate,
        principal: Annotated[Principal, Depends(principal_for("ops"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Take a backup now: incremental, or full with ``{"full": true}``."""

        def command() -> dict[str, Any]:
            result = backups().writer.run(full=True if body.full else None)
            return {**_backup_out(result.info), "position": domain_app.head_position()}

        return await appending(request, principal, idempotency_key, 201, command)

    @app.get("/v1/restore-drills", response_model=schemas.Page[schemas.DrillOut], responses=read)
    async def list_drills(
        principal: Annotated[Principal, Depends(principal_for("ops"))],
        cursor: Cursor = None,
        limit: Limit = DEFAULT_LIMIT,
        after: After = None,
    ) -> dict[str, Any]:
        """Restore drills, newest first, with their reports."""
        await wait(after)
        page = await run_in_threadpool(queries.list_drills, cursor, limit)
        return page.__dict__

    @app.post(
        "/v1/restore-drills", status_code=201, response_model=schemas.DrillRun, responses=created
    )
    async def run_drill(
        request: Request,
        body: schemas.DrillCreate,
        principal: Annotated[Principal, Depends(principal_for("ops"))],
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Run a restore drill now (on ``backup_id`` or the latest backup) and record it.

        Answers 201 with the report whether the drill passed or not: ``passed``
        says which, ``reason`` why not.
        """

        def command() -> dict[str, Any]:
            side = backups()
            report, position = side.drill(side.choose(body.backup_id))
            return {
                "backup_id": report.backup_id,
                "passed": report.passed,
                "reason": report.reason,
                "report": report.as_dict(),
                "position": position,
            }

        return await appending(request, principal, idempotency_key, 201, command)

    # -------------------------------------------------------- operations

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses=problem_responses(503))
    async def readyz() -> Response:
        """Database reachable, projector running, views not too far behind."""
        try:
            await run_in_threadpool(runtime.views.ping)
            statuses = await run_in_threadpool(runtime.projector.status)
        except Exception as error:
            return Problem(
                503, "Not ready", f"database unreachable: {type(error).__name__}"
            ).response()
        reasons = [f"view {s.view} failed" for s in statuses if s.state == "failed"]
        reasons += [f"view {s.view} lags by {s.lag}" for s in statuses if s.lag > READY_MAX_LAG]
        if projector_thread is not None and not projector_thread.is_alive():
            reasons.append("projector thread stopped")
        if reasons:
            return Problem(503, "Not ready", "; ".join(reasons)).response()
        return JSONResponse({"status": "ready", "lag": {s.view: s.lag for s in statuses}})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_page() -> Response:
        """Prometheus metrics."""
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    # ----------------------------------------------------- the document

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = document.setdefault("components", {}).setdefault("schemas", {})
        batch = schemas.ResultsBatch.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(batch.pop("$defs", {}))
        components["ResultsBatch"] = batch
        components.setdefault("ProblemModel", ProblemModel.model_json_schema())
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    metrics.install(app)
    return app


def _results_of(raw: bytes) -> Any:
    """The ``results`` of a results batch body; the findings themselves are the domain's job."""
    if not raw.strip():
        raise InvalidInput("body", "is required: an object with a results list")
    try:
        # The standard parser, not orjson: orjson turns integers beyond 64 bits
        # into floats silently, and the domain must see what was sent to refuse it.
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _malformed_body() from None
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be an object with a results list")
    unknown = sorted(set(body) - {"results"})
    if unknown:
        raise InvalidInput(unknown[0], "unknown field")
    if "results" not in body:
        raise InvalidInput("results", "is required")
    return body["results"]


def _malformed_body() -> Problem:
    return Problem(
        400,
        "Malformed JSON",
        "the body is not valid JSON (or is nested too deeply)",
        errors=[{"field": "body", "rule": "must be valid JSON"}],
    )


def _backup_out(backup: BackupInfo) -> dict[str, Any]:
    return {
        "id": backup.id,
        "kind": backup.kind,
        "parent": backup.parent,
        "first_position": backup.first_position,
        "last_position": backup.last_position,
        "events": backup.events,
        "bytes_stored": backup.bytes_stored,
        "created_at": backup.created_at.isoformat(),
        "expires_at": backup.expires_at.isoformat(),
        "excluded_plans": backup.excluded_plans,
    }


def problem_for(error: Exception) -> Problem:
    """The problem answer for an error raised by the domain or the views."""
    if isinstance(error, Problem):
        return error
    if isinstance(error, IdempotencyRefused):
        return Problem(
            error.status,
            error.title,
            error.detail,
            errors=[{"field": "Idempotency-Key", "rule": error.detail}],
            headers={"Retry-After": "1"} if error.retry_after else None,
        )
    if isinstance(error, AlreadyApplied):
        return Problem(
            409 if error.same_request else 422,
            "Already applied" if error.same_request else "Idempotency-Key reused",
            "this Idempotency-Key was applied before; nothing was appended again (its first"
            " answer was lost when the service or database failed)"
            if error.same_request
            else "this Idempotency-Key was used with another request; use a new key",
            errors=[{"field": "Idempotency-Key", "rule": "already applied"}],
        )
    if isinstance(error, NotFound):
        return Problem(404, "Not found", str(error))
    if isinstance(error, InvalidInput):
        return Problem(
            422,
            "Invalid input",
            str(error),
            errors=[{"field": error.field, "rule": error.rule}],
        )
    if isinstance(error, Conflict):
        return Problem(409, "Conflict", str(error))
    if isinstance(error, ViewsBehind):
        return Problem(503, "Views behind", str(error), headers={"Retry-After": "1"})
    if isinstance(error, DomainError):
        return Problem(400, "Bad request", str(error))
    if isinstance(error, LinkRefused):
        return Problem(
            422,
            "Link refused",
            f"{error.field}: {error.rule}",
            errors=[{"field": error.field, "rule": error.rule}],
        )
    if isinstance(error, LinkNotConfigured):
        return Problem(409, "Linking not configured", str(error))
    if isinstance(error, AwsUnavailable):
        return Problem(503, "AWS unavailable", str(error), headers={"Retry-After": "30"})
    if isinstance(error, PASSING_DB_ERRORS):
        log.warning("database unavailable: %s", type(error).__name__)
        return Problem(
            503,
            "Database unavailable",
            "the database is unavailable; retry shortly (with the same Idempotency-Key)",
            headers={"Retry-After": "5"},
        )
    if isinstance(error, NoBackup):
        return Problem(409, "No backup", str(error))
    if isinstance(error, (BackupFailed, StoreError, MasterKeyError)):
        return Problem(503, "Backup store unavailable", str(error), headers={"Retry-After": "30"})
    log.error("unexpected %s", type(error).__name__, exc_info=error)
    return Problem(500, "Internal error", "the service failed; retry with the same Idempotency-Key")


def _field_path(loc: Any) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or "body"
