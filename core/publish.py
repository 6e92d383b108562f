"""Publishing job messages: what `Client` and the worker's lost-job sweeper both send."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeq.config.claim_script import INPUTS_HEADER
from pipeq.config.queues import RUN_TASK, queue_name
from pipeq.core.jobs import JobMessage

if TYPE_CHECKING:  # a producer imports Celery when it first publishes, not before
    from celery import Celery
    from celery.canvas import Signature


def send_jobs(
    celery: Celery,
    messages: list[JobMessage],
    *,
    link: Signature | None = None,
    link_error: Signature | None = None,
) -> None:
    """Put `messages` on their queues in one pipelined batch (kombu's Producer.batch)."""
    with celery.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for message in messages:
            celery.send_task(
                RUN_TASK,
                args=[message.model_dump(mode="json")],
                task_id=message.id,
                queue=queue_name(message.model, message.lane),
                producer=producer,
                link=link,
                link_error=link_error,
                # What Flower shows instead of the arguments: never inline media bytes.
                argsrepr=f"{message.model} x{len(message.inputs)} {message.lane}",
                kwargsrepr="{}",
                headers={INPUTS_HEADER: len(message.inputs)},
            )
