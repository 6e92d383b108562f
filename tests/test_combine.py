"""Group commit: concurrent calls share a batch, and each caller gets its own answer or error."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from pipeq.core.combine import Combiner
from pipeq.core.jobs import JobDocument
from pipeq.core.records import RedisRecords
from tests.conftest import REDIS


def test_each_caller_gets_its_own_answer_and_batches_form() -> None:
    batches: list[int] = []
    release = threading.Event()

    def run(args: list[int]) -> list[int]:
        batches.append(len(args))
        release.wait(5)  # the first batch holds the wire while the others queue behind it
        return [arg * 2 for arg in args]

    double = Combiner(run)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(double, i) for i in range(200)]
        while sum(batches) == 0:
            threading.Event().wait(0.01)
        release.set()
        results = [future.result(10) for future in futures]
    assert results == [i * 2 for i in range(200)]
    assert sum(batches) == 200
    assert max(batches) > 1, batches


def test_a_failed_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    fail = threading.Event()
    fail.set()

    def run(args: list[str]) -> list[str]:
        if fail.is_set():
            raise ConnectionError("redis went away")
        return [arg.upper() for arg in args]

    upper = Combiner(run)
    with pytest.raises(ConnectionError):
        upper("a")
    fail.clear()
    assert upper("b") == "B"


def test_wrong_result_count_is_an_error_not_a_misrouted_answer() -> None:
    short = Combiner(lambda args: args[:-1])
    with pytest.raises(RuntimeError):
        short("x")


def test_records_from_many_threads_land_on_their_own_jobs() -> None:
    url = f"{REDIS}/2"
    redis.Redis.from_url(url).flushdb()
    records = RedisRecords(url, ttl_s=60)
    docs = [
        JobDocument(id=f"job-{i}", model="m", status="succeeded", lane="bulk", outputs=[i])
        for i in range(300)
    ]
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(records.put, docs))
        back = list(pool.map(records.get, [doc.id for doc in docs]))
    assert [doc.outputs if doc else None for doc in back] == [[i] for i in range(300)]
    assert records.get("no-such-job") is None


def test_a_claim_after_the_server_lost_its_scripts() -> None:
    """Claims run the CAS script by its hash; a restarted Redis has none, and the claim still lands."""
    url = f"{REDIS}/2"
    redis.Redis.from_url(url).flushdb()
    records = RedisRecords(url, ttl_s=60)
    queued = JobDocument(id="job-x", model="m", status="queued", lane="bulk")
    records.put(queued)
    redis.Redis.from_url(url).script_flush()
    changed, _ = records.transition(queued.model_copy(update={"status": "running"}), ("queued",))
    assert changed
    stored = records.get("job-x")
    assert stored is not None and stored.status == "running"
