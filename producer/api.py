"""The HTTP API: a thin FastAPI layer over `Client`."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeq.config.errors import (
    InvalidParams,
    JobConflict,
    JobNotFound,
    Overloaded,
    PayloadTooLarge,
    StoreError,
    UnknownModel,
)
from pipeq.core.jobs import JobAccepted, JobDocument, JobRequest, owner_of
from pipeq.core.queue_depth import register_queue_depth
from pipeq.producer.body_limit import BodyLimit
from pipeq.producer.client import Client

MAX_WAIT_S = 60.0


_ERRORS = {
    401: {"description": "Missing or wrong API key"},
    404: {"description": "Unknown model, or no job of this API key's with that id"},
    409: {"description": "Id reused with another body, or job past cancelling"},
    413: {
        "description": "Inline data over PIPEQ_MAX_MEDIA_BYTES, a text over PIPEQ_MAX_TEXT_CHARS "
        "or a body over PIPEQ_MAX_REQUEST_BYTES"
    },
    422: {"description": "Malformed request, or a param the model's task does not accept"},
    429: {
        "description": "The model's lane is over PIPEQ_MAX_BACKLOG or slower than deadline_s; see Retry-After"
    },
    503: {"description": "Broker or result store unavailable"},
}


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
        raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)")
    return owner_of(matched[0])


# Each key is a tenant: its job ids are its own (stored as `scoped_id(owner, id)`), and another
# key's job answers 404, as a job that never existed does, so ids cannot be probed.
Owner = Annotated[str | None, Depends(require_key)]


def create_app(client: Client | None = None) -> FastAPI:  # noqa: C901 - the sum of small route closures, each simple
    client = client or Client()
    settings = client.settings
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
    app = FastAPI(title="pipeq", version="0.1.0")
    # Added first, so it runs inside count_requests and its 413s are counted too.
    app.add_middleware(BodyLimit, max_bytes=settings.request_bytes_limit)

    app.state.api_keys = list(settings.api_key_secrets)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body its JSON parser gives up on (nesting past the recursion limit)
        # with a bare 400; the contract says a malformed request is a 422.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse({"error": exc.detail}, status_code=status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid request", "detail": details}, status_code=422)

    @app.exception_handler(StoreError)
    @app.exception_handler(OperationalError)
    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": f"broker or result store unavailable: {exc}"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    auth = [Depends(require_key)]

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses={200: {"model": JobAccepted}, **_ERRORS},
    )
    def submit(body: JobRequest, owner: Owner) -> Any:
        try:
            doc, created = client.submit_request(body, owner)
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from exc
        except InvalidParams as exc:
            raise HTTPException(422, str(exc)) from exc
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        except PayloadTooLarge as exc:
            raise HTTPException(413, str(exc)) from exc
        except Overloaded as exc:
            raise HTTPException(
                429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from exc
        accepted = JobAccepted(id=doc.public_id, status=doc.status)
        return accepted if created else JSONResponse(accepted.model_dump(), status_code=200)

    @app.get("/v1/jobs/{job_id}", response_model=JobDocument, responses=_ERRORS)
    async def get_job(
        job_id: str,
        owner: Owner,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
        presign: Annotated[bool, Query(description="an https result_url for S3 results")] = False,
    ) -> JobDocument:
        deadline = time.monotonic() + wait
        while True:
            try:
                doc = await run_in_threadpool(client.get, job_id, presign, owner)
            except JobNotFound as exc:
                raise HTTPException(404, str(exc)) from exc
            if doc.done or time.monotonic() >= deadline:
                return doc.public()
            await asyncio.sleep(settings.wait_poll_interval_s)

    @app.delete(
        "/v1/jobs/{job_id}",
        status_code=202,
        response_model=JobDocument,
        responses=_ERRORS,
    )
    def cancel_job(job_id: str, owner: Owner) -> Any:
        try:
            doc, cancelled = client.cancel(job_id, owner)
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        if not cancelled:
            return JSONResponse(
                {
                    "error": f"job {job_id} is {doc.status}; only queued jobs can be cancelled",
                    "job": doc.public().model_dump(mode="json"),
                },
                status_code=409,
            )
        return doc.public()

    @app.get("/v1/models", dependencies=auth, responses=_ERRORS)
    def list_models() -> dict[str, Any]:
        return {name: spec.public() for name, spec in client.registry.models.items()}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        client.records.ping()
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=True)
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app
