"""The batcher: groups prepared items from many jobs into one forward pass per batch.

Items arrive already fetched, decoded and preprocessed (by the job threads and the prefetch pool),
so the threads that own the model do nothing but batches back to back, in two stages: one thread
takes a batch and stages it (`stage`: collating it, and for the GPU image pipeline decoding its
JPEGs and resizing them on the GPU), the other runs the model on the batch staged before
(`forward`), so batch k+1 is staged while batch k runs. A batch is taken when its group holds
`max_batch_size` rows, or when its oldest item has waited `max_wait_ms`, no staged batch waits
for the forward thread and the GPU has room (`has_room`). An item is one input's part, or in the
forward process a front's block of many rows (worker/forward_server.py); a block that fails alone
fails with `SplitBlock` for its sender to split.

Which items form a batch: the anchor is the oldest interactive item (else the oldest bulk one);
the batch is the anchor's group (same call params, same input keys) filled with interactive items
first, then those closest to the anchor in length, so texts of similar length share padding.
The oldest item is always in the next batch of its group, so nothing starves.

Deadlines: an item whose `expires_at` (wall clock) has passed when its batch is taken is dropped
before the forward and its future fails with `Expired`.

Failures: an out-of-memory batch is split in halves and retried, and the model's batch limit is
lowered for `oom_cooldown_s`; any other exception is bisected down to the one item that raises,
which fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipeq.config.errors import Expired, ModelError

log = logging.getLogger(__name__)

LANE_RANK = {"interactive": 0, "bulk": 1}
# How often a batch short of full asks whether the GPU has room for it.
ROOM_POLL_S = 0.001


@dataclass(eq=False)
class WorkItem:
    """One forward unit: a preprocessed input (or one chunk of it)."""

    part: Any
    group: Hashable
    call: Any
    length: int = 0
    rows: int = 1  # a block of a front's parts (worker/forward_server.py) is one item of many rows
    lane_rank: int = 0
    expires_at: float | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)


class BatchHooks(Protocol):
    """Called around every forward pass (metrics hang here, not in the batcher)."""

    def on_batch(self, size: int, forward_s: float, waited_s: list[float]) -> None: ...

    def on_oom(self, size: int) -> None: ...

    def on_expired(self, count: int) -> None: ...


ForwardFn = Callable[[Any, Any], list[Any]]
StageFn = Callable[[list[Any], Any], Any]


class PartSink(Protocol):
    """Where a job's prepared parts go: a `Batcher` where the model is held, a
    `ForwardClient` in a front (worker/forward_client.py)."""

    max_batch_size: int

    def submit(self, items: list[WorkItem]) -> None: ...

    def stop(self) -> None: ...


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class SplitBlock(Exception):
    """A block of several rows that must run as smaller blocks: it failed alone (its sender
    splits it until the row that fails is alone) or is over the batch limit now."""


def take_batch(pending: list[WorkItem], limit: int) -> list[WorkItem]:
    """Remove and return the next batch of at most `limit` rows from `pending` (see the module
    docstring); the anchor goes even if it alone is over the limit."""
    anchor = min(pending, key=lambda item: (item.lane_rank, item.enqueued_at))
    group = [item for item in pending if item.group == anchor.group and item is not anchor]
    group.sort(
        key=lambda item: (item.lane_rank, abs(item.length - anchor.length), item.enqueued_at)
    )
    batch, rows = [anchor], anchor.rows
    for item in group:
        if rows + item.rows <= limit:
            batch.append(item)
            rows += item.rows
    chosen = set(map(id, batch))
    pending[:] = [item for item in pending if id(item) not in chosen]
    return batch


def _as_is(parts: list[Any], call: Any) -> Any:
    return parts


class Batcher:
    """Owns one model's batches: `stage(parts, call)` of each batch on one thread, then
    `forward(staged, call)` (one output per part) on another."""

    def __init__(
        self,
        name: str,
        forward: ForwardFn,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        stage: StageFn = _as_is,
        has_room: Callable[[], bool] = lambda: True,
        hooks: BatchHooks | None = None,
        oom_cooldown_s: float = 60.0,
    ) -> None:
        self.name = name
        self._forward = forward
        self._stage = stage
        self._has_room = has_room
        self.max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._hooks = hooks
        self._oom_cooldown_s = oom_cooldown_s
        self._limit = max_batch_size
        self._limit_restores_at = 0.0
        self._pending: list[WorkItem] = []
        self._cond = threading.Condition()
        self._stopping = False
        # One staged batch waits for the forward thread at most: staging runs one batch ahead.
        self._staged: queue.Queue[tuple[list[WorkItem], float, Any] | None] = queue.Queue(1)
        self._threads = [
            threading.Thread(target=self._stage_loop, name=f"stage-{name}", daemon=True),
            threading.Thread(target=self._forward_loop, name=f"forward-{name}", daemon=True),
        ]

    def start(self) -> Batcher:
        for thread in self._threads:
            thread.start()
        return self

    def submit(self, items: list[WorkItem]) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"batcher {self.name} is stopped")
            self._pending.extend(items)
            self._cond.notify()

    def stop(self) -> None:
        """Finish what is pending, then end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    @property
    def limit(self) -> int:
        """The batch size allowed now (lowered for a while after an out-of-memory error)."""
        if self._limit < self.max_batch_size and time.monotonic() >= self._limit_restores_at:
            self._limit = self.max_batch_size
        return self._limit

    def _next_batch(self) -> list[WorkItem] | None:
        with self._cond:
            while True:
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                oldest = min(item.enqueued_at for item in self._pending)
                ready_at = oldest + self._max_wait_s
                now = time.monotonic()
                if self._stopping or self._group_full():
                    return take_batch(self._pending, self.limit)
                # A batch short of full waits `max_wait_ms`, and then while the forward thread
                # still has a staged batch to run or the GPU more than one to finish: taken
                # sooner, it would only wait, and the GPU would run small batches back to back
                # (under a steady load below the peak, the queue grew on batches of a few rows).
                if now < ready_at:
                    self._cond.wait(ready_at - now)
                elif not self._staged.empty():
                    self._cond.wait()  # the forward thread notifies when it takes it
                elif self._has_room():
                    return take_batch(self._pending, self.limit)
                else:
                    self._cond.wait(ROOM_POLL_S)

    def _group_full(self) -> bool:
        anchor = min(self._pending, key=lambda item: (item.lane_rank, item.enqueued_at))
        limit = self.limit
        return sum(item.rows for item in self._pending if item.group == anchor.group) >= limit

    def _stage_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = self._drop_expired(batch)
            if len(batch) == 1 and batch[0].rows > self.limit:
                batch[0].future.set_exception(SplitBlock(f"over the batch limit {self.limit}"))
                continue
            if not batch:
                continue
            started = time.monotonic()
            try:
                staged = self._stage([item.part for item in batch], batch[0].call)
            except Exception as exc:  # noqa: BLE001 - every failure is routed to the items
                self._on_failure(batch, exc)
                continue
            self._staged.put((batch, started, staged))
        self._staged.put(None)

    def _forward_loop(self) -> None:
        while (next_batch := self._staged.get()) is not None:
            with self._cond:
                self._cond.notify()  # the stage thread may take a batch short of full now
            self._run_staged(*next_batch)

    def _drop_expired(self, batch: list[WorkItem]) -> list[WorkItem]:
        now = time.time()
        live = [item for item in batch if item.expires_at is None or item.expires_at > now]
        if len(live) < len(batch):
            if self._hooks:
                self._hooks.on_expired(len(batch) - len(live))
            for item in batch:
                if item.expires_at is not None and item.expires_at <= now:
                    item.future.set_exception(Expired("deadline passed before its forward pass"))
        return live

    def run_batch(self, batch: list[WorkItem]) -> None:
        """Stage and forward `batch` on this thread, resolving every item's future with its
        output or its error."""
        started = time.monotonic()
        try:
            staged = self._stage([item.part for item in batch], batch[0].call)
        except Exception as exc:  # noqa: BLE001 - every failure is routed to the items
            self._on_failure(batch, exc)
            return
        self._run_staged(batch, started, staged)

    def _run_staged(self, batch: list[WorkItem], started: float, staged: Any) -> None:
        try:
            outputs = self._forward(staged, batch[0].call)
        except Exception as exc:  # noqa: BLE001 - every failure is routed to the items below
            self._on_failure(batch, exc)
            return
        if self._hooks:
            self._hooks.on_batch(
                sum(item.rows for item in batch),
                time.monotonic() - started,
                [started - item.enqueued_at for item in batch],
            )
        for item, output in zip(batch, outputs, strict=True):
            item.future.set_result(output)

    def _on_failure(self, batch: list[WorkItem], exc: Exception) -> None:
        rows = sum(item.rows for item in batch)
        if is_out_of_memory(exc):
            if self._hooks:
                self._hooks.on_oom(rows)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rows > 1:
                self._limit = max(1, min(self._limit, rows // 2))
                self._limit_restores_at = time.monotonic() + self._oom_cooldown_s
                log.warning(
                    "%s: out of memory at batch %d; limit now %d", self.name, rows, self._limit
                )
        if len(batch) > 1:
            half = len(batch) // 2
            self.run_batch(batch[:half])
            self.run_batch(batch[half:])
        elif rows > 1:
            batch[0].future.set_exception(SplitBlock(type(exc).__name__))
        elif is_out_of_memory(exc):
            # A single input that does not fit even alone: its job fails it, others go on.
            log.warning("%s: out of memory on a single input: %r", self.name, exc)
            batch[0].future.set_exception(ModelError("out of memory on a single input"))
        else:
            # The library's text stays in the log; the caller gets the exception's class only.
            log.warning("%s: input failed in forward: %r", self.name, exc)
            failed = ModelError(f"the model could not run this input ({type(exc).__name__})")
            batch[0].future.set_exception(failed)
