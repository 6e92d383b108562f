"""`AsyncClient`: `Client` for asyncio backends (FastAPI, Starlette, Django's async views).
`get` and `wait` read the record store through redis-py's asyncio API (`await wait(...)` blocks
on the job's finished signal, not the event loop); publishing goes through Celery, which has no
asyncio API, on a worker thread. On the embedded broker (SQLite records) every call runs on a
worker thread."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

from pipeq.config.errors import JobNotFound
from pipeq.config.settings import Settings
from pipeq.core.async_records import AsyncRedisRecords
from pipeq.core.jobs import JobDocument, JobRequest, scoped_id
from pipeq.core.records import RedisRecords
from pipeq.producer.client import Client


class AsyncClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self._client = Client(settings)
        url = self._client.settings.effective_result_url
        redis_records = isinstance(self._client.records, RedisRecords)
        self._records = AsyncRedisRecords(url) if redis_records else None

    async def submit(
        self, model: str, inputs: list[Any], params: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """`Client.submit`, awaited: the same arguments and checks; returns the job id."""
        return await asyncio.to_thread(self._client.submit, model, inputs, params, **kwargs)

    async def submit_many(
        self, requests: list[JobRequest], **kwargs: Any
    ) -> list[tuple[JobDocument, bool]]:
        return await asyncio.to_thread(self._client.submit_many, requests, **kwargs)

    async def get(
        self, job_id: str, presign: bool = False, owner: str | None = None
    ) -> JobDocument:
        """The job's record (outputs stored in S3 read back, as `Client.get`)."""
        if self._records is None:
            return await asyncio.to_thread(self._client.get, job_id, presign, owner)
        doc = await self._records.get(scoped_id(owner, job_id))
        if doc is None or (owner is not None and doc.owner != owner):
            raise JobNotFound(f"no job {job_id!r} (never submitted, or its result expired)")
        if doc.result_url is not None:
            return await asyncio.to_thread(self._client.results.load, doc, presign)
        return doc

    async def wait(self, job_id: str, timeout_s: float = 60.0) -> JobDocument:
        """Wait until the job is finished or `timeout_s` passes; the latest record."""
        deadline = time.monotonic() + timeout_s
        while True:
            doc = await self.get(job_id)
            remaining_s = deadline - time.monotonic()
            if doc.done or remaining_s <= 0:
                return doc
            if self._records is None:
                await asyncio.to_thread(self._client.records.wait_finished, job_id, remaining_s)
            else:
                await self._records.wait_finished(job_id, remaining_s)

    async def cancel(self, job_id: str, owner: str | None = None) -> tuple[JobDocument, bool]:
        """`Client.cancel`: (record, cancelled)."""
        return await asyncio.to_thread(self._client.cancel, job_id, owner)

    async def aclose(self) -> None:
        if self._records is not None:
            await self._records.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
