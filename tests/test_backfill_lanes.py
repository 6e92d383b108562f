"""A backfill runs on the bulk lane: interactive jobs submitted while thousands of its inputs are
queued are served within about a batch of their normal latency, not behind the backlog."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import redis

from pipeq.config.queues import queue_name
from pipeq.config.settings import Settings
from pipeq.producer.backfill import backfill
from pipeq.producer.backfill_report import Summary
from pipeq.producer.client import Client
from tests.test_backfill import MODEL, assert_exactly_once, write_jsonl

LANES_BROKER_DB = 4  # its own broker database and worker: the backlog is this test's alone
INPUTS, CHUNK = 10_000, 50  # 200 bulk jobs: a backlog of seconds, FIFO would show it
SAMPLES = 10


def latency_s(client: Client, text: str) -> float:
    """Submit one interactive job and return submit -> finished, on the record's own clock."""
    doc = client.wait(client.submit(MODEL, [text]), timeout_s=120)
    assert doc.status == "succeeded", doc
    return doc.timings["finished_at"] - doc.timings["submitted_at"]


def test_interactive_jobs_are_served_during_a_backfill(
    start_worker: Any, worker_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{LANES_BROKER_DB}"
    broker_redis = redis.Redis.from_url(broker)
    broker_redis.flushdb()
    # Job records in the same database: nothing another test run flushes.
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker}
    start_worker("--models", MODEL, "--concurrency", "4", name="lanes@%h", env=env)
    own = settings.model_copy(update={"broker_url": broker, "result_url": broker})
    interactive, bulk = Client(own), Client(own)
    bulk_queue = queue_name(MODEL, "bulk")

    latency_s(interactive, "warm up the worker")
    baseline = [latency_s(interactive, f"a quiet moment, number {i}") for i in range(SAMPLES)]

    ids = write_jsonl(tmp_path / "manifest.jsonl", INPUTS)
    out = tmp_path / "out"
    result: list[Summary] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(
                backfill(
                    bulk,
                    str(tmp_path / "manifest.jsonl"),
                    MODEL,
                    out=str(out),
                    chunk=CHUNK,
                    max_in_flight=INPUTS,
                    show_progress=False,
                )
            )
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while broker_redis.llen(bulk_queue) < 10:
        assert thread.is_alive() and time.monotonic() < deadline, failure
        time.sleep(0.01)

    during, backlog = [], []
    while len(during) < SAMPLES and thread.is_alive():
        queued = broker_redis.llen(bulk_queue)  # bulk jobs of CHUNK inputs each, not yet taken
        if not queued:
            break
        backlog.append(queued)
        during.append(latency_s(interactive, f"a busy moment, number {len(during)}"))
    thread.join(300)
    assert not failure, failure
    [summary] = result
    drained_s = time.monotonic() - started

    base_p50, busy_p50 = statistics.median(baseline), statistics.median(during)
    print(
        f"\ninteractive p50: baseline {base_p50 * 1000:.0f} ms, during backfill "
        f"{busy_p50 * 1000:.0f} ms (max {max(during) * 1000:.0f} ms) over {len(during)} jobs "
        f"submitted with {min(backlog)}-{max(backlog)} bulk jobs queued; backfill of {INPUTS} "
        f"inputs took {drained_s:.1f} s"
    )
    # The backlog was really there: every interactive job was submitted behind queued bulk jobs.
    assert len(during) >= 5, (during, backlog)
    # Served within about a batch of normal latency, not after the backlog (generous: timed).
    assert busy_p50 <= max(base_p50 + 1.0, 10 * base_p50), (baseline, during)
    assert summary.complete and summary.succeeded == INPUTS
    assert_exactly_once(out, ids)
