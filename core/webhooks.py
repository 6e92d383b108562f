"""Webhooks, producer side: `verify` for receivers, what a delivery carries, publishing one, and
the dead letters an operator lists and replays.

Receivers: `verify(body, headers, secret)` checks a request per Standard Webhooks and returns the
parsed body (the job document plus `"event"`), or raises `InvalidSignature` when the request is
unsigned, forged, tampered with, or its `webhook-timestamp` is more than 5 minutes off (which is
what stops a captured request from being replayed later). Delivery is at least once: a retry or
a redelivered job sends the same `webhook-id` (`<job id>.<event>`) again, so a receiver dedupes on
it.

With API keys, each key's job ids are its own (stored as `<owner>:<id>`, owner = `owner_of(key)`).
A key with its own secret (a `key=whsec_...` entry of PIPEQ_API_KEYS) gets its webhooks signed with
it, showing the id it submitted; nobody else's are. A key without one gets them signed with
PIPEQ_WEBHOOK_SECRET, showing the stored id: every tenant's webhooks carry that secret, so the id
is what tells a receiver whose job it is (and no key can get one signed for another key's id).

Deliveries are `pipeq.webhook` Celery tasks on the `pipeq.webhooks` queue, published when a job
finishes (by the GPU worker) or is cancelled (by `Client.cancel`), and sent by
`pipeq webhooks worker` (worker/callbacks.py). One that runs out of retries is kept in Redis
under `pipeq:webhooks:dead` until `pipeq webhooks replay ID` publishes it again.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel, ConfigDict, Field
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pipeq.config.errors import ConfigError, InvalidSignature, JobNotFound
from pipeq.config.queues import WEBHOOK_QUEUE, WEBHOOK_TASK
from pipeq.core.jobs import JobDocument

if TYPE_CHECKING:
    from celery import Celery

_DEAD_KEY = "pipeq:webhooks:dead"


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> Any:
    """The parsed body of a genuine pipeq webhook; `InvalidSignature` for anything else."""
    signer = Webhook(secret)
    try:
        return signer.verify(body, {name: value for name, value in headers.items()})
    except (WebhookVerificationError, ValueError, binascii.Error) as exc:
        # ValueError and binascii.Error: a signature header that is not `v1,<base64>`.
        raise InvalidSignature(f"webhook rejected: {exc}") from exc


class WebhookDelivery(BaseModel):
    """The one argument of the `pipeq.webhook` task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    url: str
    event: str
    body: dict[str, Any]
    first_attempt_at: float
    # The job's owner (an API key's hash), whose own secret signs it where the key has one. Left
    # out while unset, so a delivery without one is what webhooks workers always read.
    owner: str | None = Field(default=None, exclude_if=lambda owner: owner is None)


class DeadLetter(BaseModel):
    """A delivery that ran out of retries (or got an answer not worth retrying)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delivery: WebhookDelivery
    error: str
    attempts: int
    failed_at: float


def delivery_for(record: JobDocument) -> WebhookDelivery | None:
    """The webhook a finished or cancelled job owes, if it has one for this event."""
    event = record.status
    if record.webhook is None or event not in record.webhook.events:
        return None
    return WebhookDelivery(
        id=f"{record.id}.{event}",
        url=record.webhook.url,
        event=event,
        body={**record.model_dump(mode="json", exclude={"owner"}), "event": event},
        first_attempt_at=time.time(),
        owner=record.owner,
    )


def publish(celery: Celery, delivery: WebhookDelivery) -> None:
    celery.send_task(
        WEBHOOK_TASK,
        args=[delivery.model_dump(mode="json")],
        queue=WEBHOOK_QUEUE,
        argsrepr=f"{delivery.id} -> {delivery.url}",
        kwargsrepr="{}",
    )


def publish_for(celery: Celery, record: JobDocument) -> None:
    delivery = delivery_for(record)
    if delivery is not None:
        publish(celery, delivery)


class DeadLetters:
    """Dead letters in one Redis hash, keyed by webhook-id (a replay that fails again replaces
    its old entry)."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"webhook dead letters are kept in Redis; PIPEQ_RESULT_URL is {url!r} "
                "(set PIPEQ_RESULT_URL or PIPEQ_BROKER_URL to a redis:// URL)"
            )
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def add(self, letter: DeadLetter) -> None:
        self._redis.hset(_DEAD_KEY, letter.delivery.id, letter.model_dump_json())

    def list(self) -> list[DeadLetter]:
        letters = [DeadLetter.model_validate_json(raw) for raw in self._redis.hvals(_DEAD_KEY)]
        return sorted(letters, key=lambda letter: letter.failed_at)

    def take(self, webhook_id: str) -> DeadLetter:
        """Remove and return one dead letter (atomically, so two replays cannot both take it)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(_DEAD_KEY, webhook_id)
        pipe.hdel(_DEAD_KEY, webhook_id)
        raw, _ = pipe.execute()
        if raw is None:
            raise JobNotFound(
                f"no dead-lettered webhook {webhook_id!r} (see `pipeq webhooks failed`)"
            )
        return DeadLetter.model_validate_json(raw)

    def replay(self, celery: Celery, webhook_id: str, url: str | None = None) -> WebhookDelivery:
        """Publish a dead letter again (to `url` instead of its own, if given), with a fresh
        retry span; kept if the broker refuses."""
        letter = self.take(webhook_id)
        update: dict[str, Any] = {"first_attempt_at": time.time()}
        if url is not None:
            update["url"] = url
        delivery = letter.delivery.model_copy(update=update)
        try:
            publish(celery, delivery)
        except Exception:
            self.add(letter)
            raise
        return delivery
