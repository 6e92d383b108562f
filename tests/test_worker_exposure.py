"""What a worker shows beyond its results: its metrics port binds loopback (the next free one when
the configured port is taken), and its INFO log names jobs by id and status, never their inputs,
outputs or webhook URLs (which carry tokens)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from pipeq.config.settings import Settings
from pipeq.producer.client import Client

EXPOSURE_DB = 7
TOKEN = "SECRET123"
CANARY = "CANARY-TEXT"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on `port` (state 0A in /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_worker_metrics_bind_loopback_and_its_log_names_jobs_only(
    start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    # A broker database of its own: the session worker must not take the job (its log is read).
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{EXPOSURE_DB}"
    redis.Redis.from_url(broker).flushdb()
    client = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    # Another process holds the configured port (a second worker on this host did once die of
    # EADDRINUSE): the worker takes the next free one and says which.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = int(taken.getsockname()[1])
    worker = start_worker(
        "--models",
        "tiny-sentiment",
        name="exposure@%h",
        env={
            "PIPEQ_LOG_LEVEL": "INFO",
            "PIPEQ_METRICS_PORT": str(busy),
            "PIPEQ_BROKER_URL": broker,
            "PIPEQ_RESULT_URL": broker,
        },
    )
    announced = re.search(
        rf"worker metrics on http://127\.0\.0\.1:(\d+)/metrics \(port {busy} was taken\)",
        worker.log_path.read_text(),
    )
    assert announced is not None, worker.log_path.read_text()[-4000:]
    port = int(announced.group(1))
    assert port > busy
    assert "pipeq_jobs" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    # 0100007F is 127.0.0.1 as /proc writes it; 0.0.0.0 would be 00000000.
    assert _listening_addresses(port) == {"0100007F"}

    webhook = {"url": f"https://hooks.example.com/pipeq?token={TOKEN}", "events": ["succeeded"]}
    job_id = client.submit("tiny-sentiment", [f"{CANARY} what a wonderful film"], webhook=webhook)
    doc = client.wait(job_id, 60)
    assert doc.status == "succeeded", doc
    output = doc.outputs[0][0] if isinstance(doc.outputs[0], list) else doc.outputs[0]
    deadline = time.monotonic() + 10
    while f"job {job_id} succeeded" not in worker.log_path.read_text():
        assert time.monotonic() < deadline, worker.log_path.read_text()[-4000:]
        time.sleep(0.1)
    log = worker.log_path.read_text()
    assert job_id in log
    for secret in (TOKEN, CANARY, "hooks.example.com/pipeq", repr(output["score"])):
        assert secret not in log, f"{secret!r} is in the worker's log:\n{log[-4000:]}"
    taken.close()
