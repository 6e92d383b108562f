"""Deadlines, admission control, leases, the result cache and backlog signals, on a real Redis
with real worker processes (issue 15)."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from pipeq.config.errors import Overloaded
from pipeq.config.settings import Settings
from pipeq.core.ledger import QueueLedger
from pipeq.producer.api import create_app
from pipeq.producer.client import Client
from tests.conftest import REDIS

MODEL = "tiny-sentiment"


ADMISSION_DB = 6


@pytest.fixture
def fresh(settings: Settings) -> Settings:
    """A database of its own for the broker and the records, emptied: the session worker (if
    another test started it) takes none of these jobs, its heartbeats do not count as capacity
    here, and its lost-job sweeper (which reads the records) never publishes these jobs again on
    its own broker, where it would claim them and take their inputs off that broker's ledger."""
    broker = f"{REDIS}/{ADMISSION_DB}"
    redis.Redis.from_url(broker).flushdb()
    return settings.model_copy(update={"broker_url": broker, "result_url": broker})


@pytest.fixture
def start_worker(start_worker: Any, fresh: Settings) -> Any:
    """conftest's `start_worker`, on this module's broker database."""

    def start(*args: str, name: str = "cpu@%h", env: dict[str, str] | None = None) -> Any:
        own = {
            "PIPEQ_BROKER_URL": fresh.broker_url or "",
            "PIPEQ_RESULT_URL": fresh.result_url or "",
            **(env or {}),
        }
        return start_worker(*args, name=name, env=own)

    return start


def _wait_done(client: Client, job_id: str, timeout_s: float = 120) -> Any:
    doc = client.wait(job_id, timeout_s=timeout_s)
    assert doc.done, doc
    return doc


def test_job_past_its_deadline_expires_without_running(fresh: Settings, start_worker: Any) -> None:
    client = Client(fresh)
    late = client.submit(MODEL, ["too late"], deadline_s=0.5)
    on_time = client.submit(MODEL, ["in time"], deadline_s=300)
    time.sleep(1.0)
    start_worker("--models", MODEL)
    doc = _wait_done(client, late)
    assert doc.status == "expired"
    assert doc.errors is not None and doc.errors[0] is not None
    assert doc.errors[0].type == "Expired"
    assert doc.outputs == [None]
    assert _wait_done(client, on_time).status == "succeeded"


def test_lane_default_deadline_applies(fresh: Settings, start_worker: Any) -> None:
    client = Client(fresh.model_copy(update={"bulk_deadline_s": 0.5}))
    job = client.submit(MODEL, ["bulk, late"], priority="bulk")
    time.sleep(1.0)
    start_worker("--models", MODEL)
    assert _wait_done(client, job).status == "expired"


def test_flood_over_backlog_gets_429_and_loses_nothing(fresh: Settings, start_worker: Any) -> None:
    client = Client(fresh.model_copy(update={"max_backlog": 10}))
    api = TestClient(create_app(client))
    accepted, refused = [], []
    for i in range(8):
        answer = api.post("/v1/jobs", json={"model": MODEL, "inputs": [f"text {i}"] * 3})
        (accepted if answer.status_code == 202 else refused).append(answer)
    assert len(accepted) == 3  # 3, 6, 9 queued; the 4th would make 12 > 10
    assert refused and all(r.status_code == 429 for r in refused)
    assert int(refused[0].headers["Retry-After"]) >= 1
    assert "PIPEQ_MAX_BACKLOG" in refused[0].json()["error"]["message"]
    with pytest.raises(Overloaded) as raised:
        client.submit(MODEL, ["x"] * 3)
    assert raised.value.retry_after_s >= 1
    start_worker("--models", MODEL)
    for answer in accepted:
        assert _wait_done(client, answer.json()["id"]).status == "succeeded"
    assert client.ledger is not None
    deadline = time.monotonic() + 15  # each claim takes its inputs off the backlog
    while client.ledger.backlog([(MODEL, "interactive")]) != {(MODEL, "interactive"): 0}:
        assert time.monotonic() < deadline, client.ledger.backlog([(MODEL, "interactive")])
        time.sleep(0.1)
    # Drained: the lane takes jobs again.
    assert api.post("/v1/jobs", json={"model": MODEL, "inputs": ["again"]}).status_code == 202


def test_projected_wait_over_deadline_gets_429(fresh: Settings) -> None:
    client = Client(fresh)
    assert client.ledger is not None
    client.ledger.beat("fake@host", [], {MODEL: 2.0})  # 2 inputs/s measured
    client.submit(MODEL, ["queued"] * 20)  # 10 s of work ahead
    api = TestClient(create_app(client))
    refused = api.post("/v1/jobs", json={"model": MODEL, "inputs": ["x"], "deadline_s": 3})
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) == 7
    ok = api.post("/v1/jobs", json={"model": MODEL, "inputs": ["x"], "deadline_s": 60})
    assert ok.status_code == 202


def test_backlog_metrics_equal_queue_lengths_without_workers(fresh: Settings) -> None:
    client = Client(fresh)
    for _ in range(3):
        client.submit(MODEL, ["a", "b"], priority="bulk")
    client.submit(MODEL, ["c"])
    text = TestClient(create_app(client)).get("/metrics").text
    assert f'pipeq_queue_depth{{lane="bulk",model="{MODEL}"}} 3.0' in text
    assert f'pipeq_backlog_without_capacity{{lane="bulk",model="{MODEL}"}} 3.0' in text
    assert f'pipeq_backlog_without_capacity{{lane="interactive",model="{MODEL}"}} 1.0' in text
    assert client.ledger is not None
    client.ledger.beat("w@host", [(MODEL, "bulk")], {})
    text = TestClient(create_app(client)).get("/metrics").text
    assert f'pipeq_backlog_without_capacity{{lane="bulk",model="{MODEL}"}} 0.0' in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _forwarded(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(f'pipeq_items_forwarded_total{{model="{MODEL}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_cache_serves_repeats_and_never_other_params(
    fresh: Settings, start_worker: Any, model_dir: Path, tmp_path: Path
) -> None:
    registry = yaml.safe_load((model_dir / "models.yaml").read_text())
    registry["models"][MODEL]["cache_ttl_s"] = 600
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(registry))
    port = _free_port()
    start_worker(
        "--models", MODEL, env={"PIPEQ_MODELS": str(path), "PIPEQ_METRICS_PORT": str(port)}
    )
    client = Client(fresh.model_copy(update={"models": path}))
    first = _wait_done(client, client.submit(MODEL, ["cache me"]))
    assert first.status == "succeeded" and not first.cached
    before = _forwarded(port)
    again = _wait_done(client, client.submit(MODEL, ["cache me"]))
    assert again.cached is True and again.outputs == first.outputs
    assert _forwarded(port) == before  # no forward pass
    other = _wait_done(client, client.submit(MODEL, ["cache me"], {"top_k": 2}))
    assert not other.cached
    assert _forwarded(port) == before + 1


# --- leases ----------------------------------------------------------------------------------

LEASE = {"PIPEQ_LEASE_S": "3", "PIPEQ_UNACKED_RESTORE_INTERVAL_S": "1", "PIPEQ_LOG_LEVEL": "INFO"}
SLOW = "tiny-zeroshot"
LABELS = [f"label{i}" for i in range(40)]


def _slow_job(client: Client, count: int) -> str:
    texts = [f"a fairly long sentence number {i} for the zero-shot model" for i in range(count)]
    return client.submit(SLOW, texts, {"candidate_labels": LABELS})


def _received(log: Path, job_id: str) -> int:
    return log.read_text().count(f"pipeq.run[{job_id}] received")


def _two_workers_one_slow_job(client: Client, start_worker: Any) -> tuple[str, Any, Any]:
    """Both workers up, then a job longer than several leases; returns (job, holder, other)."""
    workers = {
        name: start_worker("--models", SLOW, name=f"{name}@%h", env=LEASE) for name in ("a", "b")
    }
    job = _slow_job(client, 1000)
    while (doc := client.get(job)).status == "queued":
        time.sleep(0.05)
    holder = (doc.worker or "").split("@")[0]
    other = next(name for name in workers if name != holder)
    return job, workers[holder], workers[other]


def test_job_longer_than_the_lease_runs_exactly_once(fresh: Settings, start_worker: Any) -> None:
    client = Client(fresh)
    job, holder, other = _two_workers_one_slow_job(client, start_worker)
    doc = _wait_done(client, job, timeout_s=300)
    assert doc.status == "succeeded"
    assert doc.timings["run_s"] > 3 * 3, "the job must outlive the lease several times"
    assert _received(holder.log_path, job) + _received(other.log_path, job) == 1


def test_killed_workers_job_returns_within_the_lease(fresh: Settings, start_worker: Any) -> None:
    client = Client(fresh)
    job, holder, spare = _two_workers_one_slow_job(client, start_worker)
    holder.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    while _received(spare.log_path, job) == 0:
        assert time.monotonic() - killed_at < 30, "the job never came back"
        time.sleep(0.05)
    returned_s = time.monotonic() - killed_at
    print(f"redelivered {returned_s:.1f} s after SIGKILL (lease 3 s, sweep every 1 s)")
    assert returned_s < 3 + 1 + 2
    assert _wait_done(client, job, timeout_s=300).status == "succeeded"
    broker = redis.Redis.from_url(fresh.broker_url or "")
    # The ack follows the stored result by a moment.
    acked_by = time.monotonic() + 10
    while broker.hlen("unacked") and time.monotonic() < acked_by:
        time.sleep(0.05)
    assert broker.hlen("unacked") == 0


def test_ledger_backlog_clamps_at_zero(fresh: Settings) -> None:
    ledger = QueueLedger(redis.Redis.from_url(fresh.broker_url or ""), stale_s=30)
    ledger.take(MODEL, "bulk", 5)
    assert ledger.backlog([(MODEL, "bulk")]) == {(MODEL, "bulk"): 0}
