"""A front's handle on the forward process: `submit` like a `Batcher`, answers as futures.

Parts travel in blocks: what is queued when a thread sends is grouped (`WorkItem.group`), sorted
by lane then length within each group, and cut into blocks of `BLOCK_ROWS`, each packed in one
piece (`StagedPipeline.pack`); the forward process runs blocks, not parts, and sends each block's
rows of the batch's outputs back, which this front un-batches per part (`StagedPipeline.unbatch`).
So the per-part work stays in the fronts, which scale over the cores, and the one CUDA process
does work per batch only.

A thread that submits parts sends them itself, with every part other threads queued meanwhile
(one message; while it writes, the next submitters queue theirs for the next message), so no
hand-off to a sender thread costs a wait for the GIL; a reader thread resolves the futures.

Failures: a block answered "split" (it failed alone, or is over the batch limit after an
out-of-memory error) is sent again as two halves, down to the one part that fails, which fails
alone. A part whose deadline passed before its batch began fails `Expired`. If the forward process
goes away (killed, restarted by the supervisor), the front reconnects and sends again every block
still unanswered, so a forward crash costs time, not jobs; a block sent `MAX_SENDS` times without
an answer (it may hold what kills the forward process) is split, and a single part fails alone
with `ModelError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from pipeq.config.errors import ErrorInfo, Expired, ModelError, PipeqError
from pipeq.worker.batcher import BatchHooks, WorkItem
from pipeq.worker.forward_messages import Answer, Block, Submission
from pipeq.worker.forward_wire import WireError, receive, send
from pipeq.worker.pipelines import StagedPipeline

log = logging.getLogger(__name__)

MAX_SENDS = 3
RECONNECT_S = 120.0
# Rows of a block at most: a quarter of a usual batch, so that the forward process composes each
# batch from blocks of similar lengths, from this front's window and other fronts' (less padding
# than one front's window cut into whole batches).
BLOCK_ROWS = 64


@dataclass(eq=False)
class _Block:
    items: list[WorkItem]
    sends: int = 0


class ForwardClient:
    """One model's batcher as seen from a front process."""

    def __init__(
        self,
        staged: StagedPipeline,
        connect: Callable[[], Connection],
        *,
        max_batch_size: int,
        hooks: BatchHooks | None = None,
    ) -> None:
        self.name = staged.spec.name
        self.max_batch_size = max_batch_size
        self._staged = staged
        self._connect = connect
        self._hooks = hooks
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._outgoing: list[WorkItem] = []  # parts not yet in a block
        self._again: list[_Block] = []  # blocks to send as they are (halves, resends)
        self._in_flight: dict[int, _Block] = {}
        self._calls_sent: set[str] = set()
        self._conn = connect()
        self._stopping = False
        self._sending = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"from-forward-{self.name}", daemon=True
        )

    def start(self) -> ForwardClient:
        self._reader.start()
        return self

    def submit(self, items: list[WorkItem]) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"forward client {self.name} is stopped")
            self._outgoing.extend(items)
            sends = self._become_sender()
        if sends:
            self._send_queued()

    def stop(self) -> None:
        """Wait for every part sent to be answered, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while self._in_flight or self._outgoing or self._again:
                self._cond.wait(0.1)
        self._conn.close()

    def _become_sender(self) -> bool:
        """Under `_cond`: whether this thread must send what is queued (False: the thread
        sending now sends it next)."""
        if self._sending:
            return False
        self._sending = True
        return True

    def _send_queued(self) -> None:
        """Send what is queued until nothing is; only the thread that set `_sending` calls it."""
        while True:
            with self._cond:
                if not self._outgoing and not self._again:
                    self._sending = False
                    return
                blocks = self._again + self._cut(self._outgoing)
                self._outgoing, self._again = [], []
                sent = []
                for block in blocks:
                    block.sends += 1
                    block_id = next(self._ids)
                    self._in_flight[block_id] = block
                    sent.append((block_id, block))
                conn = self._conn
            self._send(conn, sent)

    def _cut(self, items: list[WorkItem]) -> list[_Block]:
        """Items grouped, each group sorted by lane then length, cut into blocks of `BLOCK_ROWS`."""
        groups: dict[object, list[WorkItem]] = {}
        for item in items:
            groups.setdefault(item.group, []).append(item)
        blocks = []
        for group in groups.values():
            group.sort(key=lambda item: (item.lane_rank, item.length))
            rows = min(BLOCK_ROWS, self.max_batch_size)
            for start in range(0, len(group), rows):
                blocks.append(_Block(group[start : start + rows]))
        return blocks

    def _send(self, conn: Connection, sent: list[tuple[int, _Block]]) -> None:
        calls = {}
        wire = []
        for block_id, block in sent:
            items = block.items
            call = items[0].call
            if call.key not in self._calls_sent:
                calls[call.key] = call
            deadlines = [item.expires_at for item in items]
            wire.append(
                Block(
                    block_id,
                    call.key,
                    items[0].group,
                    max(item.length for item in items),
                    min(item.lane_rank for item in items),
                    None if None in deadlines else max(deadlines),  # type: ignore[type-var]
                    len(items),
                    self._staged.pack([item.part for item in items]),
                )
            )
        try:
            send(conn, Submission(self.name, wire, calls).to_wire())
            self._calls_sent.update(calls)
        except (OSError, EOFError):
            pass  # the reader sees the connection drop and sends these again
        except WireError:
            # A part the wire cannot carry is pipeq's bug: its inputs fail, the front goes on.
            log.exception("parts for %s could not be sent", self.name)
            with self._cond:
                for block_id, block in sent:
                    self._in_flight.pop(block_id, None)
                    for item in block.items:
                        item.future.set_exception(
                            ModelError("this input could not be sent to the model")
                        )

    def _read_loop(self) -> None:
        while True:
            try:
                answers = [Answer.from_wire(answer) for answer in receive(self._conn)]
            except (OSError, EOFError):
                if self._stopping and not self._in_flight:
                    return
                self._reconnect()
                continue
            for answer in answers:
                self._resolve(answer)

    def _resolve(self, answer: Answer) -> None:
        send_halves = False
        with self._cond:
            block = self._in_flight.pop(answer.block_id, None)
            if block is not None and answer.split and len(block.items) > 1:
                # Queued before the lock is let go, so `stop` never sees this block nowhere.
                self._again += _halves(block, max(0, block.sends - 1))
                send_halves = self._become_sender()
            if not self._in_flight:
                self._cond.notify_all()
        if block is None:
            return
        if answer.batch is not None and self._hooks is not None:
            self._hooks.on_batch(answer.batch.size, answer.batch.forward_s, answer.batch.waited_s)
            for _ in range(answer.batch.oom_splits):
                self._hooks.on_oom(answer.batch.size)
        if answer.split:
            if send_halves:
                self._send_queued()
            elif len(block.items) == 1:
                self._fail(block.items, ModelError("the model could not run this input"))
        elif answer.error is not None:
            self._fail(block.items, _error(answer.error))
        else:
            self._answer(block.items, answer)

    def _answer(self, items: list[WorkItem], answer: Answer) -> None:
        try:
            parts = [item.part for item in items]
            outputs = self._staged.unbatch(answer.output, parts, items[0].call, answer.batched)
        except Exception as exc:  # noqa: BLE001 - pipeq's bug fails these inputs, not the front
            log.exception("outputs of %s could not be un-batched", self.name)
            self._fail(items, ModelError(f"the output could not be read ({type(exc).__name__})"))
            return
        for item, output in zip(items, outputs, strict=True):
            if item.expires_at is not None and item.expires_at <= answer.started_at:
                self._fail([item], Expired("deadline passed before its forward pass"))
            else:
                item.future.set_result(output)

    def _fail(self, items: list[WorkItem], error: PipeqError) -> None:
        if isinstance(error, Expired) and self._hooks is not None:
            self._hooks.on_expired(len(items))
        for item in items:
            item.future.set_exception(error)

    def _reconnect(self) -> None:
        """Connect to the (restarted) forward process and send every unanswered block again."""
        log.warning("forward process for %s went away; reconnecting", self.name)
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                conn = self._connect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.critical("no forward process for %s; exiting", self.name)
                    # The front cannot serve without it: exit, and the leases return its jobs.
                    os._exit(75)
                time.sleep(0.5)
        with self._cond:
            self._conn = conn
            self._calls_sent.clear()
            again = []
            for block in self._in_flight.values():
                if block.sends < MAX_SENDS:
                    again.append(block)
                elif len(block.items) > 1:
                    again += _halves(block, MAX_SENDS - 1)
                else:
                    block.items[0].future.set_exception(
                        ModelError("the forward process died each time it ran this input")
                    )
            self._in_flight.clear()
            self._again[:0] = again
            self._cond.notify_all()
            sends = self._become_sender()
        if sends:
            self._send_queued()


def _halves(block: _Block, sends: int) -> list[_Block]:
    half = len(block.items) // 2
    return [_Block(block.items[:half], sends), _Block(block.items[half:], sends)]


def _error(info: ErrorInfo) -> PipeqError:
    kinds: dict[str, type[PipeqError]] = {"Expired": Expired}
    return kinds.get(info.type, ModelError)(info.message)
