"""Handing prepared parts to a model's batcher: the window that sends them in blocks, the bound
on a long input's parts in flight, and the permit each prepared input holds until its parts are
answered (taken and released here only)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

from pipeq.worker.batcher import WorkItem
from pipeq.worker.forward_client import BLOCK_ROWS
from pipeq.worker.job_run import ServedModel
from pipeq.worker.pipelines import CallParams, StagedPipeline
from pipeq.worker.progress import ProgressTracker

Submit = Callable[[list[WorkItem]], None]
T = TypeVar("T")


class SendWindow:
    """Parts held over a window of jobs, to go to each model's batcher in one submission."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = models
        self._held: dict[str, list[WorkItem]] = {}

    def hold(self, model: str, items: list[WorkItem]) -> None:
        self._held.setdefault(model, []).extend(items)

    def send_blocks(self, model: str) -> None:
        """Send the model's held parts once they fill a block: the forward process starts on a
        window's first images while the rest are read."""
        items = self._held.get(model)
        if items and len(items) >= BLOCK_ROWS:
            self._models[model].batcher.submit(items)
            self._held[model] = []

    def send_held(self) -> None:
        for model, items in self._held.items():
            if items:
                self._models[model].batcher.submit(items)
        self._held.clear()

    def take_permit(self, served: ServedModel, wait: bool) -> bool:
        """A permit for one prepared input of `served`: at once, or (`wait`) after the held
        parts are sent, since they must not wait behind the permits they would free."""
        if served.permits.acquire(blocking=False):
            return True
        if not wait:
            return False
        self.send_held()
        return served.permits.acquire()


def under_permit(permits: threading.Semaphore, prepare: Callable[[list[WorkItem]], T]) -> T:
    """`prepare(fed)` for an input that holds one of `permits`: released once the parts it fed
    are answered (at once when it fed none, or failed before feeding any)."""
    fed: list[WorkItem] = []
    try:
        return prepare(fed)
    finally:
        _release_when_done(fed, permits)


def work_item(
    staged: StagedPipeline, call: CallParams, rank: int, expires_at: float | None, part: Any
) -> WorkItem:
    return WorkItem(
        part=part,
        group=staged.group_key(part, call),
        call=call,
        length=staged.part_length(part),
        lane_rank=rank,
        expires_at=expires_at,
    )


def feed(
    served: ServedModel,
    parts: Iterator[Any],
    make: Callable[[Any], WorkItem],
    progress: ProgressTracker,
    fed: list[WorkItem],
    submit: Submit,
) -> float:
    """Hand `parts` to `submit` as they are made, appending them to `fed`; returns the
    seconds spent waiting for forward passes. At most two batches of one input's parts wait for
    a forward pass at a time, so a long input's chunks are never all held at once (a 16 s clip
    cut into 0.05 s chunks once made ~480 of them, 2.5 GB, before the first forward). The wait
    holds a prefetch thread, as making the chunks did before."""
    limit = served.batcher.max_batch_size
    # Only a chunked input makes more than one part to hold back.
    window = threading.Semaphore(2 * limit) if served.staged.chunked else None
    ready: list[WorkItem] = []

    def flush() -> None:
        if ready:
            progress.track([work.future for work in ready])
            submit(list(ready))
            fed.extend(ready)
            ready.clear()

    waited_s = 0.0
    for part in parts:
        work = make(part)
        if window is not None:
            if not window.acquire(blocking=False):
                flush()  # the parts held here must reach the batcher before this waits on them
                began = time.perf_counter()
                window.acquire()
                waited_s += time.perf_counter() - began
            work.future.add_done_callback(partial(_release, window))
        ready.append(work)
        if len(ready) >= limit:
            flush()
    flush()
    return waited_s


def complete(future: Future[T], call: Callable[[], T]) -> None:
    """Resolve `future` with `call()` run now (its exception kept, as the pool's would be)."""
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001 - re-raised by future.result() when collected
        future.set_exception(exc)


def _release_when_done(items: list[WorkItem], permits: threading.Semaphore) -> None:
    if not items:
        permits.release()
        return
    remaining = [len(items)]
    lock = threading.Lock()

    def done(_: Future[Any]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            permits.release()

    for item in items:
        item.future.add_done_callback(done)


def _release(window: threading.Semaphore, _: Future[Any]) -> None:
    window.release()
