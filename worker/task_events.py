"""Task events for Flower, sent in batches from the consumer's loop.

Celery buffers task events (`task-received`, `task-started`, `task-succeeded`...) and publishes a
buffer as one `task.multi` message. Each buffered event also asks the consumer's loop to flush
(`on_send_buffered`: a `call_soon` under the hub's lock, a quarter of a busy front's time when
sent per event). The job engine (worker/engine.py) sends a window's events and then asks for one
flush (`JobEngine._flush_events`); the buffer is large enough that no sender publishes it itself.

A finished job's event (`outcome_event`) is what Flower shows of its status: `task-failed`
(FAILURE) when every input failed, else `task-succeeded` with the inputs' counts as the result.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from pipeq.config.errors import ErrorInfo
from pipeq.core.jobs import JobDocument

EVENT_BUFFER_LIMIT = 4096


class BatchedTaskEvents(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.events:Events",)

    def start(self, parent: Any) -> None:
        # The Events step builds a new dispatcher on every (re)connection; this runs after it.
        if parent.event_dispatcher is not None:
            parent.event_dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
            parent.event_dispatcher.on_send_buffered = None


def outcome_event(record: JobDocument | None) -> tuple[str, dict[str, str]]:
    """The task event and its fields for a finished job (None: a message with nothing to run).

    The job's document keeps its own status; this only decides Flower's state. A job whose
    every input failed is `failed` (or `expired`) in its record, and Celery would call the task
    a success, leaving Flower's Failed filter empty; so it is sent as `task-failed`, the first
    error and the counts as its exception. A partly failed job did produce outputs: a success
    whose result says how many inputs failed."""
    if record is None:
        return "task-succeeded", {"result": "nothing to do"}
    errors = record.errors or []
    counts = _counts(errors)
    if record.status not in ("failed", "expired"):
        return "task-succeeded", {"result": counts}
    first = next((error for error in errors if error is not None), None)
    cause = record.status if first is None else f"{first.type}: {first.message}"
    return "task-failed", {"exception": f"{cause} ({counts})"}


def _counts(errors: list[ErrorInfo | None]) -> str:
    failed = sum(error is not None for error in errors)
    return f"{len(errors) - failed} succeeded, {failed} failed"
