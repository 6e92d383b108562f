"""Worker metrics for Prometheus, one endpoint per worker process (`PIPEQ_METRICS_PORT`, the GPU
index added for pinned workers). Names are documented in docs/monitoring.md."""

from __future__ import annotations

import torch
from prometheus_client import Counter, Gauge, Histogram

from pipeq.config.errors import ErrorInfo

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

JOBS = Counter("pipeq_jobs", "Jobs finished, by model and status", ["model", "status"])
INPUTS = Counter(
    "pipeq_inputs", "Inputs finished, by model and outcome (ok or error type)", ["model", "outcome"]
)
BATCH_SIZE = Histogram("pipeq_batch_size", "Items per forward pass", ["model"], buckets=BATCH_SIZES)
ITEMS_FORWARDED = Counter("pipeq_items_forwarded", "Items through forward passes", ["model"])
STAGE_SECONDS = Histogram(
    "pipeq_stage_seconds",
    "Time in each stage: fetch, preprocess, forward, postprocess, store",
    ["model", "stage"],
    buckets=SECONDS,
)
QUEUE_WAIT = Histogram(
    "pipeq_queue_wait_seconds",
    "From submission to the worker taking the job",
    ["model", "lane"],
    buckets=SECONDS,
)
BATCH_WAIT = Histogram(
    "pipeq_batch_wait_seconds",
    "From an item being prepared to its forward pass",
    ["model"],
    buckets=SECONDS,
)
EXPIRED = Counter(
    "pipeq_inputs_expired",
    "Inputs dropped unstarted past their job's deadline, by model and where: queue (the whole job, "
    "when the worker took it), prefetch (before fetching), batcher (before a forward)",
    ["model", "where"],
)
CACHE = Counter(
    "pipeq_cache", "Result cache lookups by model and outcome (hit, miss)", ["model", "outcome"]
)
OOM_SPLITS = Counter("pipeq_oom_splits", "Batches split after running out of GPU memory", ["model"])
LOAD_SECONDS = Gauge("pipeq_pipeline_load_seconds", "Time to load and warm a model", ["model"])
GPU_MEMORY = Gauge(
    "pipeq_gpu_memory_bytes", "GPU memory allocated by this worker (current, peak)", ["kind"]
)


class BatchMetrics:
    """The batcher's hooks for one model (see pipeq.worker.batcher.BatchHooks)."""

    def __init__(self, model: str) -> None:
        self._size = BATCH_SIZE.labels(model)
        self._items = ITEMS_FORWARDED.labels(model)
        self._forward = STAGE_SECONDS.labels(model, "forward")
        self._wait = BATCH_WAIT.labels(model)
        self._oom = OOM_SPLITS.labels(model)
        self._expired = EXPIRED.labels(model, "batcher")
        self.items_per_s: float | None = None

    def on_batch(self, size: int, forward_s: float, waited_s: list[float]) -> None:
        self._size.observe(size)
        self._items.inc(size)
        self._forward.observe(forward_s)
        if forward_s > 0:
            # Capacity, not throughput: items per second of forward time, so an idle worker
            # still reports what it could take (admission control divides the backlog by it).
            rate = size / forward_s
            old = self.items_per_s
            self.items_per_s = rate if old is None else 0.8 * old + 0.2 * rate
        for waited in waited_s:
            self._wait.observe(waited)
        if torch.cuda.is_available():
            GPU_MEMORY.labels("current").set(torch.cuda.memory_allocated())
            GPU_MEMORY.labels("peak").set(torch.cuda.max_memory_allocated())

    def on_oom(self, size: int) -> None:
        self._oom.inc()

    def on_expired(self, count: int) -> None:
        self._expired.inc(count)


class JobMetrics:
    """The job path's hooks: queue wait, stage times, expiries, cache lookups, finished jobs."""

    def on_claimed(self, model: str, lane: str, waited_s: float) -> None:
        QUEUE_WAIT.labels(model, lane).observe(max(0.0, waited_s))

    def on_stage(self, model: str, stage: str, seconds: float) -> None:
        STAGE_SECONDS.labels(model, stage).observe(seconds)

    def on_expired(self, model: str, where: str, count: int = 1) -> None:
        EXPIRED.labels(model, where).inc(count)

    def on_cache(self, model: str, hit: bool) -> None:
        CACHE.labels(model, "hit" if hit else "miss").inc()

    def on_stored(self, model: str, status: str, errors: list[ErrorInfo | None]) -> None:
        JOBS.labels(model, status).inc()
        for error in errors:
            INPUTS.labels(model, "ok" if error is None else error.type).inc()
