"""Queue-per-model routing: two workers with different `--models` on one broker; every job is run
by a worker that serves its model, never by the other."""

from __future__ import annotations

from typing import Any

import redis

from pipeq.config.settings import Settings
from pipeq.producer.client import Client

ROUTING_BROKER_DB = 3  # its own broker database: only the two workers below take these jobs


def test_each_job_reaches_only_a_worker_serving_its_model(
    start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{ROUTING_BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    # Job records in the same database: nothing another test run flushes.
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker}
    start_worker("--models", "tiny-sentiment", "--concurrency", "8", name="sentiment@%h", env=env)
    start_worker("--models", "tiny-features", "--concurrency", "8", name="features@%h", env=env)
    client = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))

    jobs: dict[str, str] = {}
    for i in range(20):
        for model in ("tiny-sentiment", "tiny-features"):
            lane = "bulk" if i % 4 == 0 else "interactive"
            jobs[client.submit(model, [f"routing test number {i}"], priority=lane)] = model
    # A model neither worker serves is accepted and waits in its queue.
    orphan = client.submit("tiny-vit", [{"url": "https://example.com/a.png"}])

    served = {"tiny-sentiment": "sentiment@", "tiny-features": "features@"}
    seen: dict[str, set[str]] = {"tiny-sentiment": set(), "tiny-features": set()}
    for job_id, model in jobs.items():
        doc = client.wait(job_id, timeout_s=60)
        assert doc.status == "succeeded", doc
        assert doc.worker is not None and doc.worker.startswith(served[model]), (model, doc.worker)
        seen[model].add(doc.worker)
        if model == "tiny-features":
            assert isinstance(doc.outputs[0][0][0], list)  # token vectors, not labels
        else:
            assert {"label", "score"} == set(doc.outputs[0][0])
    assert all(len(names) == 1 for names in seen.values()), seen
    assert client.get(orphan).status == "queued"
    assert redis.Redis.from_url(broker).llen("pipeq.tiny-vit.interactive") == 1
