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

from pipeq.config.celery import make_celery, model_queues
from pipeq.config.errors import ConfigError
from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings

log = logging.getLogger(__name__)

# Flower's default columns plus the arguments summary (the producer's `argsrepr`).
TASK_COLUMNS = "name,uuid,state,args,received,runtime,worker"


def flower_argv(settings: Settings, port: int) -> list[str]:
    """The `celery flower` arguments. Credentials travel in FLOWER_BASIC_AUTH, never on argv."""
    argv = ["flower", f"--port={port}", f"--tasks_columns={TASK_COLUMNS}", "--enable_events=True"]
    if not settings.flower_basic_auth:
        # Flower can shut workers down and revoke jobs: with no credentials, loopback only.
        argv.append("--address=127.0.0.1")
    return argv


def run_flower(settings: Settings, port: int) -> int:
    """Serve Flower until it is stopped; returns its exit code."""
    if importlib.util.find_spec("flower") is None:
        raise ConfigError("Flower is not installed; pip install 'pipeq[monitor]'")
    auth = settings.flower_basic_auth
    if auth and not all(":" in pair for pair in auth.split(",")):
        raise ConfigError("PIPEQ_FLOWER_BASIC_AUTH takes user:password (comma-separated for more)")
    app = make_celery(settings)
    app.conf.task_queues = model_queues(list(load_registry(settings.models).models))
    if auth:
        # Flower reads FLOWER_* variables itself (flower/command.py, apply_env_options).
        os.environ["FLOWER_BASIC_AUTH"] = auth
    else:
        log.warning("PIPEQ_FLOWER_BASIC_AUTH is unset: Flower listens on 127.0.0.1 only")
    return int(app.start(flower_argv(settings, port)) or 0)
