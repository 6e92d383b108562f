"""A running job's progress: forward parts done of those prepared, published now and then.

Parts are counted as they are handed to the batcher (`track`) and as their forward passes finish
(a done-callback on the thread that resolves them: one locked increment, no I/O there). The
engine's progress thread writes the counts of the jobs running longer than `PROGRESS_INTERVAL_S`
whose counts changed (`changed`), all in one round trip, so a job that finishes sooner writes
nothing extra.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from pipeq.core.jobs import JobDocument, JobProgress
from pipeq.core.records import JobRecords

# A record write per running job per interval: 2/s each is cheap for Redis and fresh enough
# for a progress bar.
PROGRESS_INTERVAL_S = 0.5


class ProgressTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0
        self._published: JobProgress | None = None

    def track(self, futures: list[Future[Any]]) -> None:
        with self._lock:
            self._total += len(futures)
        for future in futures:
            future.add_done_callback(self._count_done)

    def _count_done(self, _: Future[Any]) -> None:
        with self._lock:
            self._done += 1

    def snapshot(self) -> JobProgress:
        with self._lock:
            return JobProgress(done=self._done, total=self._total)

    def changed(self) -> JobProgress | None:
        """The counts, if they changed since the last call (which are then taken as written)."""
        current = self.snapshot()
        if current == self._published:
            return None
        self._published = current
        return current


class ProgressPublisher:
    """The job path's progress hook: writes the counts of running jobs that changed."""

    def __init__(self, records: JobRecords) -> None:
        self._records = records

    def publish(self, jobs: list[tuple[JobDocument, ProgressTracker]]) -> None:
        """Write the progress of those (claimed record, tracker) whose counts changed, in one
        round trip. Guarded by the delivery count: a worker whose job was claimed again by
        another writes no more."""
        changes: list[tuple[JobDocument, tuple[str, ...], int | None]] = []
        for claimed, tracker in jobs:
            progress = tracker.changed()
            if progress is not None:
                doc = claimed.model_copy(update={"progress": progress})
                changes.append((doc, ("running",), claimed.deliveries))
        if changes:
            self._records.transition_many(changes)
