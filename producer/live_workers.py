"""Which workers serve each model now, for `GET /v1/models`: an API that answers while no worker
serves a model is a trap (its jobs wait), so the API says who is there."""

from __future__ import annotations

from pipeq.config.queues import model_of_queue
from pipeq.producer.client import Client

# How long the API waits for workers' answers where there is no ledger (embedded broker, AMQP).
INSPECT_TIMEOUT_S = 1.0


def live_workers(client: Client) -> dict[str, list[str]]:
    """Per model, the workers serving it: their heartbeats in the queue ledger (Redis broker),
    else the workers that answer a Celery inspect of their queues."""
    if client.ledger is not None:
        return {name: client.ledger.live_workers(name) for name in client.registry.models}
    replies = client.celery.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    serving: dict[str, set[str]] = {}
    for worker, queues in replies.items():
        for queue in queues:
            model = model_of_queue(str(queue.get("name", "")))
            if model is not None:
                serving.setdefault(model, set()).add(worker)
    return {name: sorted(workers) for name, workers in serving.items()}
