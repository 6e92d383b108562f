"""Task events for Flower, sent in batches from the consumer's loop.

Celery buffers task events (`task-received`, `task-started`, `task-succeeded`...) and publishes a
buffer as one `task.multi` message, but a buffer of 24 events is published by the job thread that
filled it, under the dispatcher's lock: with a hundred job threads, a fifth of them were found
waiting on that lock (py-spy dump of a busy front), each holding its finished job back. With a
larger buffer, job threads only append, and the consumer's loop, woken once per appended event,
publishes whatever has accumulated in one message.
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
