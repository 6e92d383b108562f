"""Queue and task names both sides agree on; no Celery import, so that a producer that only
reads records or names queues stays light."""

from __future__ import annotations

LANES = ("interactive", "bulk")
RUN_TASK = "pipeq.run"
WEBHOOK_TASK = "pipeq.webhook"
WEBHOOK_QUEUE = "pipeq.webhooks"


def queue_name(model: str, lane: str) -> str:
    return f"pipeq.{model}.{lane}"


def model_of_queue(name: str) -> str | None:
    """The model whose queue `name` is (`queue_name`'s inverse); None for another queue."""
    for lane in LANES:
        if name.startswith("pipeq.") and name.endswith(f".{lane}"):
            return name.removeprefix("pipeq.").removesuffix(f".{lane}") or None
    return None


def is_amqp(url: str | None) -> bool:
    return url is not None and url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")
