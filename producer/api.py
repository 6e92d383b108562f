"""The HTTP API: a thin FastAPI layer over `Client`. Errors are raised as `PipeqError`s and
answered by one handler (producer/http_errors.py)."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from pipeq.config.errors import InvalidRequest, JobConflict, Unauthorized
from pipeq.core.jobs import JOB_ID_PATTERN, JobAccepted, JobDocument, JobRequest, owner_of
from pipeq.core.queue_depth import register_queue_depth
from pipeq.producer.body_limit import BodyLimit
from pipeq.producer.client import Client
from pipeq.producer.http_errors import error_response, errors_of, install_error_handlers
from pipeq.producer.job_schemas import add_job_variants
from pipeq.producer.live_workers import live_workers

MAX_WAIT_S = 60.0


# Security schemes of the OpenAPI document (Swagger UI's Authorize); checked in require_key.
_BEARER = HTTPBearer(auto_error=False, description="an API key of PIPEQ_API_KEYS")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key")


def require_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
    x_api_key: Annotated[str | None, Depends(_API_KEY)] = None,
) -> str | None:
    """The caller's owner (`owner_of` its key); None when no keys are set (one user)."""
    keys: list[str] = request.app.state.api_keys
    if not keys:
        return None
    given = (x_api_key or (bearer.credentials if bearer else "")).encode()
    # Every key is compared, so the time taken does not say which one matched.
    matched = [key for key in keys if hmac.compare_digest(given, key.encode())]
    if not matched:
        raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")
    return owner_of(matched[0])


def the_client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


# Each key is a tenant: its job ids are its own (stored as `scoped_id(owner, id)`), and another
# key's job answers 404, as a job that never existed does, so ids cannot be probed.
Owner = Annotated[str | None, Depends(require_key)]
TheClient = Annotated[Client, Depends(the_client)]

router = APIRouter()


_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobAccepted,
    responses={
        202: {"description": "Queued", "headers": _LOCATION},
        200: {"model": JobAccepted, "description": "The job of this id, already submitted"},
        **errors_of(401, 404, 409, 413, 422, 429, 503),
    },
)
def submit(
    body: JobRequest,
    owner: Owner,
    client: TheClient,
    idempotency_key: Annotated[
        str | None,
        # The body id's own constraints: the key becomes the id, one segment of the job's URL.
        Header(
            description="the job's id, if the body gives none",
            min_length=1,
            max_length=200,
            pattern=JOB_ID_PATTERN,
        ),
    ] = None,
) -> Any:
    if idempotency_key is not None:
        if body.id not in (None, idempotency_key):
            raise InvalidRequest("Idempotency-Key and the body's id differ; give one")
        body = body.model_copy(update={"id": idempotency_key})
    doc, created = client.submit_request(body, owner)
    accepted = JobAccepted(id=doc.public_id, status=doc.status)
    location = {"Location": f"/v1/jobs/{doc.public_id}"}
    return JSONResponse(
        accepted.model_dump(), status_code=202 if created else 200, headers=location
    )


@router.get(
    "/v1/jobs/{job_id}", response_model=JobDocument, responses=errors_of(401, 404, 422, 503)
)
async def get_job(
    job_id: str,
    owner: Owner,
    client: TheClient,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
    presign: Annotated[bool, Query(description="an https result_url for S3 results")] = False,
) -> JobDocument:
    deadline = time.monotonic() + wait
    while True:
        doc = await run_in_threadpool(client.get, job_id, presign, owner)
        if doc.done or time.monotonic() >= deadline:
            return doc.public()
        await asyncio.sleep(client.settings.wait_poll_interval_s)


@router.delete(
    "/v1/jobs/{job_id}",
    status_code=202,
    response_model=JobDocument,
    responses=errors_of(401, 404, 409, 422, 503),
)
def cancel_job(job_id: str, owner: Owner, client: TheClient) -> Any:
    doc, cancelled = client.cancel(job_id, owner)
    if not cancelled:
        conflict = JobConflict(f"job {job_id} is {doc.status}; only queued jobs can be cancelled")
        return error_response(conflict, job=doc.public().model_dump(mode="json"))
    return doc.public()


@router.get("/v1/models", dependencies=[Depends(require_key)], responses=errors_of(401, 503))
def list_models(client: TheClient) -> dict[str, Any]:
    """Each model of the registry, with the live workers serving it (`workers`)."""
    workers = live_workers(client)
    return {
        name: {**spec.public(), "workers": workers.get(name, [])}
        for name, spec in client.registry.models.items()
    }


@router.get("/healthz", responses=errors_of(503))
def healthz(client: TheClient) -> dict[str, str]:
    client.records.ping()
    return {"status": "ok"}


def create_app(client: Client | None = None) -> FastAPI:
    client = client or Client()
    app = FastAPI(title="pipeq", version="0.1.0")
    app.state.client = client
    app.state.api_keys = list(client.settings.api_key_secrets)
    # Added first, so it runs inside count_requests and its 413s are counted too.
    app.add_middleware(BodyLimit, max_bytes=client.settings.request_bytes_limit)
    install_error_handlers(app)
    app.include_router(router)
    _add_metrics(app, client)
    _document_job_variants(app, client)
    return app


def _document_job_variants(app: FastAPI, client: Client) -> None:
    """`/openapi.json` with the job body of each model of this service (producer/job_schemas.py);
    built once, on the first request for it, as FastAPI builds the rest."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            add_job_variants(schema, client.registry.models, client.settings.max_text_chars)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _add_metrics(app: FastAPI, client: Client) -> None:
    """`/metrics`: requests by route and status, and the broker's queue depths."""
    metrics = CollectorRegistry()
    requests = Counter(
        "pipeq_api_requests",
        "API requests by route and status",
        ["route", "status"],
        registry=metrics,
    )
    latency = Histogram(
        "pipeq_api_request_seconds",
        "API request latency by route and method",
        ["route", "method"],
        registry=metrics,
    )
    register_queue_depth(
        metrics,
        client.settings.broker_url,
        client.celery.conf.broker_transport_options,
        client.registry.models,
        client.records,
        client.ledger,
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        began = time.perf_counter()
        response: Response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route, request.method).observe(time.perf_counter() - began)
        return response

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
    )
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)
