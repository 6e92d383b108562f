"""Group commit for calls made from many threads at once: one round trip serves them all.

A worker holds a thread per job in flight, and each job reads, claims and stores its record and
takes its inputs off the backlog: with a round trip per call, ~5 per job, each a socket write, a
read and a wait for the GIL in a busy process. With a `Combiner`, a thread that calls while
another thread's batch is on the wire queues its argument; when that batch returns, one of the
queued threads runs every queued argument as the next batch (one pipeline) and hands each caller
its own result. A lone caller runs a batch of one at once, so nothing waits for a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class _Call(Generic[A]):
    __slots__ = ("arg", "error", "leads", "ready", "result")

    def __init__(self, arg: A) -> None:
        self.arg = arg
        self.result: object = None
        self.error: BaseException | None = None
        self.leads = False  # set for a queued call whose thread must run the next batch
        self.ready = threading.Event()


class Combiner(Generic[A, R]):
    """`combiner(arg)` returns `run([... arg ...])`'s answer for `arg`. `run` takes a batch of
    arguments and returns one result per argument, in order; if it raises, every call of that
    batch raises the same exception. Each waiting thread is woken once: when its answer is in,
    or when it must run the next batch."""

    def __init__(self, run: Callable[[list[A]], Sequence[R]], max_batch: int = 512) -> None:
        self._run = run
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queued: list[_Call[A]] = []
        self._busy = False

    def __call__(self, arg: A) -> R:
        call = _Call(arg)
        with self._lock:
            if self._busy:
                self._queued.append(call)
            else:
                self._busy = call.leads = True
        if not call.leads:
            call.ready.wait()
        if call.leads:
            self._lead(call)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _lead(self, call: _Call[A]) -> None:
        with self._lock:
            batch = [call, *self._queued[: self._max_batch - 1]]
            del self._queued[: self._max_batch - 1]
        try:
            results = self._run([each.arg for each in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            for each, result in zip(batch, results, strict=True):
                each.result = result
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for each in batch:
                each.error = exc
        finally:
            self._hand_over(batch)

    def _hand_over(self, batch: list[_Call[A]]) -> None:
        """Wake the batch's callers, and the next queued caller to run the next batch."""
        with self._lock:
            if self._queued:
                successor = self._queued.pop(0)
                successor.leads = True
                successor.ready.set()
            else:
                self._busy = False
        for each in batch[1:]:
            each.ready.set()
