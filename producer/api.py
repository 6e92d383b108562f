"""The HTTP API: a thin FastAPI layer over `Client`. Errors are raised as `PipeqError`s and
answered by one handler (producer/http_errors.py)."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from pipeq.config.errors import JobConflict, Unauthorized
from pipeq.core.jobs import JobAccepted, JobDocument, JobRequest, owner_of
from pipeq.core.queue_depth import register_queue_depth
from pipeq.producer.body_limit import BodyLimit
from pipeq.producer.client import Client
from pipeq.producer.http_errors import ERROR_RESPONSES, error_response, install_error_handlers
from pipeq.producer.live_workers import live_workers

MAX_WAIT_S = 60.0


def require_key(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str | None:
    """The caller's owner (`owner_of` its key); None when no keys are set (one user)."""
    keys: list[str] = request.app.state.api_keys
    if not keys:
        return None
    given = (x_api_key or (authorization or "").removeprefix("Bearer ").strip()).encode()
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


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobAccepted,
    responses={200: {"model": JobAccepted}, **ERROR_RESPONSES},
)
def submit(body: JobRequest, owner: Owner, client: TheClient) -> Any:
    doc, created = client.submit_request(body, owner)
    accepted = JobAccepted(id=doc.public_id, status=doc.status)
    return accepted if created else JSONResponse(accepted.model_dump(), status_code=200)


@router.get("/v1/jobs/{job_id}", response_model=JobDocument, responses=ERROR_RESPONSES)
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
    "/v1/jobs/{job_id}", status_code=202, response_model=JobDocument, responses=ERROR_RESPONSES
)
def cancel_job(job_id: str, owner: Owner, client: TheClient) -> Any:
    doc, cancelled = client.cancel(job_id, owner)
    if not cancelled:
        conflict = JobConflict(f"job {job_id} is {doc.status}; only queued jobs can be cancelled")
        return error_response(conflict, job=doc.public().model_dump(mode="json"))
    return doc.public()


@router.get("/v1/models", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
def list_models(client: TheClient) -> dict[str, Any]:
    """Each model of the registry, with the live workers serving it (`workers`)."""
    workers = live_workers(client)
    return {
        name: {**spec.public(), "workers": workers.get(name, [])}
        for name, spec in client.registry.models.items()
    }


@router.get("/healthz")
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
    return app


def _add_metrics(app: FastAPI, client: Client) -> None:
    """`/metrics`: requests by route and status, and the broker's queue depths."""
    metrics = CollectorRegistry()
    requests = Counter(
        "pipeq_api_requests",
        "API requests by route and status",
        ["route", "status"],
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
        response: Response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/metrics", include_in_schema=True)
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)
