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
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener, wait
from types import FrameType
from typing import Any

import torch

from pipeq.config.errors import ErrorInfo, ModelError, PipeqError
from pipeq.config.registry import ModelSpec, load_registry
from pipeq.config.settings import Settings
from pipeq.worker.batcher import Batcher, BatchHooks, SplitBlock, WorkItem
from pipeq.worker.forward_wire import receive, send
from pipeq.worker.loading import load_staged
from pipeq.worker.pipelines import CallParams, StagedPipeline, batch_rows

log = logging.getLogger(__name__)

# Answers are sent in groups: one socket write per front per group, not per block.
ANSWER_GROUP = 512
READ_POLL_S = 0.1
# Batches a model's forward thread launches ahead of the GPU: it never waits for batch k before
# launching k+1, and waits for batch k before launching k+2. The sender thread waits for each
# batch's outputs before sending them. (Two batcher threads, each staging, running and waiting
# for its own batches, ran 6% slower than one: bench/NOTES.md, session 6.)
BATCHES_AHEAD = 2


@dataclass(frozen=True)
class Block:
    """Parts of one group a front asks to forward together (`StagedPipeline.pack`)."""

    block_id: int
    call_key: str
    group: Hashable
    length: int  # its longest part's
    lane_rank: int  # its most urgent part's
    expires_at: float | None  # its last part's deadline: expired rows are the front's to fail
    rows: int
    pack: Any

    def to_wire(self) -> list[Any]:
        return [
            self.block_id,
            self.call_key,
            self.group,
            self.length,
            self.lane_rank,
            self.expires_at,
            self.rows,
            self.pack,
        ]


@dataclass(frozen=True)
class Submission:
    model: str
    blocks: list[Block]
    # Call params by key, sent once per connection: blocks refer to them by key.
    calls: dict[str, CallParams] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "blocks": [block.to_wire() for block in self.blocks],
            "calls": {key: dataclasses.asdict(call) for key, call in self.calls.items()},
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Submission:
        return cls(
            wire["model"],
            [Block(*block) for block in wire["blocks"]],
            {key: CallParams(**call) for key, call in wire["calls"].items()},
        )


@dataclass(frozen=True)
class BatchReport:
    size: int
    forward_s: float
    waited_s: list[float]
    oom_splits: int = 0
    gpu_memory: tuple[int, int] | None = None


@dataclass(frozen=True)
class Answer:
    """One block's rows of a batch's outputs, or its error; `split`: send it again in halves."""

    block_id: int
    output: Any = None
    batched: bool = False  # `output` holds rows of a batch (of any size), not a lone part's
    error: ErrorInfo | None = None
    split: bool = False
    started_at: float = 0.0  # wall clock when its batch began: rows whose deadline was earlier
    batch: BatchReport | None = None
    ready: Any = None  # the CUDA event after which `output` is filled in (not sent)

    def to_wire(self) -> list[Any]:
        error = None if self.error is None else self.error.model_dump()
        batch = None if self.batch is None else dataclasses.asdict(self.batch)
        return [self.block_id, self.output, self.batched, error, self.split, self.started_at, batch]

    @classmethod
    def from_wire(cls, wire: list[Any]) -> Answer:
        block_id, output, batched, error, split, started_at, batch = wire
        return cls(
            block_id,
            output,
            batched,
            None if error is None else ErrorInfo.model_validate(error),
            split,
            started_at,
            None if batch is None else BatchReport(**batch),
        )


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


class BlockStages:
    """The batcher's stages for a list of blocks' packs. `stage`: one batch, collated and staged
    (on a side stream of the GPU: batch k+1's JPEG decode and resize run beside batch k's forward
    pass). `forward`: its outputs cut per block, each with whether it is rows of a batch (a lone
    part's output has no batch to un-batch) and the CUDA event after which it is filled in (None
    on the CPU). `has_room`: whether the GPU runs at most one batch, so that a batch short of full
    is worth staging now (else it waits and grows while the GPU is busy)."""

    def __init__(self, staged: StagedPipeline) -> None:
        self._staged = staged
        # A model placed over several GPUs (device_map) keeps the default streams of each.
        self._on_gpu = staged.pipe.device.type == "cuda" and not staged.spec.device_map
        self._side = torch.cuda.Stream(staged.pipe.device) if self._on_gpu else None
        self._launched: deque[torch.cuda.Event] = deque()

    def stage(self, packs: list[Any], call: CallParams) -> tuple[list[int], Any, Any]:
        rows = [self._staged.pack_rows(pack) for pack in packs]
        batch = self._staged.collate(packs)
        if self._side is None:
            return rows, self._staged.stage_batch(batch), None
        with torch.cuda.stream(self._side):
            batch = self._staged.stage_batch(batch)
            staged_at = torch.cuda.Event()
            staged_at.record()
        return rows, batch, staged_at

    def forward(self, staged_batch: tuple[list[int], Any, Any], call: CallParams) -> list[Any]:
        rows, batch, staged_at = staged_batch
        ready = None
        if staged_at is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(staged_at)
            _used_on(batch, stream)
        output = self._staged.forward_batch(batch, call)
        if self._on_gpu:
            ready = torch.cuda.Event()
            ready.record()
            self._launched.append(ready)
            if len(self._launched) > BATCHES_AHEAD:
                self._launched.popleft().synchronize()
        batched = sum(rows) > 1
        if len(rows) == 1:
            return [(output, batched, ready)]
        outputs, start = [], 0
        for count in rows:
            outputs.append((batch_rows(output, start, start + count), batched, ready))
            start += count
        return outputs

    def has_room(self) -> bool:
        return sum(not event.query() for event in list(self._launched)) <= 1

    def batcher(self, spec: ModelSpec, hooks: BatchHooks | None = None) -> Batcher:
        """The model's batcher over these stages."""
        return Batcher(
            spec.name,
            self.forward,
            stage=self.stage,
            has_room=self.has_room,
            max_batch_size=spec.max_batch_size,
            max_wait_ms=spec.max_wait_ms,
            hooks=hooks,
        )


def _used_on(value: Any, stream: torch.cuda.Stream) -> None:
    """Tell the allocator that the staged batch's GPU tensors, made on the side stream, are read
    on `stream`: their memory is not reused before this stream is done with them."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, dict):
        for each in value.values():
            _used_on(each, stream)
    elif isinstance(value, list | tuple):
        for each in value:
            _used_on(each, stream)


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
