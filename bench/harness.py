"""Shared measuring code for bench/cpu.py and bench/gpu.py: start workers, drive load, summarize."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeq.producer.client import Client

READY_LINE = "pipeq worker ready"


@dataclass
class Record:
    name: str
    items_per_s: float
    batch: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    jobs: int | None = None
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    import celery
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "celery": celery.__version__,
    }


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(latencies_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def start_process(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    ready: str,
    ready_count: int = 1,
    timeout_s: float = 300,
) -> subprocess.Popen[bytes]:
    """Start `command`, logging to `log_path`, and wait until `ready` has appeared `ready_count` times."""
    log = log_path.open("w")
    proc = subprocess.Popen(
        command,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while log_path.read_text().count(ready) < ready_count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command} did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_pipeq_worker(
    env: dict[str, str], log_path: Path, *args: str, ready_count: int = 1
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pipeq.cli", "worker", *args]
    return start_process(command, env, log_path, READY_LINE, ready_count)


def start_naive_worker(
    env: dict[str, str], log_path: Path, pool: tuple[str, ...] = ("-P", "solo")
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", *pool]
    command += ["-l", "INFO", "-n", "naive@%h"]
    return start_process(command, env, log_path, "ready.")


def pipeq_closed_loop(
    client: Client, model: str, items: list[Any], per_job: int = 1
) -> tuple[float, list[float]]:
    """One job in flight at a time: the latency an idle service gives."""
    latencies = []
    started = time.perf_counter()
    for i in range(0, len(items), per_job):
        submitted = time.perf_counter()
        doc = client.wait(client.submit(model, items[i : i + per_job]), timeout_s=300)
        assert doc.status == "succeeded", doc
        latencies.append(time.perf_counter() - submitted)
    return len(items) / (time.perf_counter() - started), latencies


def pipeq_open_load(
    client: Client, model: str, items: list[Any], per_job: int, rate_per_s: float | None
) -> tuple[float, list[float]]:
    """Submit jobs at `rate_per_s` (None: as fast as possible); latency = submit to result stored."""
    ids = []
    started = time.time()
    for n, i in enumerate(range(0, len(items), per_job)):
        if rate_per_s:
            delay = started + n / rate_per_s - time.time()
            if delay > 0:
                time.sleep(delay)
        ids.append(client.submit(model, items[i : i + per_job]))
    docs = [client.wait(job_id, timeout_s=600) for job_id in ids]
    failed = [d for d in docs if d.status != "succeeded"]
    assert not failed, failed[0]
    finished = max(d.timings["finished_at"] for d in docs)
    latencies = [d.timings["finished_at"] - d.timings["submitted_at"] for d in docs]
    return len(items) / (finished - started), latencies


def naive_closed_loop(app: Any, items: list[Any]) -> tuple[float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for item in items:
        submitted = time.perf_counter()
        app.send_task("naive.run", args=[item]).get(timeout=300)
        latencies.append(time.perf_counter() - submitted)
    return len(items) / (time.perf_counter() - started), latencies


def naive_open_load(
    app: Any, items: list[Any], task: str = "naive.run"
) -> tuple[float, list[float]]:
    started = time.time()
    sent = [(time.time(), app.send_task(task, args=[item])) for item in items]
    results = [(at, r.get(timeout=600)) for at, r in sent]
    finished = max(r["finished_at"] for _, r in results)
    return len(items) / (finished - started), [r["finished_at"] - at for at, r in results]


def batch_histogram(metrics_url: str, model: str) -> dict[str, float]:
    """Cumulative `pipeq_batch_size` buckets of one model, scraped from a worker."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = re.compile(
        rf'pipeq_batch_size_bucket\{{le="([^"]+)",model="{re.escape(model)}"\}} (\S+)'
    )
    return {le: float(count) for le, count in pattern.findall(text)}


def write_results(path: Path, records: list[Record], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=2))


def markdown_table(records: list[Record]) -> str:
    rows = ["| measurement | items/s | batch | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for r in records:
        p50 = f"{r.p50_ms:.1f}" if r.p50_ms is not None else ""
        p99 = f"{r.p99_ms:.1f}" if r.p99_ms is not None else ""
        rows.append(f"| {r.name} | {r.items_per_s:,.1f} | {r.batch or ''} | {p50} | {p99} |")
    return "\n".join(rows)
