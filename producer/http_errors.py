"""One error body on the wire: every error response of the API is `{"error": {type, message,
retryable}}` with the status of the error's class (`PipeqError.http_status`), from one handler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from pipeq.config.errors import ErrorInfo, InvalidRequest, PipeqError, StoreError


class ErrorBody(BaseModel):
    """An error response: the error, which fields failed validation (422), and, for a cancel
    that came too late (409), the job as it is."""

    error: ErrorInfo
    detail: list[dict[str, Any]] | None = None
    job: dict[str, Any] | None = None


# What each route may answer besides its success, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "Missing or wrong API key",
        404: "Unknown model, or no job of this API key's with that id",
        409: "Id reused with another body, or job past cancelling",
        413: "Inline data over PIPEQ_MAX_MEDIA_BYTES, a text over PIPEQ_MAX_TEXT_CHARS or a "
        "body over PIPEQ_MAX_REQUEST_BYTES",
        422: "Malformed request, or a param the model's task does not accept",
        429: "The model's lane is over PIPEQ_MAX_BACKLOG or slower than deadline_s; see "
        "Retry-After",
        503: "Broker or result store unavailable",
    }.items()
}


def errors_of(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route may give, for its OpenAPI entry."""
    return {status: ERROR_RESPONSES[status] for status in statuses}


def error_response(exc: PipeqError, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=exc.to_info(), **extra)
    headers = None if exc.retry_after_s is None else {"Retry-After": f"{exc.retry_after_s:g}"}
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=exc.http_status,
        headers=headers,
    )


async def _pipeq_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PipeqError)
    return error_response(exc)


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return error_response(StoreError(f"broker or result store unavailable: {exc}"))


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    return error_response(InvalidRequest(summary(errors)), detail=detail)


def summary(errors: Sequence[Any]) -> str:
    """The first few validation errors in one line, each at its place (`inputs.3.url: ...`)."""
    parts = [
        f"{_place(e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}" for e in errors[:5]
    ]
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _place(loc: Sequence[Any]) -> str:
    # A tagged union repeats its tag before the field of the same name (inputs.0.url.url).
    names = [str(p) for p in loc if p != "body"]
    kept = [name for i, name in enumerate(names) if i + 1 == len(names) or names[i + 1] != name]
    return ".".join(kept) or "body"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # FastAPI answers a body its JSON parser gives up on (nesting past the recursion limit)
    # with a bare 400; the contract says a malformed request is a 422.
    if exc.status_code == 400:
        return error_response(InvalidRequest(str(exc.detail)))
    name = HTTPStatus(exc.status_code).phrase.title().replace(" ", "").replace("-", "")
    info = ErrorInfo(type=name, message=str(exc.detail))
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request, headers or {})}
    return JSONResponse({"error": info.model_dump()}, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request, headers: Mapping[str, str]) -> str:
    """Every method the request's path answers. FastAPI makes one route per method, and
    Starlette's 405 names only the first route of the path (`Allow: GET` on /v1/jobs/{id},
    which takes DELETE too); the OpenAPI document lists them all."""
    methods = {m.strip() for m in headers.get("Allow", "").split(",") if m.strip()}
    segments = request.scope["path"].split("/")
    for template, operations in request.app.openapi()["paths"].items():
        parts = template.split("/")
        if len(parts) == len(segments) and all(
            part == segment or (part.startswith("{") and segment != "")
            for part, segment in zip(parts, segments, strict=True)
        ):
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PipeqError, _pipeq_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    for unreachable in (OperationalError, RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(unreachable, _unavailable)
