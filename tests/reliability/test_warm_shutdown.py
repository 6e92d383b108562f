"""SIGTERM a worker mid-drain: what its engine started is stored and acked, what it had not claimed
goes back to the queue, and a second worker finishes the rest, each job run once."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer, statuses

pytestmark = pytest.mark.reliability

JOBS = 1_500


def test_sigterm_finishes_started_jobs_and_puts_back_the_rest(
    start_worker: Any, own_redis: RedisServer, own_env: dict[str, str], own_client: Client
) -> None:
    texts = [f"review {i}: {'fine ' * (i % 7)}" for i in range(JOBS)]
    requests = [JobRequest(model="tiny-sentiment", inputs=[t], priority="bulk") for t in texts]
    ids = [doc.id for doc, _ in own_client.submit_many(requests)]
    worker = start_worker("--concurrency", "256", "--models", "tiny-sentiment", env=own_env)
    deadline = time.monotonic() + 60
    while statuses(own_redis, ids)["succeeded"] < 100:
        assert time.monotonic() < deadline, statuses(own_redis, ids)
        time.sleep(0.02)

    assert worker.stop(signal.SIGTERM) == 0
    counts = statuses(own_redis, ids)
    broker = own_redis.client(0)
    queued_messages = broker.llen("pipeq.tiny-sentiment.bulk")
    print(f"\nat SIGTERM's end: {dict(counts)}; {queued_messages} messages back in the queue")
    # Nothing half done: started jobs are stored, the others wait in the queue, none is held.
    assert set(counts) <= {"succeeded", "queued"}, counts
    assert broker.hlen("unacked") == 0
    assert queued_messages == counts["queued"] > 0

    start_worker("--concurrency", "64", "--models", "tiny-sentiment", env=own_env, name="w2@%h")
    deadline = time.monotonic() + 90
    while statuses(own_redis, ids)["succeeded"] < JOBS:
        assert time.monotonic() < deadline, statuses(own_redis, ids)
        time.sleep(0.1)
    docs = [own_client.get(job_id) for job_id in ids]
    assert all(doc.deliveries == 1 for doc in docs), [
        d.deliveries for d in docs if d.deliveries != 1
    ]
