"""The Celery app both sides share: JSON only, late acks, one queue per model and lane."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config.settings import Settings

LANES = ("interactive", "bulk")
RUN_TASK = "pipeq.run"
WEBHOOK_TASK = "pipeq.webhook"
WEBHOOK_QUEUE = "pipeq.webhooks"


def queue_name(model: str, lane: str) -> str:
    return f"pipeq.{model}.{lane}"


def model_queues(models: list[str]) -> list[Queue]:
    # Order matters: with queue_order_strategy=priority the worker always polls the
    # interactive queue of every model before any bulk queue.
    return [Queue(queue_name(m, lane)) for lane in LANES for m in models]


def _broker(settings: Settings) -> tuple[str, dict[str, object]]:
    if settings.broker_url is None:
        folder = (settings.data_dir / "broker").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        # The filesystem transport polls once a second unless told otherwise.
        return "filesystem://localhost/", {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(folder),
            "polling_interval": 0.05,
        }
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
    broker_url, transport_options = _broker(settings)
    app = Celery("pipeq", broker=broker_url)
    if broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = "config.redis_transport:Transport"
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
