"""A front's job engine: Celery's consumer hands it `pipeq.run` messages, it runs them in windows.

Celery's consumer claims the messages (many per broker round trip: config/redis_transport.py).
Instead of a Request per message and a pool thread per job, the task's Strategy puts each message
in the engine's inbox, and three threads work on windows of jobs:
- intake claims a window's records (two round trips) and prepares its inputs (`JobRunner.start`);
- completion postprocesses the jobs whose inputs are all answered, stores them (one round trip),
  then per job sends its task event, publishes its webhook and links, and acks its message: only
  after its result is stored;
- progress writes the counts of jobs running longer than PROGRESS_INTERVAL_S.

The consumer's prefetch credit (`--concurrency`) bounds the messages held unacked, so the jobs in
the engine. A store that is briefly unreachable costs time, not jobs: claims and stores are tried
again with backoff, the messages held meanwhile. Warm shutdown (`EngineDrain`): messages not yet
claimed go back to the queue; jobs started finish, are stored and acked.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from celery import Celery, signature
from redis.exceptions import RedisError

from pipeq.config.errors import ModelError
from pipeq.core.jobs import JobDocument
from pipeq.core.webhooks import publish_for
from pipeq.worker.callbacks import finished_earlier
from pipeq.worker.job_run import JobRun
from pipeq.worker.progress import PROGRESS_INTERVAL_S
from pipeq.worker.runner import JobRunner
from pipeq.worker.task_events import outcome_event

log = logging.getLogger(__name__)

T = TypeVar("T")

# Jobs claimed together: one round trip for their records, one message of text parts.
WINDOW = 512
BACKOFF_MAX_S = 30.0


@dataclass
class Delivery:
    """One `pipeq.run` message, as the consumer handed it over."""

    message: Any  # kombu's Message
    body: Any  # the job message, the task's one argument
    task_id: str
    root_id: str | None
    callbacks: list[Any] = field(default_factory=list)
    errbacks: list[Any] = field(default_factory=list)
    ack: Callable[..., Any] | None = None  # the consumer's ack promise (acks on its thread)
    reject: Callable[..., Any] | None = None
    credit: int = 0  # prefetch credit it holds beyond its message's own (see `_hold_credit`)


class JobEngine:
    def __init__(self, runner: JobRunner, app: Celery, hostname: str) -> None:
        self.runner = runner
        self.app = app
        self.hostname = hostname
        self.consumer: Any = None  # set by the Strategy: its event dispatcher and errors
        self._inbox: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._ready: queue.SimpleQueue[JobRun] = queue.SimpleQueue()
        self._live: dict[int, JobRun] = {}  # claimed and not yet stored, for progress
        self._held = 0  # messages accepted and not yet acked or put back
        self._lock = threading.Condition()
        self._draining = False
        self._direct_acks = False
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._intake_loop, name="engine-intake", daemon=True),
            threading.Thread(target=self._completion_loop, name="engine-completion", daemon=True),
            threading.Thread(target=self._progress_loop, name="engine-progress", daemon=True),
        ]

    def start(self) -> JobEngine:
        for thread in self._threads:
            thread.start()
        return self

    # --- the consumer's side ------------------------------------------------------------------

    def accept(self, delivery: Delivery) -> None:
        with self._lock:
            self._held += 1
        self._hold_credit(delivery)
        if self._draining:
            self._settle(delivery, requeue=True)
            return
        self._event("task-received", delivery.task_id, **received_fields(delivery.message))
        self._inbox.put(delivery)

    def _hold_credit(self, delivery: Delivery) -> None:
        """A job of n inputs takes n of the consumer's prefetch credit, not one, so a front holds
        about `--concurrency` inputs whatever the jobs' sizes, and the fronts of a host share a
        queue of large jobs instead of the first one taking a credit's worth of them. Runs on the
        consumer's thread, the only one that lowers the credit (the event loop applies it)."""
        qos = getattr(self.consumer, "qos", None)
        inputs = delivery.body.get("inputs") if isinstance(delivery.body, dict) else None
        if qos is None or not qos.value or not isinstance(inputs, list):
            return
        delivery.credit = max(0, min(len(inputs) - 1, qos.value - 1))
        if delivery.credit:
            qos.decrement_eventually(delivery.credit)

    def drain(self) -> None:
        """Stop taking jobs: those not yet claimed go back to the queue; those started finish,
        are stored and acked. Runs on the thread that shuts the consumer down, with the
        consumer's loop stopped, so acks are sent from the engine's threads directly."""
        self._direct_acks = True
        self._draining = True
        self._inbox.put(None)
        with self._lock:
            while self._held:
                self._lock.wait(0.5)
        self._stopped.set()

    # --- intake -------------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        while True:
            window = _take(self._inbox, WINDOW)
            stop = None in window
            deliveries = [d for d in window if d is not None]
            if self._draining:
                for delivery in deliveries:
                    self._settle(delivery, requeue=True)
            elif deliveries:
                self._begin(deliveries)
            if stop:
                for left in _take_all(self._inbox):
                    if left is not None:
                        self._settle(left, requeue=True)
                return

    def _begin(self, deliveries: list[Delivery]) -> None:
        pairs = [(delivery.body, delivery) for delivery in deliveries]
        try:
            runs = self._retrying("claim", partial(self.runner.claim, pairs, self.hostname))
        except Exception:  # noqa: BLE001 - pipeq's bug: the messages go back, counted next time
            log.exception("a window of %d jobs could not be claimed", len(deliveries))
            runs = None
        if runs is None:  # or draining while the store was unreachable: the queue keeps them
            for delivery in deliveries:
                self._settle(delivery, requeue=True)
            return
        started = []
        for delivery, run in zip(deliveries, runs, strict=True):
            if run is None:
                self._skipped(delivery)
                continue
            with self._lock:
                self._live[id(run)] = run
            self._event("task-started", delivery.task_id)
            started.append(run)
        self._flush_events()
        self.runner.start(started, self._ready.put)

    def _skipped(self, delivery: Delivery) -> None:
        """A message whose job does not run: a redelivered job finished by a first copy (whose
        worker died before the ack: its webhook and links go again), or nothing to do."""
        record = None
        try:
            record = finished_earlier(self.runner.records, delivery.body)
        except RedisError as exc:
            log.warning("record of redelivered job %s not read: %r", delivery.task_id, exc)
        self._complete(delivery, record)
        self._flush_events()

    # --- completion ---------------------------------------------------------------------------

    def _completion_loop(self) -> None:
        while True:
            runs = _take(self._ready, WINDOW)
            docs = [self._finish(run) for run in runs]
            try:
                stored = self._retrying("store", partial(self.runner.store, runs, docs), False)
            except Exception:  # noqa: BLE001 - pipeq's bug: store the window's jobs one by one
                log.exception("a window of %d results could not be stored", len(runs))
                stored = None
            for index, run in enumerate(runs):
                with self._lock:
                    self._live.pop(id(run), None)
                if stored is not None:
                    self._complete(run.delivery, stored[index], time.time() - run.started)
                else:
                    self._store_alone(run, docs[index])
            self._flush_events()

    def _store_alone(self, run: JobRun, doc: JobDocument) -> None:
        """A job whose window failed to store: stored alone, or its message goes back to the
        queue (its delivery count makes a job that always fails a poison job in the end)."""
        try:
            stored = self._retrying("store", partial(self.runner.store, [run], [doc]), False)
            assert stored is not None  # without give_up it returns or raises
            (record,) = stored
        except Exception:  # noqa: BLE001 - as above, for this job alone
            log.exception("the result of job %s could not be stored", run.job.id)
            self._settle(run.delivery, requeue=True)
            return
        self._complete(run.delivery, record, time.time() - run.started)

    def _finish(self, run: JobRun) -> JobDocument:
        try:
            return self.runner.finish(run)
        except Exception as exc:  # noqa: BLE001 - pipeq's bug fails this job, not the window
            log.exception("job %s could not be finished", run.job.id)
            run.failed = ModelError(f"the job could not be finished ({type(exc).__name__})")
            return self.runner.finish(run)

    def _complete(
        self, delivery: Delivery, record: JobDocument | None, runtime_s: float = 0.0
    ) -> None:
        """After the result is stored: the job's webhook, links and task event, then the ack."""
        if record is not None:
            log.info("job %s %s", record.id, record.status)
            try:
                publish_for(self.app, record)
                self._link(delivery, record)
            except Exception:  # noqa: BLE001 - the result is stored: the job is done regardless
                log.exception("webhook or links of job %s not published", record.id)
        kind, fields = outcome_event(record)
        self._event(kind, delivery.task_id, runtime=runtime_s, **fields)
        self._settle(delivery)

    def _link(self, delivery: Delivery, record: JobDocument) -> None:
        """The producer's `link` for a succeeded job, its `link_error` otherwise, each called
        with the job document (as Celery calls a task's callbacks with its return value)."""
        links = delivery.callbacks if record.status == "succeeded" else delivery.errbacks
        if not links:
            return
        document = record.model_dump(mode="json")
        for link in links:
            signature(link, app=self.app).apply_async(
                (document,), parent_id=delivery.task_id, root_id=delivery.root_id
            )

    # --- progress -----------------------------------------------------------------------------

    def _progress_loop(self) -> None:
        while not self._stopped.wait(PROGRESS_INTERVAL_S):
            now = time.time()
            with self._lock:
                runs = [r for r in self._live.values() if now - r.started >= PROGRESS_INTERVAL_S]
            try:
                self.runner.publish_progress(runs)
            except Exception as exc:  # noqa: BLE001 - a missed progress write never fails a job
                log.warning("progress not written: %r", exc)

    # --- plumbing -----------------------------------------------------------------------------

    def _retrying(self, what: str, call: Callable[[], T], give_up: bool = True) -> T | None:
        """`call()`, tried again with backoff while the store is unreachable. None if the engine
        drains meanwhile and `give_up`."""
        delay_s = 0.1
        while True:
            try:
                return call()
            except RedisError as exc:
                if give_up and self._draining:
                    return None
                log.warning("%s failed, trying again in %.1f s: %r", what, delay_s, exc)
                time.sleep(delay_s)
                delay_s = min(BACKOFF_MAX_S, delay_s * 2)

    def _settle(self, delivery: Delivery, requeue: bool | None = None) -> None:
        """Ack the message, or with `requeue` put it back on its queue."""
        with self._lock:
            self._held -= 1
            self._lock.notify_all()
        if delivery.credit:
            self.consumer.qos.increment_eventually(delivery.credit)
        errors = getattr(self.consumer, "connection_errors", ())
        message = delivery.message
        if requeue:
            if self._direct_acks or delivery.reject is None:
                message.reject_log_error(log, errors, requeue=True)
            else:
                delivery.reject(log, errors, True)
            return
        if self._direct_acks or delivery.ack is None:
            message.ack_log_error(log, errors)
        else:
            delivery.ack(log, errors)

    def _event(self, kind: str, task_id: str, **fields: Any) -> None:
        """Buffer a task event (worker/task_events.py); `_flush_events` has them sent."""
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.send(kind, uuid=task_id, **fields)

    def _flush_events(self) -> None:
        if getattr(self.consumer, "event_dispatcher", None) is not None:
            self.consumer.on_send_event_buffered()


def _take(inbox: queue.SimpleQueue[T], most: int) -> list[T]:
    """The next item (waiting for it) and whatever else is there, up to `most`."""
    items = [inbox.get()]
    while len(items) < most:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            break
    return items


def _take_all(inbox: queue.SimpleQueue[T]) -> list[T]:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def received_fields(message: Any) -> dict[str, Any]:
    headers = message.headers or {}
    return {
        "name": headers.get("task"),
        "args": headers.get("argsrepr"),
        "kwargs": headers.get("kwargsrepr"),
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "retries": headers.get("retries", 0),
    }
