"""SIGKILL each process of one engine (the forward process, then the front) during a run: every
job ends succeeded, once.

A killed forward process is restarted by the supervisor and the front sends it again every part
it had not answered; a killed front is restarted too, and its unacked messages come back after
the visibility timeout. The test prints how many jobs were in flight at each kill."""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil
import pytest

from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer, statuses

pytestmark = pytest.mark.reliability

JOBS = 600
ENV = {"PIPEQ_VISIBILITY_TIMEOUT": "5", "PIPEQ_UNACKED_RESTORE_INTERVAL_S": "1"}


def _child(supervisor_pid: int, role: str) -> psutil.Process:
    for child in psutil.Process(supervisor_pid).children():
        if f"--role {role}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no {role} process under {supervisor_pid}")


def _wait_for(server: RedisServer, ids: list[str], succeeded: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while statuses(server, ids)["succeeded"] < succeeded:
        assert time.monotonic() < deadline, f"stuck at {statuses(server, ids)}"
        time.sleep(0.02)


@pytest.mark.parametrize("role", ["forward", "front"])
def test_sigkill_of_an_engine_process_loses_nothing(
    role: str,
    start_worker: Any,
    own_redis: RedisServer,
    own_env: dict[str, str],
    own_client: Client,
) -> None:
    worker = start_worker(
        "--concurrency",
        "16",
        "--models",
        "tiny-sentiment",
        name="engine@%h",
        env={**own_env, **ENV},
    )
    texts = [f"review {i}: {'good ' * (i % 7)}{'bad ' * (i % 3)}" for i in range(JOBS)]
    requests = [JobRequest(model="tiny-sentiment", inputs=[t], priority="bulk") for t in texts]
    ids = [doc.id for doc, _ in own_client.submit_many(requests)]
    _wait_for(own_redis, ids, JOBS // 10)
    victim = _child(worker.proc.pid, role)
    in_flight = statuses(own_redis, ids)["running"]
    victim.send_signal(signal.SIGKILL)
    _wait_for(own_redis, ids, JOBS)
    replacement = _child(worker.proc.pid, role)
    print(f"\n{role} SIGKILLed with {in_flight} jobs running; restarted as {replacement.pid}")
    assert replacement.pid != victim.pid
    counts = statuses(own_redis, ids)
    assert counts == {"succeeded": JOBS}, counts
    docs = [own_client.get(job_id) for job_id in ids]
    assert all(len(d.outputs or []) == 1 and d.errors == [None] for d in docs)
    assert worker.stop() == 0
