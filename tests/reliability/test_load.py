"""Load: LOAD_JOBS jobs (default 5,000) through one CPU worker and the tiny sentiment model.

Every job is accounted for, and the worker's RSS and Redis memory stay flat: the worker reserves
at most `concurrency` messages (prefetch multiplier 1) and records carry a TTL. Prints jobs/s and
the memory figures (BENCHMARKS.md, "Load: N jobs through one CPU worker")."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
import pytest

from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer, statuses

pytestmark = pytest.mark.reliability

JOBS = int(os.environ.get("LOAD_JOBS", "5000"))
CHUNK = 1_000
TTL_S = 3_600


def _rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_load_through_one_cpu_worker(
    start_worker: Any, own_redis: RedisServer, own_env: dict[str, str], own_client: Client
) -> None:
    env = {**own_env, "PIPEQ_RESULT_TTL_S": str(TTL_S), "PIPEQ_TASK_EVENTS": "false"}
    worker = start_worker(
        "--concurrency", "16", "--models", "tiny-sentiment", name="load@%h", env=env
    )
    redis_mem = lambda: own_redis.client().info("memory")["used_memory"] / 2**20  # noqa: E731
    rss_start, redis_start = _rss_mib(worker.proc.pid), redis_mem()
    ids: list[str] = []
    began = time.monotonic()
    rss_peak = rss_start
    for start in range(0, JOBS, CHUNK):
        wave = [
            JobRequest(model="tiny-sentiment", inputs=[f"load {i}"], priority="bulk")
            for i in range(start, min(start + CHUNK, JOBS))
        ]
        ids += [doc.id for doc, _ in own_client.submit_many(wave)]
        # Keep at most two chunks queued ahead of the worker, as a backfill does.
        window = ids[-3 * CHUNK :]
        while len(window) - statuses(own_redis, window)["succeeded"] > 2 * CHUNK:
            time.sleep(0.05)
        rss_peak = max(rss_peak, _rss_mib(worker.proc.pid))
    deadline = time.monotonic() + 120 + JOBS / 50
    while (counts := statuses(own_redis, ids))["succeeded"] < JOBS:
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    elapsed = time.monotonic() - began
    rss_end, redis_end = _rss_mib(worker.proc.pid), redis_mem()
    ttls = {own_redis.client(1).ttl(f"pipeq:job:{job_id}") for job_id in ids[:: max(1, JOBS // 50)]}
    print(
        f"\nload: {JOBS} jobs in {elapsed:.1f} s = {JOBS / elapsed:.0f} jobs/s; worker RSS "
        f"{rss_start:.0f} -> {rss_end:.0f} MiB (peak {rss_peak:.0f}); Redis used_memory "
        f"{redis_start:.1f} -> {redis_end:.1f} MiB"
    )
    assert counts == {"succeeded": JOBS}
    assert all(0 < ttl <= TTL_S for ttl in ttls), ttls
    assert own_redis.client(0).llen("pipeq.tiny-sentiment.bulk") == 0
    assert own_redis.client(0).hlen("unacked") == 0
    # Flat: the worker holds no per-job state once a job is acked.
    assert rss_end < rss_start * 1.5 + 100, (rss_start, rss_end)
