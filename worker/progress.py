"""A running job's progress: forward parts done of those prepared, published now and then.

Parts are counted as the prefetch pool hands them to the batcher (`track`) and as their forward
passes finish (a done-callback on the batcher's thread: one locked increment, no I/O there). The
job's own thread waits on its results through `wait`, which publishes the counts at most every
`interval_s`, so a job that finishes sooner writes nothing extra.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Any

from producer.jobs import JobProgress

# A record write per running job per interval: 2/s each is cheap for Redis and fresh enough
# for a progress bar.
PROGRESS_INTERVAL_S = 0.5


class ProgressTracker:
    def __init__(
        self, publish: Callable[[JobProgress], None], interval_s: float = PROGRESS_INTERVAL_S
    ) -> None:
        self._publish = publish
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0
        self._published: JobProgress | None = None
        self._next_publish_at = time.monotonic() + interval_s

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

    def wait(self, futures: list[Future[Any]]) -> list[Any]:
        """The futures' results (raising the first error), publishing progress meanwhile."""
        pending = set(futures)
        while pending:
            timeout_s = max(0.0, self._next_publish_at - time.monotonic())
            finished, pending = wait(pending, timeout=timeout_s, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in finished):
                break
            if pending and time.monotonic() >= self._next_publish_at:
                self.publish_if_changed()
        return [future.result() for future in futures]

    def publish_if_changed(self) -> None:
        self._next_publish_at = time.monotonic() + self._interval_s
        current = self.snapshot()
        if current != self._published:
            self._published = current
            self._publish(current)
