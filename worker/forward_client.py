"""A front's handle on the forward process: `submit` like a `Batcher`, answers as futures.

A thread that submits parts sends them itself, with every part other threads queued meanwhile
(one message; while it writes, the next submitters queue theirs for the next message), so no
hand-off to a sender thread costs a wait for the GIL; a reader thread resolves each part's future
from the answers. If the forward process goes away (killed, restarted by the supervisor), the
front reconnects and sends again every part still unanswered, so a forward crash costs time, not
jobs; a part sent `MAX_SENDS` times without an answer (it may be what kills the forward process)
fails alone with `ModelError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from config.errors import ErrorInfo, Expired, ModelError, PipeqError
from worker.batcher import BatchHooks, WorkItem
from worker.forward_server import Answer, Entry, Submission
from worker.forward_wire import WireError, receive, send

log = logging.getLogger(__name__)

MAX_SENDS = 3
RECONNECT_S = 120.0


class ForwardClient:
    """One model's batcher as seen from a front process."""

    def __init__(
        self,
        model: str,
        connect: Callable[[], Connection],
        *,
        max_batch_size: int,
        hooks: BatchHooks | None = None,
    ) -> None:
        self.name = model
        self.max_batch_size = max_batch_size
        self._connect = connect
        self._hooks = hooks
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._outgoing: list[tuple[int, WorkItem]] = []
        self._in_flight: dict[int, tuple[WorkItem, int]] = {}
        self._calls_sent: set[str] = set()
        self._conn = connect()
        self._stopping = False
        self._sending = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"from-forward-{model}", daemon=True
        )

    def start(self) -> ForwardClient:
        self._reader.start()
        return self

    def submit(self, items: list[WorkItem]) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"forward client {self.name} is stopped")
            self._outgoing.extend((next(self._ids), item) for item in items)
            sends = self._become_sender()
        if sends:
            self._send_queued()

    def stop(self) -> None:
        """Wait for every part sent to be answered, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while self._in_flight or self._outgoing:
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
                if not self._outgoing:
                    self._sending = False
                    return
                batch, self._outgoing = self._outgoing, []
                for item_id, item in batch:
                    sends = self._in_flight.get(item_id, (item, 0))[1] + 1
                    self._in_flight[item_id] = (item, sends)
                conn = self._conn
            self._send(conn, batch)

    def _send(self, conn: Connection, batch: list[tuple[int, WorkItem]]) -> None:
        calls = {}
        for _, item in batch:
            if item.call.key not in self._calls_sent:
                calls[item.call.key] = item.call
        entries = [
            Entry(
                item_id,
                item.call.key,
                item.group,
                item.length,
                item.lane_rank,
                item.expires_at,
                item.part,
            )
            for item_id, item in batch
        ]
        try:
            send(conn, Submission(self.name, entries, calls).to_wire())
            self._calls_sent.update(calls)
        except (OSError, EOFError):
            pass  # the reader sees the connection drop and sends these again
        except WireError:
            # A part the wire cannot carry is pipeq's bug: its inputs fail, the front goes on.
            log.exception("parts for %s could not be sent", self.name)
            with self._cond:
                for item_id, item in batch:
                    self._in_flight.pop(item_id, None)
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
        with self._cond:
            held = self._in_flight.pop(answer.item_id, None)
            if not self._in_flight:
                self._cond.notify_all()
        if held is None:
            return
        item = held[0]
        if answer.batch is not None and self._hooks is not None:
            self._hooks.on_batch(answer.batch.size, answer.batch.forward_s, answer.batch.waited_s)
            for _ in range(answer.batch.oom_splits):
                self._hooks.on_oom(answer.batch.size)
        if answer.error is None:
            item.future.set_result(answer.output)
            return
        if answer.error.type == "Expired" and self._hooks is not None:
            self._hooks.on_expired(1)
        item.future.set_exception(_error(answer.error))

    def _reconnect(self) -> None:
        """Connect to the (restarted) forward process and send every unanswered part again."""
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
            for item_id, (item, sends) in list(self._in_flight.items()):
                if sends >= MAX_SENDS:
                    del self._in_flight[item_id]
                    item.future.set_exception(
                        ModelError("the forward process died each time it ran this input")
                    )
                else:
                    again.append((item_id, item))
            self._outgoing[:0] = again
            self._cond.notify_all()
            sends = self._become_sender()
        if sends:
            self._send_queued()


def _error(info: ErrorInfo) -> PipeqError:
    kinds: dict[str, type[PipeqError]] = {"Expired": Expired}
    return kinds.get(info.type, ModelError)(info.message)
