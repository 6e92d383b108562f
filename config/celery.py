"""The Celery app both sides share: JSON only, late acks, one queue per model and lane."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Exchange, Queue
from kombu.common import Broadcast

from pipeq.config.queues import LANES, WEBHOOK_QUEUE, WEBHOOK_TASK, is_amqp, queue_name
from pipeq.config.settings import Settings


def model_queues(models: list[str]) -> list[Queue]:
    # Order matters: with queue_order_strategy=priority the worker always polls the
    # interactive queue of every model before any bulk queue.
    return [Queue(queue_name(m, lane)) for lane in LANES for m in models]


def quorum_queue(name: str) -> Queue:
    """How every pipeq queue is declared on RabbitMQ: durable, replicated (quorum), bound to a
    topic exchange of its own name. Celery's native delayed delivery (the ETA/countdown of
    retries) needs a topic or fanout exchange: with a direct one the worker would hold delayed
    messages unacked in memory, and quorum queues have no global QoS to make room for them."""
    return Queue(
        name,
        Exchange(name, type="topic", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


class QuorumAMQP(AMQP):
    """app.amqp for RabbitMQ: each declared queue (a worker's task_queues, the webhooks queue)
    becomes a `quorum_queue`, as do the queues a producer names (task_create_missing_queue_*),
    so every process declares them alike; RabbitMQ refuses a redeclaration with other arguments."""

    def Queues(self, queues: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Celery's name
        if queues:
            items = queues.values() if isinstance(queues, Mapping) else queues
            queues = [
                quorum_queue(q.name) if isinstance(q, Queue) and not isinstance(q, Broadcast) else q
                for q in items
            ]
        return super().Queues(queues, *args, **kwargs)


class TaskSummaryOnly(logging.Filter):
    """Celery logs each task received and each success at INFO with its arguments and return
    value in the record (`pipeq.run`'s are the job message and document: inputs, outputs,
    webhook URLs and their tokens), in the message for a success and in `extra` for handlers
    that print it. This drops them, leaving the task's name, id (the job id), run time and any
    error; the worker logs the job's status itself."""

    _DROP = frozenset({"args", "kwargs", "return_value"})

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if isinstance(context, Mapping) and "id" in context and "name" in context:
            kept = {key: value for key, value in context.items() if key not in self._DROP}
            if "return_value" in context:
                record.msg = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
            record.args = kept
            record.data = kept
        return True


_TASK_SUMMARY_ONLY = TaskSummaryOnly()


def broker_folder(settings: Settings) -> Path:
    """The embedded broker's folder (kombu's filesystem transport)."""
    return settings.data_dir / "broker"


def _broker(settings: Settings) -> tuple[str, dict[str, object]]:
    if settings.broker_url is None:
        folder = broker_folder(settings)
        folder.mkdir(parents=True, exist_ok=True)
        # The filesystem transport polls once a second unless told otherwise.
        return "filesystem://localhost/", {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(folder),
            "polling_interval": 0.05,
        }
    if is_amqp(settings.broker_url):
        # Publisher confirms: a publish returns (and the API answers 202) only once RabbitMQ has
        # taken the message (a quorum queue: written on a majority of its replicas).
        return settings.broker_url, {"confirm_publish": True}
    options: dict[str, object] = {
        "visibility_timeout": settings.visibility_timeout_s,
        "queue_order_strategy": "priority",
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
    }
    return settings.broker_url, options


def make_celery(settings: Settings) -> Celery:
    for logger in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(logger).addFilter(_TASK_SUMMARY_ONLY)  # once: filters are a set
    broker_url, transport_options = _broker(settings)
    amqp = is_amqp(broker_url)
    app = Celery("pipeq", broker=broker_url, amqp=QuorumAMQP if amqp else None)
    if broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = "pipeq.config.redis_transport:Transport"
    if broker_url.startswith("rediss://") and "ssl_cert_reqs" not in broker_url:
        # With its transport named, kombu no longer turns rediss:// into TLS by itself: verify
        # the server's certificate unless the URL says otherwise.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if amqp:
        # RabbitMQ has no queue_order_strategy: a worker consumes its interactive and bulk queues
        # side by side (docs/scaling.md). Quorum queues have no global QoS; Celery sees them
        # (worker_detect_quorum_queues) and sets a per-consumer prefetch instead.
        app.conf.update(
            task_create_missing_queue_type="quorum",
            task_create_missing_queue_exchange_type="topic",
            task_default_queue_type="quorum",
            task_default_exchange_type="topic",
            worker_detect_quorum_queues=True,
        )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results live in pipeq's own job records (config/../producer/records.py), not here.
        task_ignore_result=True,
        result_expires=settings.result_ttl_s,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_track_started=True,
        task_create_missing_queues=True,
        task_default_queue="pipeq.default",
        task_routes={WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app
