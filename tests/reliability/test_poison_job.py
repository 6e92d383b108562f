"""A job whose worker dies on every delivery is failed after PIPEQ_MAX_DELIVERIES, not run forever.

Before the delivery count, a job that got its worker OOM-killed came back after the visibility
timeout to the next worker, which ran it and died in turn. Here the job's one input is a URL whose
server never answers, so it stays in flight until the test SIGKILLs the worker running it; a fresh
worker then takes the redelivered message. The third kill is the last: the fourth worker fails
the job as PoisonJob without fetching, stores it, publishes its webhook and acks the message."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeq.core.jobs import JobDocument
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer

pytestmark = pytest.mark.reliability

MAX_DELIVERIES = 3
ENV = {
    "PIPEQ_VISIBILITY_TIMEOUT": "3",
    "PIPEQ_UNACKED_RESTORE_INTERVAL_S": "1",
    "PIPEQ_MAX_DELIVERIES": str(MAX_DELIVERIES),
    "PIPEQ_ALLOW_PRIVATE_URLS": "true",
    "PIPEQ_MEDIA_TIMEOUT_S": "300",
}


@pytest.fixture
def hanging_url() -> Iterator[tuple[str, list[str]]]:
    """A URL that is never answered, and the list of requests it has taken."""
    hits: list[str] = []
    released = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            released.wait(600)

        def log_message(self, *_: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/bomb.png", hits
    released.set()
    httpd.shutdown()
    httpd.server_close()


def _wait_for(client: Client, job_id: str, done: Callable[[JobDocument], bool]) -> JobDocument:
    deadline = time.monotonic() + 60
    while True:
        doc = client.get(job_id)
        if done(doc):
            return doc
        assert time.monotonic() < deadline, f"job stuck at {doc}"
        time.sleep(0.1)


def test_a_job_that_kills_its_worker_fails_after_max_deliveries(
    start_worker: Any,
    own_redis: RedisServer,
    own_env: dict[str, str],
    own_client: Client,
    hanging_url: tuple[str, list[str]],
) -> None:
    url, hits = hanging_url
    env = {**own_env, **ENV}
    worker = start_worker("--models", "tiny-vit", name="w0@%h", env=env)
    job_id = own_client.submit(
        "tiny-vit",
        [{"url": url}],
        webhook={"url": "https://example.com/hook", "events": ["failed"]},
    )
    for delivery in range(1, MAX_DELIVERIES + 1):
        _wait_for(
            own_client,
            job_id,
            lambda doc, n=delivery: doc.status == "running" and doc.deliveries == n,
        )
        # Its input is being fetched: the worker dies with the job in flight, as an OOM kill would.
        deadline = time.monotonic() + 30
        while len(hits) < delivery:
            assert time.monotonic() < deadline, f"delivery {delivery} never fetched its input"
            time.sleep(0.05)
        worker.stop(signal.SIGKILL)
        worker = start_worker("--models", "tiny-vit", name=f"w{delivery}@%h", env=env)

    doc = _wait_for(own_client, job_id, lambda doc: doc.done)
    assert doc.status == "failed"
    assert doc.deliveries == MAX_DELIVERIES + 1
    assert doc.errors is not None and doc.errors[0] is not None
    assert doc.errors[0].type == "PoisonJob"
    assert doc.errors[0].message == (
        f"the job was delivered {MAX_DELIVERIES} times and its worker died each time"
    )
    # Not run a fourth time, acked, and its webhook published like any failed job's.
    broker = own_redis.client(0)
    deadline = time.monotonic() + 30
    while broker.hlen("unacked") or broker.llen("pipeq.tiny-vit.interactive"):
        assert time.monotonic() < deadline, "the poison job's message was never acked"
        time.sleep(0.1)
    assert len(hits) == MAX_DELIVERIES
    assert broker.llen("pipeq.webhooks") == 1
    assert own_client.get(job_id).status == "failed"
    worker.stop()
