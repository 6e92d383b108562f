"""`AsyncHttpClient`: `HttpClient` for asyncio backends, on httpx's AsyncClient: the same
methods, typed records, idempotency keys, bounded retries of 429 and 503, and errors."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import httpx

from pipeq.core.jobs import JobDocument, Lane, Webhook
from pipeq.producer.http_client import (
    MAX_WAIT_S,
    http_options,
    retry_delay_s,
    submit_body,
    unreachable,
)


class AsyncHttpClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry_budget_s: float = 30.0,
    ) -> None:
        self._http = httpx.AsyncClient(**http_options(url, api_key, timeout_s))
        self.retry_budget_s = retry_budget_s

    async def submit(
        self,
        model: str,
        inputs: list[Any],
        params: dict[str, Any] | None = None,
        *,
        priority: Lane = "interactive",
        id: str | None = None,
        webhook: Webhook | dict[str, Any] | None = None,
        store: str = "redis",
        deadline_s: float | None = None,
    ) -> str:
        body = submit_body(model, inputs, params, priority, id, webhook, store, deadline_s)
        return str((await self._request("POST", "/v1/jobs", json=body)).json()["id"])

    async def get(self, job_id: str, *, wait_s: float = 0.0, presign: bool = False) -> JobDocument:
        params = {"wait": min(wait_s, MAX_WAIT_S), "presign": presign}
        answer = await self._request("GET", f"/v1/jobs/{job_id}", params=params)
        return JobDocument.model_validate(answer.json())

    async def wait(self, job_id: str, timeout_s: float = 60.0) -> JobDocument:
        deadline = time.monotonic() + timeout_s
        while True:
            doc = await self.get(job_id, wait_s=max(0.0, deadline - time.monotonic()))
            if doc.done or time.monotonic() >= deadline:
                return doc

    async def cancel(self, job_id: str) -> JobDocument:
        answer = await self._request("DELETE", f"/v1/jobs/{job_id}")
        return JobDocument.model_validate(answer.json())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        give_up = time.monotonic() + self.retry_budget_s
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            if response.status_code < 400:
                return response
            await asyncio.sleep(retry_delay_s(response, give_up))
