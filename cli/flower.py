"""`pipeq flower`: Flower 2.x on pipeq's own Celery app.

Run on the app that `make_celery` builds, Flower's broker page reads pipeq's queues with the
transport options the producer and workers use (priority steps, key prefix) and lists every
model's lanes even before a worker consumes them. Workers send task events and the producer a
`task-sent` event (config/celery.py), so each job shows from the moment it is queued, with the
short `argsrepr` the producer sets in place of its inputs; Flower must be running to see them,
as events are not kept.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from celery import Celery

from pipeq.config.celery import make_celery, model_queues
from pipeq.config.errors import ConfigError
from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings

log = logging.getLogger(__name__)

# Flower's default columns plus the arguments summary (the producer's `argsrepr`) and the
# result: a finished job's input counts (worker/task_events.py).
TASK_COLUMNS = "name,uuid,state,args,result,received,runtime,worker"


def flower_argv(settings: Settings, port: int) -> list[str]:
    """The `celery flower` arguments. Credentials travel in FLOWER_BASIC_AUTH, never on argv."""
    argv = ["flower", f"--port={port}", f"--tasks_columns={TASK_COLUMNS}", "--enable_events=True"]
    if not settings.flower_basic_auth:
        # Flower can shut workers down and revoke jobs: with no credentials, loopback only.
        argv.append("--address=127.0.0.1")
    return argv


def use_stock_redis_transport(app: Celery) -> None:
    """Flower's connections on kombu's own Redis transport, not pipeq's.

    Flower picks its Broker page's reader by the scheme of the connection's URI, and kombu
    writes a named transport's import path there (`pipeq.config.redis_transport:Transport://`),
    so the page answered "'redis' broker is not supported". pipeq's transport only changes how
    a worker claims and acks job messages, which Flower never takes (it reads events by pub/sub
    and control replies from queues of its own): with kombu's, the URI is `redis://` and the page
    LLENs each queue's lists, kombu's priority steps included, as `core/queue_depth.py` does."""
    app.conf.broker_transport = None  # the URL's scheme names it (set only for Redis)


def run_flower(settings: Settings, port: int) -> int:
    """Serve Flower until it is stopped; returns its exit code."""
    if importlib.util.find_spec("flower") is None:
        raise ConfigError("Flower is not installed; pip install 'pipeq[monitor]'")
    auth = settings.flower_basic_auth
    if auth and not all(":" in pair for pair in auth.split(",")):
        raise ConfigError("PIPEQ_FLOWER_BASIC_AUTH takes user:password (comma-separated for more)")
    app = make_celery(settings)
    app.conf.task_queues = model_queues(list(load_registry(settings.models).models))
    use_stock_redis_transport(app)
    if auth:
        # Flower reads FLOWER_* variables itself (flower/command.py, apply_env_options).
        os.environ["FLOWER_BASIC_AUTH"] = auth
    else:
        log.warning("PIPEQ_FLOWER_BASIC_AUTH is unset: Flower listens on 127.0.0.1 only")
    return int(app.start(flower_argv(settings, port)) or 0)
