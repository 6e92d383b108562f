"""Redis killed and restarted mid-run under a live worker and a producer: every accepted job
ends succeeded, the API answers 503 (not 500, not a hang) while Redis is down, and the same
worker process consumes again after the restart.

The shared `own_redis` keeps nothing on disk (`--save "" --appendonly no`), so a restart of it
would drop the queue and the job records themselves, which no broker client can bring back.
This module's `own_redis` runs the same private server with `--appendonly yes --appendfsync
always`: every write is fsynced before Redis answers it, so a submit that returned is on disk,
and the server is killed with SIGKILL (a crash, not a clean SHUTDOWN that would save a dump
anyway)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError

from pipeq.config.errors import StoreError
from pipeq.producer.api import create_app
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer, statuses

pytestmark = pytest.mark.reliability

UP_S, DOWN_S, AFTER_S = 4.0, 3.0, 4.0
ENV = {"PIPEQ_VISIBILITY_TIMEOUT": "5", "PIPEQ_UNACKED_RESTORE_INTERVAL_S": "1"}
REFUSED = (redis.RedisError, OperationalError, StoreError, OSError)


class DurableRedis(RedisServer):
    """`RedisServer` with an fsync-always append-only file in its workdir; `kill` crashes it."""

    persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path).start()
    yield server
    server.stop()


class Producer(threading.Thread):
    """Submits one job at a time, ~50/s; a refused submit is retried with the same id (a repeat
    of an id is idempotent), and counted."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.accepted: list[tuple[str, float]] = []  # (id, when submit returned)
        self.refused = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            job_id = f"restart-{n}"
            try:
                self.client.submit("tiny-sentiment", [f"text {n}"], priority="bulk", id=job_id)
            except REFUSED:
                self.refused += 1
                time.sleep(0.05)
                continue
            self.accepted.append((job_id, time.monotonic()))
            n += 1
            time.sleep(0.02)


# Found by this test: the worker exited ("Unrecoverable error: AttributeError") when Redis went
# away while it held unacked jobs; config/redis_transport.py's Channel._get_pool now raises a
# connection error instead, and Celery reconnects.
def test_redis_restart_loses_no_accepted_job(
    start_worker: Any, own_redis: DurableRedis, own_env: dict[str, str], own_client: Client
) -> None:
    worker = start_worker(
        "--concurrency",
        "4",
        "--models",
        "tiny-sentiment",
        name="restart@%h",
        env={**own_env, **ENV},
    )
    api = TestClient(create_app(own_client), raise_server_exceptions=False)
    producer = Producer(own_client)
    producer.start()
    time.sleep(UP_S)
    own_redis.kill()
    killed_at, accepted_before = time.monotonic(), len(producer.accepted)
    began = time.monotonic()
    down = api.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["down"]})
    answer_s = time.monotonic() - began
    time.sleep(max(0.0, DOWN_S - (time.monotonic() - killed_at)))
    own_redis.start()
    restarted_at = time.monotonic()
    time.sleep(AFTER_S)
    producer.stopping.set()
    producer.join(30)
    ids = [job_id for job_id, _ in producer.accepted]
    after = [job_id for job_id, when in producer.accepted if when > restarted_at]
    deadline = time.monotonic() + 40
    while (counts := statuses(own_redis, ids))["succeeded"] < len(ids):
        assert worker.proc.poll() is None, (
            f"the worker exited: {worker.log_path.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    drained_s = time.monotonic() - restarted_at
    print(
        f"\nredis restart: {len(ids)} jobs accepted ({accepted_before} before the kill, "
        f"{len(after)} after the restart), {producer.refused} submits refused while down; API "
        f"answered {down.status_code} in {answer_s:.2f} s while down; all succeeded "
        f"{drained_s:.1f} s after the restart; final {dict(counts)}"
    )
    assert down.status_code == 503, down.text
    assert answer_s < 10
    assert producer.refused > 0, "the producer never saw Redis down"
    assert after, "nothing accepted after the restart"
    assert counts == {"succeeded": len(ids)}, counts
    # The same worker process reconnected and took the post-restart jobs.
    assert worker.proc.poll() is None
    docs = [own_client.get(job_id) for job_id in after]
    assert all(d.status == "succeeded" and d.errors == [None] for d in docs)
