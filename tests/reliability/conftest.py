"""Reliability fixtures: a Redis server of the test's own (restartable, memory measurable, shared
with nobody) and helpers that count job records by status."""

from __future__ import annotations

import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeq.config.settings import Settings
from pipeq.producer.client import Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` on a free loopback port, no persistence; `stop` and `start` keep the port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    persistence = ["--save", "", "--appendonly", "no"]

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *self.persistence]
            + ["--maxmemory-policy", "noeviction", "--dir", str(self._workdir)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:  # also "LOADING" while a durable one replays its file
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(f"{self.url}/{db}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def own_env(own_redis: RedisServer, worker_env: dict[str, str]) -> dict[str, str]:
    """The session's worker settings pointed at `own_redis` (broker DB 0, records DB 1)."""
    urls = {"PIPEQ_BROKER_URL": f"{own_redis.url}/0", "PIPEQ_RESULT_URL": f"{own_redis.url}/1"}
    return {**worker_env, **urls}


@pytest.fixture
def own_client(own_env: dict[str, str], settings: Settings) -> Client:
    urls = {"broker_url": own_env["PIPEQ_BROKER_URL"], "result_url": own_env["PIPEQ_RESULT_URL"]}
    return Client(settings.model_copy(update=urls))


def statuses(server: RedisServer, ids: list[str], db: int = 1) -> Counter[str]:
    """How many of `ids` have each status in the job records (one pipelined round trip)."""
    pipe = server.client(db).pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(f"pipeq:job:{job_id}", "status")
    return Counter((s or b"missing").decode() for s in pipe.execute())
