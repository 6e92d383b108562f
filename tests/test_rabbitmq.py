"""The core end-to-end tests again, with RabbitMQ (amqp://guest:guest@127.0.0.1:5672//) as the
broker and the job records in Redis: every task's answer equals pipeline(), 50 concurrent jobs
never cross-wire, bad inputs fail alone, and a SIGKILLed worker's unacked jobs are back in the
queue at once (no visibility timeout), so no queued job is lost.

The module overrides the `settings`, `client` and `session_worker` fixtures, so the tests
imported from test_end_to_end run here against a worker on RabbitMQ. The shared RabbitMQ has no
vhost of pipeq's own: the module deletes pipeq's queues and exchanges before it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kombu import Connection

from pipeq.config.celery import make_celery
from pipeq.config.errors import ConfigError
from pipeq.config.queues import LANES, WEBHOOK_QUEUE, queue_name
from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from tests.conftest import WorkerProcess
from tests.test_end_to_end import (  # noqa: F401 - collected here, with this module's fixtures
    TestEveryTaskMatchesPipeline,
    media,
    test_bad_inputs_fail_alone,
    test_fifty_concurrent_jobs_each_get_their_own_answer,
)

AMQP = os.environ.get("TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
# A model only the kill test's workers serve, so the module's worker never takes its jobs.
KILL_MODEL = "kill-sentiment"
AMQP_WORKER = f"amqp@{socket.gethostname()}"


@pytest.fixture(scope="module")
def amqp_env(
    worker_env: dict[str, str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    registry = yaml.safe_load((model_dir / "models.yaml").read_text())
    registry["models"][KILL_MODEL] = registry["models"]["tiny-sentiment"]
    path = tmp_path_factory.mktemp("amqp") / "models.yaml"
    path.write_text(yaml.safe_dump(registry))
    names = list(registry["models"])
    with Connection(AMQP) as conn:
        channel = conn.channel()
        for name in [queue_name(m, lane) for m in names for lane in LANES] + [
            WEBHOOK_QUEUE,
            "pipeq.default",
        ]:
            channel.queue_delete(name)
            channel.exchange_delete(name)
    # Job records stay in the suite's Redis (PIPEQ_RESULT_URL), ids are unique per job.
    return {**worker_env, "PIPEQ_BROKER_URL": AMQP, "PIPEQ_MODELS": str(path)}


@pytest.fixture(scope="module")
def settings(amqp_env: dict[str, str]) -> Iterator[Settings]:
    patch = pytest.MonkeyPatch()
    for key, value in amqp_env.items():
        patch.setenv(key, value)
    yield Settings()
    patch.undo()


@pytest.fixture(scope="module")
def client(settings: Settings) -> Client:
    return Client(settings)


@pytest.fixture(scope="module")
def victim(
    amqp_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """The kill test's worker, started with the module's worker so their start-ups overlap."""
    log_path = tmp_path_factory.mktemp("logs") / "victim.log"
    worker = WorkerProcess(
        amqp_env, log_path, "--name", "victim@%h", "--concurrency", "4", "--models", KILL_MODEL
    )
    yield worker
    if worker.proc.poll() is None:
        worker.stop(signal.SIGKILL, timeout_s=10)


@pytest.fixture(scope="module")
def session_worker(
    amqp_env: dict[str, str],
    victim: WorkerProcess,
    client: Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("logs") / "amqp-worker.log"
    worker = WorkerProcess(amqp_env, log_path, "--name", "amqp@%h", "--concurrency", "32")
    worker.wait_ready()
    # It serves KILL_MODEL but does not consume its queue until the kill test hands it over
    # (the queue is empty until then, so nothing can slip through).
    replies = client.celery.control.cancel_consumer(
        queue_name(KILL_MODEL, "interactive"), destination=[AMQP_WORKER], reply=True, timeout=10
    )
    assert replies, "the worker did not answer the cancel_consumer request"
    yield worker
    worker.stop()


def test_queues_are_durable_quorum_queues(session_worker: WorkerProcess, client: Client) -> None:
    """The worker declared its lanes as quorum queues; the producer's own declaration of the same
    queue (same arguments) is accepted, and publisher confirms are on."""
    assert client.celery.conf.broker_transport_options == {"confirm_publish": True}
    queue = client.celery.amqp.queues[queue_name("tiny-vit", "interactive")]
    assert queue.queue_arguments == {"x-queue-type": "quorum"} and queue.durable
    with Connection(AMQP) as conn:
        channel = conn.channel()
        # A passive declaration with other arguments than the queue's would close the channel.
        queue.bind(channel).declare()
        name, _, consumers = channel.queue_declare(queue.name, passive=True)
        assert consumers == 1
        # RabbitMQ refuses to redeclare it as another type: proof that it is a quorum queue.
        with pytest.raises(Exception, match="PRECONDITION_FAILED"):
            conn.channel().queue_declare(
                queue.name, durable=True, arguments={"x-queue-type": "classic"}
            )


def test_amqp_without_result_url_is_a_config_error(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="PIPEQ_RESULT_URL"):
        Settings(broker_url=AMQP, result_url=None)


def test_no_queue_depth_metrics_and_no_crash_on_amqp(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from pipeq.producer.api import create_app

    with TestClient(create_app(Client(settings))) as http:
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert "pipeq_queue_depth{" not in metrics.text


def test_sigkilled_worker_jobs_return_at_once(
    session_worker: WorkerProcess, victim: WorkerProcess, client: Client
) -> None:
    queue = queue_name(KILL_MODEL, "interactive")
    victim.wait_ready()
    ids = [client.submit(KILL_MODEL, [f"text {i} " * (i % 20 + 1)]) for i in range(300)]
    while client.get(ids[0]).status != "succeeded":
        time.sleep(0.01)
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    not_done = sum(not client.get(job_id).done for job_id in ids)
    assert not_done > 0
    # Everything the victim held unacked is ready again as soon as RabbitMQ sees its connection
    # drop (a killed process's socket closes at once): no visibility timeout to wait out.
    with Connection(AMQP) as conn:
        channel = conn.channel()
        while True:
            ready = channel.queue_declare(queue, passive=True).message_count
            if ready >= not_done or time.monotonic() - killed_at > 3:
                break
            time.sleep(0.05)
    assert ready >= not_done, f"{ready} ready after the kill, {not_done} jobs unfinished"
    # The module's worker takes the queue over and finishes every job.
    assert client.celery.control.add_consumer(
        queue, destination=[AMQP_WORKER], reply=True, timeout=10
    )
    docs = [client.wait(job_id, timeout_s=60) for job_id in ids]
    assert [d.status for d in docs] == ["succeeded"] * len(ids)


def test_flower_app_on_amqp(settings: Settings) -> None:
    """`pipeq flower` builds its app the same way: the lanes it lists are the quorum queues."""
    app = make_celery(settings)
    from pipeq.config.celery import model_queues

    app.conf.task_queues = model_queues(["tiny-vit"])
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} for q in app.amqp.queues.values())
