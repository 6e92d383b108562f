"""A claimed job on its way through the runner, and the model it runs on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pipeq.config.errors import PipeqError
from pipeq.core.jobs import JobDocument, JobMessage
from pipeq.worker.batcher import PartSink
from pipeq.worker.metrics import BatchMetrics
from pipeq.worker.pipelines import StagedPipeline
from pipeq.worker.progress import ProgressTracker
from pipeq.worker.result_cache import MISS


@dataclass
class ServedModel:
    """A loaded model, its batcher, and the bound on its prepared-but-not-forwarded inputs."""

    staged: StagedPipeline
    batcher: PartSink
    permits: threading.Semaphore
    hooks: BatchMetrics | None = None


@dataclass
class Prepared:
    """One input handed to the batcher (its parts' futures), or served from the cache."""

    futures: list[Future[Any]]
    cache_key: str | None = None
    cached: Any = MISS


class JobRun:
    """One claimed job on its way: each input's preparation, and a callback once every input is
    answered. Callbacks arrive on the threads that resolve the futures (the forward client's
    reader, the prefetch pool): each is a locked decrement, and the last hands the run on."""

    def __init__(
        self,
        job: JobMessage,
        claimed: JobDocument,
        started: float,
        delivery: Any,
        progress: ProgressTracker,
    ) -> None:
        self.job = job
        self.claimed = claimed
        self.started = started
        self.delivery = delivery
        self.progress = progress
        self.prepared: list[Future[Prepared]] = []
        self.failed: PipeqError | None = None
        self._pending = 1  # held until `seal`, so the run cannot be ready while it is started
        self._lock = threading.Lock()
        self._on_ready: Callable[[JobRun], None] | None = None

    def watch(self, prepared: Future[Prepared]) -> None:
        with self._lock:
            self._pending += 1
        prepared.add_done_callback(self._prepared)

    def seal(self, on_ready: Callable[[JobRun], None]) -> None:
        """Every input is watched: call `on_ready(self)` once all are answered."""
        self._on_ready = on_ready
        self._settle()

    def _prepared(self, future: Future[Prepared]) -> None:
        parts = [] if future.exception() is not None else future.result().futures
        if not parts:
            self._settle()
            return
        left = [len(parts)]

        def part_done(_: Future[Any]) -> None:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._settle()

        for part in parts:
            part.add_done_callback(part_done)

    def _settle(self) -> None:
        with self._lock:
            self._pending -= 1
            ready = self._pending == 0
        if ready and self._on_ready is not None:
            self._on_ready(self)
