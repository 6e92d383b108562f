"""CPU benchmark, one run, side by side on the same Redis: how many single-text jobs per second a
worker drains, for a plain Celery no-op task (the floor of a Celery job), a naive Celery task
calling pipeline() per job, and pipeq; then the latency of one job at a time.

    python -m bench.cpu [--jobs 3000] [--redis redis://127.0.0.1:6379]

Model: the tiny text-classification model the tests build (cli/tiny_models.py), so the rows
measure the queue path, not a forward pass. Each drain: the jobs are queued first, then the
worker starts; its rate is the jobs over the span from the first job started (for Celery tasks,
the first finished) to the last finished. Writes bench/results/cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch
from celery import Celery

from bench.harness import (
    Record,
    batch_histogram,
    markdown_table,
    naive_closed_loop,
    percentiles,
    pipeq_closed_loop,
    start_naive_worker,
    start_pipeq_worker,
    stop_process,
    versions,
    write_results,
)
from pipeq.cli.tiny_models import build_tiny_models
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client

WORDS = (
    "the movie was great but service felt slow and the food cold yet staff were kind to us".split()
)
METRICS_PORT = 9391
MODEL = "tiny-sentiment"


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(count)]


def celery_drain(app: Celery, task: str, items: list[str], start: Any) -> tuple[float, Any]:
    """Queue a `task` per item, then start the worker (`start()`); jobs/s over the drain."""
    sent = [app.send_task(task, args=[item]) for item in items]
    worker = start()
    finished = [r.get(timeout=600)["finished_at"] for r in sent]
    return len(items) / (max(finished) - min(finished)), worker


def pipeq_drain(client: Client, items: list[str], start: Any) -> tuple[float, list[float], Any]:
    """Queue a job per item, then start the worker; jobs/s over the drain, and each job's run
    time (claimed to stored)."""
    requests = [JobRequest(model=MODEL, inputs=[item]) for item in items]
    ids = [doc.id for doc, _ in client.submit_many(requests)]
    worker = start()
    docs = [client.wait(job_id, timeout_s=600) for job_id in ids]
    assert all(doc.status == "succeeded" for doc in docs), docs[0]
    began = min(doc.timings["started_at"] for doc in docs)
    ended = max(doc.timings["finished_at"] for doc in docs)
    runs = [doc.timings["finished_at"] - doc.timings["started_at"] for doc in docs]
    return len(items) / (ended - began), runs, worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-"))
    model_dir = build_tiny_models(work / "models")[MODEL]
    (work / "models.yaml").write_text(
        f"models:\n  {MODEL}:\n    task: text-classification\n"
        f"    model: {model_dir}\n    device: cpu\n    max_batch_size: 64\n"
    )
    pipeq_db, naive_db = f"{args.redis}/9", f"{args.redis}/8"
    for url in (pipeq_db, naive_db):
        redis.Redis.from_url(url).flushdb()
    pipeq_env = {
        "PIPEQ_BROKER_URL": pipeq_db,
        "PIPEQ_MODELS": str(work / "models.yaml"),
        "PIPEQ_METRICS_PORT": str(METRICS_PORT),
        "PIPEQ_LOG_LEVEL": "WARNING",
        "PIPEQ_MAX_BACKLOG_ITEMS": str(10 * args.jobs),
    }
    naive_env = {
        "NAIVE_BROKER": naive_db,
        "NAIVE_TASK": "text-classification",
        "NAIVE_MODEL": str(model_dir),
        "NAIVE_DEVICE": "cpu",
    }
    low, heavy = texts(100, seed=1), texts(args.jobs, seed=2)
    records: list[Record] = []

    def record(name: str, rate: float, latencies: list[float] | None, jobs: int) -> None:
        p50, p99 = percentiles(latencies) if latencies else (None, None)
        records.append(Record(name, rate, p50_ms=p50, p99_ms=p99, jobs=jobs, device="cpu"))
        print(f"{name}: {rate:.1f} jobs/s p50 {p50} ms p99 {p99} ms", flush=True)

    app = Celery("naive", broker=naive_db, backend=naive_db)
    app.conf.update(task_serializer="json", accept_content=["json"])
    rate, noop = celery_drain(
        app,
        "naive.noop",
        heavy,
        lambda: start_naive_worker(
            {"NAIVE_BROKER": naive_db}, work / "noop.log", ("-P", "threads", "-c", "64")
        ),
    )
    stop_process(noop)
    record(f"plain Celery no-op task, threads -c 64, drain of {len(heavy)}", rate, None, len(heavy))

    rate, naive = celery_drain(
        app, "naive.run", heavy, lambda: start_naive_worker(naive_env, work / "naive.log")
    )
    try:
        record(f"naive Celery task, drain of {len(heavy)}", rate, None, len(heavy))
        naive_closed_loop(app, low[:10])  # warm
        rate, latencies = naive_closed_loop(app, low)
        record("naive Celery task, one job at a time", rate, latencies, len(low))
    finally:
        stop_process(naive)

    client = Client(Settings(broker_url=pipeq_db, models=work / "models.yaml"))
    rate, runs, worker = pipeq_drain(
        client,
        heavy,
        lambda: start_pipeq_worker(
            pipeq_env, work / "pipeq.log", "--gpus", "cpu", "--concurrency", "256"
        ),
    )
    try:
        record(f"pipeq, drain of {len(heavy)} (latency: claimed to stored)", rate, runs, len(heavy))
        time.sleep(1)
        pipeq_closed_loop(client, MODEL, low[:10])
        rate, latencies = pipeq_closed_loop(client, MODEL, low)
        record("pipeq, one job at a time", rate, latencies, len(low))
        histogram = batch_histogram(f"http://127.0.0.1:{METRICS_PORT}/metrics", MODEL)
    finally:
        stop_process(worker)

    meta = {
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "settings": {"pipeq": "--gpus cpu --concurrency 256, task events on", "model": MODEL},
        "batch_size_histogram_cumulative": histogram,
    }
    write_results(args.out, records, meta)
    print()
    print(markdown_table(records))
    print()
    print("pipeq batch sizes (cumulative, le -> count):", histogram)


if __name__ == "__main__":
    main()
