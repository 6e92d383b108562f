"""Publishing rate from one producer process, side by side, on the real Redis; no worker runs.

    python -m bench.publish [--redis redis://127.0.0.1:6379/7] [--inputs 200000] [--tasks 20000]

1. Celery `apply_async`, one tiny task per input (one LPUSH each).
2. Celery `group()` of the same tiny tasks.
3. `Client.submit_many`, one input per job (records and publish pipelined).
4. The backfill path: a JSONL manifest read and validated, chunked into bulk jobs of `--chunk`
   inputs with hashed ids, published with `Client.submit_many` in groups, as `pipeq backfill`
   does (without waiting for results, since no worker runs).

Each is run `--repeats` times; the table shows the median. The database is purged before each
run and after the last. Writes bench/results/publish.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import celery
import kombu
import redis
from celery import group

from bench.harness import Record, write_results
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobRequest
from pipeq.producer.backfill import GROUP_INPUTS
from pipeq.producer.chunks import cut_chunks, job_request
from pipeq.producer.client import Client
from pipeq.producer.manifest import BadLine, read_manifest

MODEL = "sentiment"  # any name in the default registry: nothing is loaded, nothing consumes
WORDS = "the movie was great but service felt slow and the food cold yet staff were kind".split()


def text(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5 + i % 20))


def write_manifest(path: Path, count: int) -> None:
    with path.open("w") as manifest:
        for i in range(count):
            manifest.write(json.dumps({"id": f"doc-{i}", "input": text(i)}) + "\n")


def noop(text: str) -> None:
    """The tiny task of cases 1 and 2 (never run: no worker)."""


def celery_one_by_one(client: Client, count: int) -> int:
    noop = client.celery.tasks["bench.noop"]
    for i in range(count):
        noop.apply_async(args=[text(i)], queue="bench.noop")
    return count


def celery_group(client: Client, count: int) -> int:
    noop = client.celery.tasks["bench.noop"]
    group(noop.s(text(i)).set(queue="bench.noop") for i in range(count)).apply_async()
    return count


def submit_many_per_input(client: Client, count: int) -> int:
    for start in range(0, count, 1_000):
        requests = [
            JobRequest(model=MODEL, inputs=[text(i)], priority="bulk")
            for i in range(start, min(start + 1_000, count))
        ]
        client.submit_many(requests)
    return count


def backfill_publish(client: Client, manifest: Path, chunk: int) -> int:
    """The publishing half of `pipeq.producer.backfill`: read, chunk, hash, submit_many in groups."""
    published, pending = 0, []
    for items in cut_chunks(read_manifest(str(manifest)), chunk):
        assert not isinstance(items, BadLine), items
        pending.append(job_request(MODEL, {}, items))
        if len(pending) * chunk >= GROUP_INPUTS:
            client.submit_many(pending)
            published, pending = published + len(pending) * chunk, []
    client.submit_many(pending)
    return published + sum(len(request.inputs) for request in pending)


def measure(purge: Callable[[], None], run: Callable[[], int], repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        purge()
        started = time.perf_counter()
        inputs = run()
        rates.append(inputs / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--inputs", type=int, default=200_000, help="backfill inputs per run")
    parser.add_argument("--tasks", type=int, default=20_000, help="messages per run, 1-3")
    parser.add_argument("--chunk", type=int, nargs="+", default=[1_000, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    client = Client(Settings(broker_url=args.redis, result_url=args.redis))
    client.celery.task(name="bench.noop")(noop)
    database = redis.Redis.from_url(args.redis)
    purge = database.flushdb
    cases: list[tuple[str, int, int, Callable[[], int]]] = [
        (
            "Celery apply_async, 1 input per task",
            args.tasks,
            1,
            lambda: celery_one_by_one(client, args.tasks),
        ),
        (
            "Celery group(), 1 input per task",
            args.tasks,
            1,
            lambda: celery_group(client, args.tasks),
        ),
        (
            "Client.submit_many, 1 input per job",
            args.tasks,
            1,
            lambda: submit_many_per_input(client, args.tasks),
        ),
    ]
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "manifest.jsonl"
        write_manifest(manifest, args.inputs)
        for chunk in args.chunk:
            cases.append(
                (
                    f"backfill path: JSONL -> {chunk:,} inputs per job -> submit_many",
                    args.inputs,
                    chunk,
                    lambda chunk=chunk: backfill_publish(client, manifest, chunk),
                )
            )
        records = []
        try:
            for name, inputs, per_message, run in cases:
                rates = measure(purge, run, args.repeats)
                median = statistics.median(rates)
                records.append(
                    Record(
                        name=name,
                        items_per_s=round(median, 1),
                        jobs=inputs // per_message,
                        extra={
                            "inputs": inputs,
                            "inputs_per_message": per_message,
                            "messages_per_s": round(median / per_message, 1),
                            "runs_inputs_per_s": [round(r, 1) for r in rates],
                        },
                    )
                )
                print(f"{name}: {median:,.0f} inputs/s", flush=True)
        finally:
            purge()
    meta = {
        "redis": args.redis,
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_server": database.info()["redis_version"],
        "machine": platform.machine(),
        "repeats": args.repeats,
    }
    write_results(Path(__file__).parent / "results" / "publish.json", records, meta)
    print(markdown(records))


def markdown(records: list[Record]) -> str:
    rows = [
        "| publishing | inputs | inputs/message | inputs/s | messages/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in records:
        rows.append(
            f"| {r.name} | {r.extra['inputs']:,} | {r.extra['inputs_per_message']:,} | "
            f"{r.items_per_s:,.0f} | {r.extra['messages_per_s']:,.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
