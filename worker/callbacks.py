"""After a job: its webhook and its Celery links; and webhook delivery, in its own worker.

The GPU worker only publishes: when its job engine (worker/engine.py) finishes a job it sends one
`pipeq.webhook` message to the `pipeq.webhooks` queue (about a millisecond) and applies the
producer's `link` / `link_error` to the job document. Sending happens in `pipeq webhooks worker`, a
separate process with no models, so a slow or dead receiver never holds a GPU worker's thread.

Each attempt signs the body afresh per Standard Webhooks (the `webhook-id` stays
`<job id>.<event>`; the timestamp is the attempt's), refuses non-public addresses exactly as
media fetching does (worker/urlguard.py: it connects only to the address it checked; no
redirects), ends within PIPEQ_WEBHOOK_TIMEOUT_S however slowly the receiver answers, and
retries timeouts, connection errors, 429 and 5xx with exponential backoff and jitter until
PIPEQ_WEBHOOK_RETRY_SPAN_S has passed since the first attempt. Then, or at once on any other
answer (3xx, 4xx, an unsafe address), the delivery becomes a dead letter.

Backoff is capped at half the visibility timeout: a Celery retry is an ETA message the worker
holds unacked, and Redis hands an unacked message to another consumer once it is older than the
visibility timeout (research/celery.md section 2), which would send the webhook twice.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Celery
from celery.signals import worker_ready
from celery.utils.nodenames import host_format
from kombu import Queue
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from pipeq.config.celery import WEBHOOK_QUEUE, WEBHOOK_TASK, make_celery
from pipeq.config.errors import ConfigError, FetchFailed, UnsafeReference
from pipeq.config.settings import Settings
from pipeq.core.jobs import FINAL_STATUSES, JobDocument, owner_of
from pipeq.core.records import JobRecords, open_records
from pipeq.core.stores import ResultStores
from pipeq.core.webhooks import DeadLetter, DeadLetters, WebhookDelivery
from pipeq.worker.urlguard import checked_url, deadline, guarded_client

log = logging.getLogger(__name__)

READY_LINE = "pipeq webhooks worker ready"
_MAX_DOUBLINGS = 30  # 2**30 first steps is far past any cap; keeps the float finite


# --- the GPU worker's side -------------------------------------------------------------------


def finished_earlier(records: JobRecords, message: dict[str, Any]) -> JobDocument | None:
    """The record of a redelivered job that a first copy already finished (its worker died
    before the ack, so its webhook and links may not have gone out: they go again)."""
    job_id = message.get("id") if isinstance(message, dict) else None
    record = records.get(job_id) if isinstance(job_id, str) else None
    if record is None or record.status not in FINAL_STATUSES or record.status == "cancelled":
        return None
    return record


# --- the webhooks worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    reason: str
    retryable: bool


class WebhookSender:
    """One signed POST per call; says whether and how it failed."""

    def __init__(self, settings: Settings, http: httpx.Client, stores: ResultStores) -> None:
        self._signer = Webhook(settings.webhook_secret or "")
        self._own_signers = {
            owner_of(key): Webhook(secret)
            for key, secret in settings.api_key_secrets.items()
            if secret is not None
        }
        self._allow_private = settings.allow_private_urls
        self._timeout_s = settings.webhook_timeout_s
        self._http = http
        self._stores = stores

    def send(self, delivery: WebhookDelivery) -> Failure | None:
        signer, webhook_id, content = self._signed_as(delivery)
        body = json.dumps(content, separators=(",", ":"))
        now = datetime.now(tz=UTC)
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(webhook_id, now, body),
            "content-type": "application/json",
        }
        try:
            url = checked_url(httpx.URL(delivery.url), self._allow_private)
            # The whole attempt, not each socket operation: a receiver that sends one header
            # line now and then would otherwise hold this thread without end.
            with (
                deadline(self._timeout_s),
                self._http.stream("POST", url, content=body.encode(), headers=headers) as response,
            ):
                status = response.status_code
        except UnsafeReference as exc:
            return Failure(str(exc), retryable=False)
        except FetchFailed as exc:  # DNS: the name may resolve again
            return Failure(str(exc), retryable=True)
        except httpx.TimeoutException as exc:
            return Failure(f"no answer in time: {type(exc).__name__}", retryable=True)
        except httpx.TransportError as exc:
            return Failure(f"{type(exc).__name__}: {exc}", retryable=True)
        except httpx.InvalidURL as exc:
            return Failure(f"not a valid URL: {exc}", retryable=False)
        if 200 <= status < 300:
            return None
        return Failure(f"HTTP {status}", retryable=status == 429 or status >= 500)

    def _signed_as(self, delivery: WebhookDelivery) -> tuple[Webhook, str, dict[str, Any]]:
        """The signer, webhook-id and body of a delivery: its owner's own secret and the id the
        owner submitted where the owner's key has a secret, else the shared secret and the
        stored id (which names the owner: core/webhooks.py)."""
        body = self._body(delivery)
        own = self._own_signers.get(delivery.owner) if delivery.owner else None
        if own is None:
            return self._signer, delivery.id, body
        public = str(body["id"]).removeprefix(f"{delivery.owner}:")
        return own, f"{public}.{delivery.event}", {**body, "id": public}

    def _body(self, delivery: WebhookDelivery) -> dict[str, Any]:
        # An S3-stored result is not inlined (it is large by definition): the receiver gets a
        # presigned result_url, signed per attempt so it is fresh however late the attempt.
        result_url = delivery.body.get("result_url")
        if isinstance(result_url, str) and result_url.startswith("s3://"):
            return {**delivery.body, "result_url": self._stores.presigned_url(result_url)}
        return delivery.body


def backoff_s(retries: int, first_s: float, cap_s: float) -> float:
    """Exponential, with "equal jitter": half of each step fixed, half random, so retries of many
    deliveries to one receiver spread out but none comes back at once."""
    step = min(cap_s, first_s * 2.0 ** min(retries, _MAX_DOUBLINGS))
    return step / 2 + random.uniform(0, step / 2)


def create_webhooks_app(settings: Settings, sender: WebhookSender, dead: DeadLetters) -> Celery:
    app = make_celery(settings)
    app.conf.task_queues = [Queue(WEBHOOK_QUEUE)]
    cap_s = settings.visibility_timeout_s / 2

    @app.task(name=WEBHOOK_TASK, bind=True, max_retries=None, acks_late=True)
    def deliver(self: Any, message: dict[str, Any]) -> None:
        try:
            delivery = WebhookDelivery.model_validate(message)
        except ValidationError as exc:
            log.error("dropping a message that is not a pipeq webhook: %s", exc)
            return
        failure = sender.send(delivery)
        if failure is None:
            # The host only: a webhook URL often carries the receiver's token.
            log.info("webhook %s delivered to %s", delivery.id, httpx.URL(delivery.url).host)
            return
        delay_s = backoff_s(self.request.retries, settings.webhook_backoff_first_s, cap_s)
        give_up_at = delivery.first_attempt_at + settings.webhook_retry_span_s
        if failure.retryable and time.time() + delay_s < give_up_at:
            # At least 1 s: on RabbitMQ (quorum queues), Celery's native delayed delivery
            # refuses a countdown that rounds down to 0 s.
            raise self.retry(countdown=max(1.0, delay_s))
        attempts = self.request.retries + 1
        letter = DeadLetter(
            delivery=delivery, error=failure.reason, attempts=attempts, failed_at=time.time()
        )
        dead.add(letter)
        log.warning(
            "webhook %s to %s is a dead letter after %d attempt(s): %s",
            delivery.id,
            httpx.URL(delivery.url).host,
            attempts,
            failure.reason,
        )

    return app


def webhook_http_client(settings: Settings) -> httpx.Client:
    """The client `WebhookSender` needs: SSRF-guarded, no redirects, no proxy from the environment."""
    return guarded_client(settings.webhook_timeout_s, settings.allow_private_urls)


def serve_webhooks(settings: Settings, concurrency: int) -> int:
    """Run `pipeq webhooks worker` in this process until it is shut down."""
    if not settings.webhook_secret:
        raise ConfigError("PIPEQ_WEBHOOK_SECRET (whsec_<base64>) is needed to sign webhooks")
    try:
        Webhook(settings.webhook_secret)
    except Exception as exc:  # noqa: BLE001 - the library's several ways of saying "bad secret"
        raise ConfigError(f"PIPEQ_WEBHOOK_SECRET is not a whsec_<base64> secret: {exc}") from exc
    for secret in filter(None, settings.api_key_secrets.values()):
        try:
            Webhook(secret)
        except Exception as exc:  # noqa: BLE001 - as above; the message names no key
            raise ConfigError(
                f"a secret in PIPEQ_API_KEYS is not a whsec_<base64> secret: {exc}"
            ) from exc
    records = open_records(settings.effective_result_url, settings.result_ttl_s)
    http = webhook_http_client(settings)
    sender = WebhookSender(settings, http, ResultStores(settings, records))
    app = create_webhooks_app(settings, sender, DeadLetters(settings.effective_result_url))
    hostname = host_format("webhooks@%h")

    @worker_ready.connect(weak=False)
    def announce(sender: Any, **_: Any) -> None:
        print(f"{READY_LINE}: {hostname}", flush=True)

    worker = app.Worker(
        hostname=hostname,
        pool_cls="threads",
        concurrency=concurrency,
        queues=[WEBHOOK_QUEUE],
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
    )
    try:
        worker.start()
    finally:
        http.close()
    return int(worker.exitcode or 0)
