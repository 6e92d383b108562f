"""Job records on Redis through redis-py's asyncio API: what `AsyncClient` reads and waits on,
the same keys and per-job finished signal as `RedisRecords`, without a thread per waiter."""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeq.core.jobs import JobDocument
from pipeq.core.records import DONE_KEY, DONE_TTL_S, RECORD_KEY


class AsyncRedisRecords:
    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    async def get(self, job_id: str) -> JobDocument | None:
        raw = await self._redis.hget(RECORD_KEY + job_id, "doc")
        return None if raw is None else JobDocument.model_validate_json(raw)

    async def wait_finished(self, job_id: str, timeout_s: float) -> None:
        """Return when the job may have finished, or after `timeout_s`: callers re-read. The
        token taken is put back for the next waiter, as `RedisRecords.wait_finished` does."""
        seconds = min(timeout_s, 5.0)  # under the socket timeout; callers loop to their deadline
        if seconds <= 0:
            return
        if await self._redis.blpop([DONE_KEY + job_id], timeout=seconds) is not None:
            async with self._redis.pipeline() as pipe:
                pipe.lpush(DONE_KEY + job_id, 1)
                pipe.expire(DONE_KEY + job_id, DONE_TTL_S)
                await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()
