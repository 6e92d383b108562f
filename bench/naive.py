"""The baseline users write by hand: a Celery task that calls pipeline() once per job.

Run as a worker: `celery -A bench.naive worker -P solo` with NAIVE_BROKER and NAIVE_MODEL set.
`naive.noop` does nothing but return: the floor of a plain Celery task on the same Redis.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

app = Celery("naive", broker=os.environ["NAIVE_BROKER"], backend=os.environ["NAIVE_BROKER"])
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], task_acks_late=True
)
_pipe: Any = None


@worker_process_init.connect
def load(**_: Any) -> None:
    global _pipe
    if "NAIVE_TASK" not in os.environ:  # the no-op baseline loads nothing
        return
    from transformers import pipeline

    _pipe = pipeline(
        os.environ["NAIVE_TASK"],
        model=os.environ["NAIVE_MODEL"],
        device=os.environ.get("NAIVE_DEVICE"),
    )


@app.task(name="naive.run")
def run(item: Any) -> dict[str, Any]:
    output = _pipe(item)
    return {"output": output, "finished_at": time.time()}


@app.task(name="naive.noop")
def noop(item: Any) -> dict[str, Any]:
    """What Celery alone costs per job: take it, store a result, ack."""
    return {"finished_at": time.time()}
