"""One front: a Celery consumer whose `pipeq.run` messages go to a job engine (worker/engine.py)
that claims, prepares and stores them in windows, handing their parts to the GPU's forward
process (worker/forward_server.py).

Pool: Celery's `solo` pool, unused: the task's Strategy gives every message to the engine, so
`--concurrency` is the consumer's prefetch credit, the jobs in flight. A front holds each model's
tokenizer, processors and config but not its weights; the consumer starts once the forward
process listens, so no job is taken before the models are warm.

Shutdown (SIGTERM, Celery's warm shutdown): the consumer stops taking jobs, the engine puts back
the messages it has not claimed, finishes the jobs it started and stores their results, then the
batchers stop and the prefetch pool closes.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import partial
from multiprocessing.connection import Client
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready
from celery.utils.nodenames import host_format
from redis.exceptions import RedisError

from pipeq.config.celery import broker_folder, make_celery, model_queues
from pipeq.config.queues import LANES, RUN_TASK, queue_name
from pipeq.config.registry import ModelSpec, load_registry
from pipeq.config.settings import Settings
from pipeq.core.ledger import QueueLedger, open_ledger
from pipeq.core.publish import send_jobs
from pipeq.core.records import JobRecords, RedisRecords, open_records
from pipeq.worker.consumer_glue import drain_step, engine_strategy
from pipeq.worker.engine import JobEngine
from pipeq.worker.event_files import start_pruning
from pipeq.worker.forward_client import ForwardClient
from pipeq.worker.job_run import ServedModel
from pipeq.worker.lease import LeaseRenewal
from pipeq.worker.loading import load_front
from pipeq.worker.media import MediaLoader
from pipeq.worker.memory import bound_memory
from pipeq.worker.metrics import LOAD_SECONDS, BatchMetrics
from pipeq.worker.metrics_server import serve_metrics
from pipeq.worker.result_cache import open_cache
from pipeq.worker.runner import JobRunner
from pipeq.worker.sweeper import LostJobSweeper
from pipeq.worker.task_events import BatchedTaskEvents

log = logging.getLogger(__name__)

READY_LINE = "pipeq worker ready"


def connect_models(
    specs: list[ModelSpec], settings: Settings, socket: str
) -> dict[str, ServedModel]:
    """Each model's front half, handing its parts to the forward process at `socket`."""
    served = {}
    for spec in specs:
        staged, load_s = load_front(spec, settings)
        LOAD_SECONDS.labels(spec.name).set(load_s)
        hooks = BatchMetrics(spec.name)
        batcher = ForwardClient(
            staged,
            partial(Client, socket, family="AF_UNIX"),
            max_batch_size=spec.max_batch_size,
            hooks=hooks,
        ).start()
        # Four batches of inputs prepared ahead at most: enough to form the next batch while one
        # runs, bounded so a job of 100,000 inputs cannot fill memory.
        served[spec.name] = ServedModel(
            staged, batcher, threading.Semaphore(4 * spec.max_batch_size), hooks
        )
    return served


def create_worker_app(
    settings: Settings, runner: JobRunner, models: list[str], hostname: str
) -> tuple[Celery, JobEngine]:
    app = make_celery(settings)
    app.conf.task_queues = model_queues(models)
    if "visibility_timeout" in (app.conf.broker_transport_options or {}):
        app.steps["consumer"].add(LeaseRenewal)
    app.steps["consumer"].add(BatchedTaskEvents)
    engine = JobEngine(runner, app, hostname)
    app.steps["consumer"].add(drain_step(engine))

    # A staticmethod: Celery reads `task.Strategy` through the task instance.
    @app.task(name=RUN_TASK, Strategy=staticmethod(engine_strategy(engine)))
    def run(message: dict[str, Any]) -> None:
        # Never called: the Strategy hands each message to the engine instead of the pool.
        raise NotImplementedError("pipeq.run messages are run by the worker's job engine")

    return app, engine


def serve(
    settings: Settings,
    models: list[str] | None,
    hostname: str,
    concurrency: int,
    metrics_port: int,
    socket: str,
) -> int:
    """Run a front in this process until it is shut down; returns its exit code."""
    hostname = host_format(hostname)
    serve_metrics(metrics_port, settings.metrics_host)
    registry = load_registry(settings.models)
    specs = registry.select(models)
    names = [spec.name for spec in specs]
    served = connect_models(specs, settings, socket)
    runner = JobRunner(
        settings,
        open_records(settings.effective_result_url, settings.result_ttl_s),
        served,
        MediaLoader(settings),
        prefetch_threads=max(4, os.cpu_count() or 1),
        ledger=open_ledger(settings),
        cache=open_cache(settings.effective_result_url),
    )
    app, engine = create_worker_app(settings, runner, names, hostname)
    engine.start()
    lanes = [(name, lane) for lane in LANES for name in names]
    stop_beating = _beat(runner.ledger, hostname, lanes, served, settings.lease_s / 3)
    sweeper = _sweeper(settings, runner.records, app, lanes)
    pruning = start_pruning(broker_folder(settings)) if settings.embedded else None

    @worker_ready.connect(weak=False)
    def announce(sender: Any, **_: Any) -> None:
        # Measured now, with the models warm and the pool's threads started (worker/memory.py).
        bound_memory(settings.worker_memory_headroom_mb)
        print(f"{READY_LINE}: {hostname} serving {', '.join(names)}", flush=True)

    worker = app.Worker(
        hostname=hostname,
        pool_cls="solo",
        concurrency=concurrency,
        queues=[queue_name(name, lane) for lane in LANES for name in names],
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        task_events=settings.task_events,
    )
    try:
        worker.start()
    finally:
        stop_beating()
        if pruning is not None:
            pruning.set()
        if sweeper is not None:
            sweeper.stop()
        for model in served.values():
            model.batcher.stop()
        runner.close()
        runner.media.close()
    return int(worker.exitcode or 0)


def _sweeper(
    settings: Settings, records: JobRecords, app: Celery, lanes: list[tuple[str, str]]
) -> LostJobSweeper | None:
    """On a Redis broker, re-publish jobs whose message kombu lost (worker/sweeper.py). Grace: a
    dead worker's unacked jobs come back within a lease and a restore sweep, so a job still queued
    after two of each, on an empty queue, had its message lost."""
    if not isinstance(records, RedisRecords) or not (settings.broker_url or "").startswith("redis"):
        return None
    sweeper = LostJobSweeper(
        records,
        redis.Redis.from_url(settings.broker_url or ""),
        partial(send_jobs, app),
        lanes,
        app.conf.broker_transport_options,
        grace_s=2 * (settings.lease_s + settings.unacked_restore_interval_s),
    )
    return sweeper.start(interval_s=max(1.0, settings.lease_s / 2))


def _beat(
    ledger: QueueLedger | None,
    hostname: str,
    lanes: list[tuple[str, str]],
    served: dict[str, ServedModel],
    interval_s: float,
) -> Any:
    """Publish this worker's lanes and measured rates every `interval_s` (what admission control
    and `pipeq_backlog_without_capacity` read); returns the function that stops it."""
    stopped = threading.Event()
    if ledger is None:
        return stopped.set

    def loop() -> None:
        while True:
            rates = {
                name: m.hooks.items_per_s
                for name, m in served.items()
                if m.hooks is not None and m.hooks.items_per_s
            }
            try:
                ledger.beat(hostname, lanes, rates)
            except RedisError as exc:
                log.warning("heartbeat not written: %r", exc)
            if stopped.wait(interval_s):
                break
        try:
            ledger.leave(hostname, lanes)
        except RedisError:
            pass

    thread = threading.Thread(target=loop, name="ledger-beat", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)

    return stop
