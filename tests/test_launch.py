"""One worker process per GPU: planning on fake device lists, and real pinned children on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.celery import make_celery
from config.errors import ConfigError
from config.settings import Settings
from worker.launch import WorkerPlan, child_command, plan_workers, visible_gpus


def test_plans() -> None:
    assert plan_workers("auto", ["0", "1"]) == [
        WorkerPlan("gpu0@%h", "0"),
        WorkerPlan("gpu1@%h", "1"),
    ]
    assert plan_workers("1", ["0", "1"]) == [WorkerPlan("gpu1@%h", "1")]
    assert plan_workers("auto", []) == [WorkerPlan("cpu@%h", None)]
    assert plan_workers("cpu", ["0"]) == [WorkerPlan("cpu@%h", None)]
    assert [p.hostname for p in plan_workers("0", ["0"], procs_per_gpu=2)] == [
        "gpu0-0@%h",
        "gpu0-1@%h",
    ]
    with pytest.raises(ConfigError, match="GPU.*2.*not visible"):
        plan_workers("0,2", ["0", "1"])


def test_visible_gpus_honours_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_child_is_pinned_to_its_gpu() -> None:
    command, env = child_command(WorkerPlan("gpu3@%h", "3"), ["--concurrency", "8"], 9400)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["PIPEQ_METRICS_PORT"] == "9400"
    assert command[-6:] == ["--gpus", "3", "--procs-per-gpu", "1", "--name", "gpu3@%h"]


def test_one_pinned_worker_per_gpu(
    worker_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    """Two fake GPUs on this CPU machine: the launcher starts two pinned children, each a
    Celery worker named after its GPU and consuming every model's queues; SIGTERM stops both."""
    log = tmp_path / "launcher.log"
    env = {**os.environ, **worker_env, "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONUNBUFFERED": "1"}
    args = ["worker", "--gpus", "auto", "--models", "tiny-sentiment", "--concurrency", "4"]
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while log.read_text().count("pipeq worker ready") < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        replies = make_celery(settings).control.inspect(timeout=5).active_queues() or {}
        host = os.uname().nodename
        pinned = {
            name: sorted(q["name"] for q in queues)
            for name, queues in replies.items()
            if name.startswith("gpu")
        }
        expected = ["pipeq.tiny-sentiment.bulk", "pipeq.tiny-sentiment.interactive"]
        assert pinned == {f"gpu0@{host}": expected, f"gpu1@{host}": expected}
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    assert log.read_text().count("pipeq worker ready") == 2
