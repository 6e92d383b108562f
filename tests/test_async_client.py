"""`AsyncClient` and `AsyncHttpClient` against the real Redis, worker and API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from pipeq.config.errors import InvalidInput, JobConflict, JobNotFound
from pipeq.config.settings import Settings
from pipeq.core.records import RedisRecords
from pipeq.producer.async_client import AsyncClient
from pipeq.producer.async_http_client import AsyncHttpClient
from pipeq.producer.client import Client
from tests.test_api import serve

IDLE_DB = 12  # a broker database no worker consumes: jobs stay queued


@pytest.mark.usefixtures("session_worker")
def test_async_client_submits_and_waits(settings: Settings) -> None:
    async def scenario() -> None:
        async with AsyncClient(settings) as client:
            job_id = await client.submit("tiny-sentiment", ["a fine day"], {"top_k": 2})
            doc = await client.wait(job_id, timeout_s=60)
            assert doc.status == "succeeded" and len(doc.outputs[0]) == 2
            assert (await client.get(job_id)).outputs == doc.outputs
            with pytest.raises(JobNotFound):
                await client.get("never-submitted")
            with pytest.raises(InvalidInput):
                await client.submit("tiny-vit", ["a cat"])

    asyncio.run(scenario())


def test_async_wait_leaves_the_event_loop_free(settings: Settings) -> None:
    """While `wait` waits, another coroutine of the same loop runs and finishes the job; a wait
    that blocked the loop would return the job still queued at its timeout."""
    broker = settings.broker_url.rsplit("/", 1)[0] + f"/{IDLE_DB}"  # type: ignore[union-attr]
    redis.Redis.from_url(broker).flushdb()
    idle = settings.model_copy(update={"broker_url": broker})
    records = RedisRecords(idle.effective_result_url, idle.result_ttl_s)

    async def finish_soon(job_id: str) -> None:
        await asyncio.sleep(0.3)
        doc = Client(idle).get(job_id)
        finished = doc.model_copy(update={"status": "succeeded", "outputs": [[]], "errors": [None]})
        await asyncio.to_thread(records.put, finished)

    async def scenario() -> None:
        async with AsyncClient(idle) as client:
            job_id = await client.submit("tiny-sentiment", ["never run"])
            doc, _ = await asyncio.gather(client.wait(job_id, timeout_s=30), finish_soon(job_id))
            assert doc.status == "succeeded"

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def api_url(client: Client) -> Iterator[str]:
    for http in serve(client):
        yield str(http.base_url)


@pytest.mark.usefixtures("session_worker")
def test_async_http_client(api_url: str) -> None:
    async def scenario() -> None:
        async with AsyncHttpClient(api_url) as client:
            job_id = await client.submit("tiny-sentiment", ["a fine day"], id="async-http-1")
            assert (
                await client.submit("tiny-sentiment", ["a fine day"], id="async-http-1") == job_id
            )
            doc = await client.wait(job_id, timeout_s=60)
            assert doc.status == "succeeded"
            with pytest.raises(JobConflict):
                await client.cancel(job_id)
            with pytest.raises(InvalidInput, match=r"inputs\[0\] is text"):
                await client.submit("tiny-vit", ["a cat"])

    asyncio.run(scenario())
