"""`HttpClient`: pipeq's HTTP API from Python, for a backend that reaches only the API (the
broker stays private). The methods of `Client`, typed results (`JobDocument`), the API key, an
idempotency key per submit, 429 and 503 retried after their Retry-After within a bounded budget,
and every other error raised as the `PipeqError` subclass the API named."""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any

import httpx

from pipeq.config import errors
from pipeq.config.errors import JobError, PipeqError, ServiceUnavailable
from pipeq.core.inputs import Input
from pipeq.core.jobs import JobDocument, Lane, Webhook

RETRIED = (429, 503)
MAX_WAIT_S = 60.0  # the API's longest long-poll


class HttpClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry_budget_s: float = 30.0,
    ) -> None:
        self._http = httpx.Client(**http_options(url, api_key, timeout_s))
        self.retry_budget_s = retry_budget_s

    def submit(
        self,
        model: str,
        inputs: list[Input] | list[Any],
        params: dict[str, Any] | None = None,
        *,
        priority: Lane = "interactive",
        id: str | None = None,
        webhook: Webhook | dict[str, Any] | None = None,
        store: str = "redis",
        deadline_s: float | None = None,
    ) -> str:
        """Queue one job and return its id. Its idempotency key (`id`, a new one if not given)
        makes a retried submit return the same job instead of queueing another."""
        body = submit_body(model, inputs, params, priority, id, webhook, store, deadline_s)
        return str(self._request("POST", "/v1/jobs", json=body).json()["id"])

    def get(self, job_id: str, *, wait_s: float = 0.0, presign: bool = False) -> JobDocument:
        """The job's record; with `wait_s`, once it is done or `wait_s` (at most 60) has passed."""
        params = {"wait": min(wait_s, MAX_WAIT_S), "presign": presign}
        return JobDocument.model_validate(
            self._request("GET", f"/v1/jobs/{job_id}", params=params).json()
        )

    def wait(self, job_id: str, timeout_s: float = 60.0) -> JobDocument:
        """Block until the job is finished or `timeout_s` passes; return the latest record."""
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self.get(job_id, wait_s=max(0.0, deadline - time.monotonic()))
            if doc.done or time.monotonic() >= deadline:
                return doc

    def cancel(self, job_id: str) -> JobDocument:
        """Cancel a queued job; raises JobConflict for one already running or finished."""
        return JobDocument.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        give_up = time.monotonic() + self.retry_budget_s
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            if response.status_code < 400:
                return response
            time.sleep(retry_delay_s(response, give_up))


def http_options(url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    """What `HttpClient` and `AsyncHttpClient` give their httpx client."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Read timeout past the longest long-poll, so a `wait` is not cut short by httpx.
    timeout = httpx.Timeout(timeout_s, read=MAX_WAIT_S + timeout_s)
    return {"base_url": url.rstrip("/"), "headers": headers, "timeout": timeout}


def unreachable(base_url: httpx.URL, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(f"the API at {base_url} cannot be reached: {exc}")


def retry_delay_s(response: httpx.Response, give_up: float) -> float:
    """How long to wait before asking again after the error `response`; raises the error when
    it is not retried (not 429 or 503) or its Retry-After would pass the budget (`give_up`)."""
    delay_s = retry_after_s(response)
    if response.status_code not in RETRIED or time.monotonic() + delay_s > give_up:
        raise error_of(response)
    return delay_s


def submit_body(
    model: str,
    inputs: list[Any],
    params: dict[str, Any] | None,
    priority: Lane,
    id: str | None,
    webhook: Webhook | dict[str, Any] | None,
    store: str,
    deadline_s: float | None,
) -> dict[str, Any]:
    """The `POST /v1/jobs` body, with an idempotency key of its own where `id` is not given."""
    body = {
        "model": model,
        "inputs": [_plain(item) for item in inputs],
        "params": params or {},
        "priority": priority,
        "id": id or uuid.uuid4().hex,
        "webhook": _plain(webhook),
        "store": store,
        "deadline_s": deadline_s,
    }
    return {key: value for key, value in body.items() if value is not None}


def retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def error_of(response: httpx.Response) -> PipeqError:
    """The `PipeqError` subclass the API named in its error body, with its message."""
    try:
        info = response.json()["error"]
        kind, message = str(info["type"]), str(info["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "", f"HTTP {response.status_code}: {response.text[:200]}"
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, PipeqError)):
        cls = ServiceUnavailable if response.status_code >= 500 else JobError
    if cls is errors.Overloaded:
        return errors.Overloaded(message, retry_after_s=int(retry_after_s(response)))
    return cls(message)


def _plain(value: Any) -> Any:
    return (
        value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value
    )
