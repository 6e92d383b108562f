"""Group commit for calls made from many threads at once: one round trip serves them all.

A worker holds a thread per job in flight, and each job reads and writes its record a few times;
one Redis round trip per call made those threads, not the model, the worker's limit (a front
spent ~8 ms of CPU per single-text job, most of it in socket calls and the thread switches
around them). With a `Combiner`, a thread that calls while another thread's batch is on the
wire queues its argument; when that batch returns, one of the queued threads runs every queued
argument as the next batch (one pipeline) and hands each caller its own result. A lone caller
runs a batch of one at once, so nothing waits for a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

_PENDING = object()


class _Call(Generic[A]):
    __slots__ = ("arg", "error", "result")

    def __init__(self, arg: A) -> None:
        self.arg = arg
        self.result: object = _PENDING
        self.error: BaseException | None = None


class Combiner(Generic[A, R]):
    """`combiner(arg)` returns `run([... arg ...])`'s answer for `arg`. `run` takes a batch of
    arguments and returns one result per argument, in order; if it raises, every call of that
    batch raises the same exception."""

    def __init__(self, run: Callable[[list[A]], Sequence[R]], max_batch: int = 512) -> None:
        self._run = run
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queued: list[_Call[A]] = []
        self._busy = False

    def __call__(self, arg: A) -> R:
        call = _Call(arg)
        with self._cond:
            self._queued.append(call)
            while self._busy and call.result is _PENDING and call.error is None:
                self._cond.wait()
            if call.result is _PENDING and call.error is None:
                self._busy = True
                batch = self._queued[: self._max_batch]
                del self._queued[: self._max_batch]
            else:
                batch = []
        if batch:
            self._run_batch(batch)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run_batch(self, batch: list[_Call[A]]) -> None:
        try:
            results = self._run([call.arg for call in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for call in batch:
                call.error = exc
        else:
            for call, result in zip(batch, results, strict=True):
                call.result = result
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
