"""The webhook delivery service: its Celery app on the pipeq.webhooks queue and the process that
serves it (`pipeq webhooks worker`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from celery import Celery
from celery.signals import worker_ready
from celery.utils.nodenames import host_format
from kombu import Queue
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from pipeq.config.celery import make_celery
from pipeq.config.errors import ConfigError
from pipeq.config.queues import WEBHOOK_QUEUE, WEBHOOK_TASK
from pipeq.config.settings import Settings
from pipeq.core.records import open_records
from pipeq.core.stores import ResultStores
from pipeq.core.webhooks import DeadLetter, DeadLetters, WebhookDelivery
from pipeq.worker.callbacks import WebhookSender, backoff_s
from pipeq.worker.guarded_network import guarded_client
from pipeq.worker.metrics_server import serve_metrics
from pipeq.worker.webhook_metrics import WEBHOOK_DEAD_LETTERS, WEBHOOK_DELIVERIES, WEBHOOK_SECONDS

log = logging.getLogger(__name__)


READY_LINE = "pipeq webhooks worker ready"


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
        began = time.perf_counter()
        failure = sender.send(delivery)
        WEBHOOK_SECONDS.labels(delivery.event).observe(time.perf_counter() - began)
        if failure is None:
            WEBHOOK_DELIVERIES.labels(delivery.event, "delivered").inc()
            # The host only: a webhook URL often carries the receiver's token.
            log.info("webhook %s delivered to %s", delivery.id, httpx.URL(delivery.url).host)
            return
        delay_s = backoff_s(self.request.retries, settings.webhook_backoff_first_s, cap_s)
        give_up_at = delivery.first_attempt_at + settings.webhook_retry_span_s
        if failure.retryable and time.time() + delay_s < give_up_at:
            # At least 1 s: on RabbitMQ (quorum queues), Celery's native delayed delivery
            # refuses a countdown that rounds down to 0 s.
            WEBHOOK_DELIVERIES.labels(delivery.event, "retried").inc()
            raise self.retry(countdown=max(1.0, delay_s))
        attempts = self.request.retries + 1
        letter = DeadLetter(
            delivery=delivery, error=failure.reason, attempts=attempts, failed_at=time.time()
        )
        dead.add(letter)
        WEBHOOK_DELIVERIES.labels(delivery.event, "dead").inc()
        WEBHOOK_DEAD_LETTERS.inc()
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
    serve_metrics(settings.metrics_port, settings.metrics_host)
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
