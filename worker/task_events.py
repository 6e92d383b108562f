"""Task events for Flower, sent in batches from the consumer's loop.

Celery buffers task events (`task-received`, `task-started`, `task-succeeded`...) and publishes a
buffer as one `task.multi` message. Each buffered event also asks the consumer's loop to flush
(`on_send_buffered`: a `call_soon` under the hub's lock, a quarter of a busy front's time when
sent per event). The job engine (worker/engine.py) sends a window's events and then asks for one
flush (`JobEngine._flush_events`); the buffer is large enough that no sender publishes it itself.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

EVENT_BUFFER_LIMIT = 4096


class BatchedTaskEvents(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.events:Events",)

    def start(self, parent: Any) -> None:
        # The Events step builds a new dispatcher on every (re)connection; this runs after it.
        if parent.event_dispatcher is not None:
            parent.event_dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
            parent.event_dispatcher.on_send_buffered = None
