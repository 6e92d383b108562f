"""Where the engine meets Celery's consumer: the task strategy that hands every message to the
engine, and the bootstep that drains it at shutdown."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps
from celery.app.trace import LOG_RECEIVED
from celery.worker import state as worker_state

from pipeq.worker.engine import Delivery, JobEngine

received_log = logging.getLogger("celery.worker.strategy")

log = logging.getLogger(__name__)


def engine_strategy(engine: JobEngine) -> Callable[..., Any]:
    """The Strategy of `pipeq.run` (Celery calls it once per consumer start with the task, app
    and consumer; it returns the handler of each message)."""

    def start_strategy(task: Any, app: Celery, consumer: Any, **_: Any) -> Callable[..., None]:
        engine.consumer = consumer

        def handle(
            message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any
        ) -> None:
            try:
                args, _kwargs, embed = message.decode()
                job = args[0]
            except (TypeError, ValueError, IndexError, KeyError) as exc:
                log.error("dropping a pipeq.run message of another shape: %r", exc)
                ack(log, consumer.connection_errors)
                return
            headers = message.headers or {}
            embed = embed or {}
            # Celery's own line for a received task, which operators (and tests) read.
            received_log.info(LOG_RECEIVED, {"name": headers.get("task"), "id": headers.get("id")})
            engine.accept(
                Delivery(
                    message=message,
                    body=job,
                    task_id=str(headers.get("id")),
                    root_id=headers.get("root_id"),
                    callbacks=embed.get("callbacks") or [],
                    errbacks=embed.get("errbacks") or [],
                    ack=ack,
                    reject=reject,
                )
            )

        return handle

    return start_strategy


def drain_step(engine: JobEngine) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that drains the engine on warm shutdown, before the consumer's
    connection closes (kombu then puts back what is still unacked)."""

    class EngineDrain(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def stop(self, parent: Any) -> None:
            if worker_state.should_stop is not None and not worker_state.should_terminate:
                engine.drain()

    return EngineDrain
