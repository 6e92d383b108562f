"""The webhook sender's metrics (docs/monitoring.md): no torch here, since the sender runs in the
API's image."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

WEBHOOK_DELIVERIES = Counter(
    "pipeq_webhook_deliveries",
    "Webhook delivery attempts by event and outcome (delivered, retried, dead)",
    ["event", "outcome"],
)
WEBHOOK_DEAD_LETTERS = Counter("pipeq_webhook_dead_letters", "Webhooks that became dead letters")
WEBHOOK_SECONDS = Histogram(
    "pipeq_webhook_delivery_seconds",
    "Time of one webhook delivery attempt",
    ["event"],
    buckets=SECONDS,
)
