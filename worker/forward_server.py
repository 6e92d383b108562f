"""The forward process: the one process per GPU that holds its models and runs their batches.

A worker's front processes (Celery consumers: intake, preparation, postprocess, completion)
send their prepared parts here over a local socket in blocks: one block is up to a batch of
parts of one group, packed by the front (texts as one id array per key), so this process does
no work per part. Each model's `Batcher` runs the blocks back to back, merging small blocks of
one group (from one front or several) into one batch, so one CUDA context owns the GPU instead of
one per front taking turns. Each block's rows of the batch's outputs go back to the front that
sent it, which un-batches them per part; the size and time of each batch ride on its first
block's answer (that front's metrics count the batch once). A block that fails alone, or is over
the batch limit after an out-of-memory error, is answered "split" and comes back in halves.

Fronts come and go (a front that dies is restarted by the supervisor; its blocks still in a
batch are answered into a closed socket and dropped). The process exits when its parent dies
(pipeq.worker.launch sets the parent-death signal), never on a front's failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener, wait
from types import FrameType
from typing import Any

import torch

from pipeq.config.errors import ErrorInfo, ModelError, PipeqError
from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings
from pipeq.worker.batcher import Batcher, SplitBlock, WorkItem
from pipeq.worker.block_stages import BlockStages
from pipeq.worker.forward_messages import Answer, BatchReport, Block, Submission
from pipeq.worker.forward_wire import receive, send
from pipeq.worker.loading import load_staged
from pipeq.worker.pipelines import CallParams, StagedPipeline

log = logging.getLogger(__name__)

# Answers are sent in groups: one socket write per front per group, not per block.
ANSWER_GROUP = 512
READ_POLL_S = 0.1


class _Reports:
    """The batchers' hooks: the report of the batch just run waits for its first answer, on the
    batcher thread that ran it (a model may have two)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._memory: tuple[int, int] | None = None
        self._memory_at = 0.0

    @property
    def started_at(self) -> float:
        return getattr(self._local, "started_at", 0.0)

    def on_batch(self, size: int, forward_s: float, waited_s: list[float]) -> None:
        local = self._local
        report = BatchReport(size, forward_s, waited_s, getattr(local, "oom_splits", 0))
        local.pending = dataclasses.replace(report, gpu_memory=self._gpu_memory())
        local.started_at = time.time() - forward_s
        local.oom_splits = 0

    def _gpu_memory(self) -> tuple[int, int] | None:
        # Read at most once a second: each read builds the allocator's whole statistics dict.
        now = time.monotonic()
        if torch.cuda.is_available() and now - self._memory_at >= 1.0:
            self._memory = (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
            self._memory_at = now
        return self._memory

    def on_oom(self, size: int) -> None:
        self._local.oom_splits = getattr(self._local, "oom_splits", 0) + 1

    def on_expired(self, count: int) -> None:
        """Counted by the fronts, which see each expired part's error."""

    def take(self) -> BatchReport | None:
        report = getattr(self._local, "pending", None)
        self._local.pending = None
        return report


@dataclass(eq=False)
class _Front:
    """One connected front."""

    conn: Connection
    name: str
    outbox: queue.SimpleQueue[tuple[_Front, Answer]]  # the server's, for its one sender thread
    calls: dict[str, CallParams] = field(default_factory=dict)
    closed: bool = False

    def answer(self, answer: Answer) -> None:
        self.outbox.put((self, answer))


@dataclass
class ForwardModel:
    """One model as the forward process holds it."""

    staged: StagedPipeline
    batcher: Batcher
    reports: _Reports


class ForwardServer:
    """Accepts fronts on the main thread; one thread reads every front's blocks, one sends
    every answer (a thread per front, each taking the GIL for a few answers, had the batcher
    threads waiting for the GIL behind two dozen others)."""

    def __init__(self, models: dict[str, ForwardModel]) -> None:
        self.models = models
        self._fronts: dict[Connection, _Front] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[tuple[_Front, Answer]] = queue.SimpleQueue()

    def serve(self, listener: Listener, stop: threading.Event) -> None:
        """Serve fronts until `stop` is set."""
        threading.Thread(
            target=self._read_loop, args=(stop,), name="blocks-in", daemon=True
        ).start()
        threading.Thread(
            target=_send_loop, args=(self._outbox,), name="answers-out", daemon=True
        ).start()
        count = 0
        while not stop.is_set():
            try:
                conn = listener.accept()
            except OSError:
                if stop.is_set():
                    return
                raise
            count += 1
            with self._lock:
                self._fronts[conn] = _Front(conn, f"front-{count}", self._outbox)

    def _read_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                conns = list(self._fronts)
            if not conns:
                stop.wait(READ_POLL_S)
                continue
            # The timeout lets a front accepted meanwhile join the next wait.
            for conn in wait(conns, timeout=READ_POLL_S):
                front = self._fronts[conn]  # type: ignore[index]
                try:
                    self._submit(front, Submission.from_wire(receive(front.conn)))
                except (OSError, EOFError):
                    self._drop(front)
                except Exception:  # noqa: BLE001 - pipeq's bug: that front reconnects, others go on
                    log.exception("a message from %s could not be read; dropping it", front.name)
                    front.conn.close()
                    self._drop(front)

    def _drop(self, front: _Front) -> None:
        with self._lock:
            self._fronts.pop(front.conn, None)
        front.closed = True

    def _submit(self, front: _Front, submission: Submission) -> None:
        front.calls.update(submission.calls)
        model = self.models.get(submission.model)
        if model is None:
            error = ModelError(f"the forward process does not hold {submission.model!r}")
            for block in submission.blocks:
                front.answer(Answer(block.block_id, error=error.to_info()))
            return
        model.batcher.submit(
            [_work_item(front, block, model.reports) for block in submission.blocks]
        )


def _send_loop(outbox: queue.SimpleQueue[tuple[_Front, Answer]]) -> None:
    while True:
        waiting = [outbox.get()]
        while len(waiting) < ANSWER_GROUP:
            try:
                waiting.append(outbox.get_nowait())
            except queue.Empty:
                break
        by_front: dict[_Front, list[Answer]] = {}
        for front, answer in waiting:
            by_front.setdefault(front, []).append(answer)
        for front, answers in by_front.items():
            if front.closed:
                continue
            for answer in answers:
                if answer.ready is not None:
                    answer.ready.synchronize()
            try:
                send(front.conn, [answer.to_wire() for answer in answers])
            except (OSError, EOFError):
                log.warning("front %s went away; %d answers dropped", front.name, len(answers))
                front.closed = True


def _work_item(front: _Front, block: Block, reports: _Reports) -> WorkItem:
    item = WorkItem(
        part=block.pack,
        group=block.group,
        call=front.calls[block.call_key],
        length=block.length,
        lane_rank=block.lane_rank,
        expires_at=block.expires_at,
        rows=block.rows,
    )
    block_id = block.block_id

    def answer(future: Future[Any]) -> None:
        # On the batcher's thread, right after the forward: a queue put, nothing more. The
        # batch's first answer is resolved first, so it takes the batch's report.
        error = future.exception()
        started_at = reports.started_at
        if error is None:
            output, batched, ready = future.result()
            report = reports.take()
            front.answer(
                Answer(block_id, output, batched, started_at=started_at, batch=report, ready=ready)
            )
        elif isinstance(error, SplitBlock):
            front.answer(Answer(block_id, split=True, batch=reports.take()))
        else:
            info = error.to_info() if isinstance(error, PipeqError) else _unexpected(error)
            front.answer(Answer(block_id, error=info, batch=reports.take()))

    item.future.add_done_callback(answer)
    return item


def _unexpected(error: BaseException) -> ErrorInfo:
    log.error("forward failed unexpectedly: %r", error)
    return ModelError(f"the forward pass failed ({type(error).__name__})").to_info()


def serve_forward(settings: Settings, models: list[str] | None, socket: str) -> int:
    """Load and warm the models, then serve fronts on the unix socket `socket` until SIGTERM."""
    # cuDNN's attention builds an execution plan for every new input shape: 60-900 ms for each new
    # sequence length or batch size on an H200 (bench/NOTES.md, session 4), and a batcher's shapes
    # change from batch to batch. PyTorch's flash and memory-efficient kernels need no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    # The batcher thread is this process's critical path, and each front's reader and sender
    # threads take the GIL from it between its CUDA calls: let it have the GIL back sooner.
    sys.setswitchinterval(0.001)
    specs = load_registry(settings.models).select(models)
    held = {}
    for spec in specs:
        staged, load_s = load_staged(spec, settings)
        reports = _Reports()
        batcher = BlockStages(staged).batcher(spec, reports).start()
        held[spec.name] = ForwardModel(staged, batcher, reports)
    # A forward process that was killed leaves its socket file behind; its successor takes it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    listener = Listener(socket, family="AF_UNIX")
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()
        listener.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("forward process serving %s on %s", ", ".join(held), socket)
    ForwardServer(held).serve(listener, stop)
    for model in held.values():
        model.batcher.stop()
    return 0
