"""One engine per GPU: planning on fake device lists, and real pinned engines on the CPU (one
forward process per GPU, fronts that feed it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from transformers import pipeline

from pipeq.config.celery import make_celery
from pipeq.config.errors import ConfigError
from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client
from pipeq.worker.launch import (
    WorkerPlan,
    forward_command,
    front_command,
    plan_workers,
    visible_gpus,
)

PAIR_DB = 13  # its own broker database: only the pair below takes these jobs


def test_plans() -> None:
    assert plan_workers("auto", ["0", "1"]) == [
        WorkerPlan("gpu0@%h", "0"),
        WorkerPlan("gpu1@%h", "1"),
    ]
    assert plan_workers("1", ["0", "1"]) == [WorkerPlan("gpu1@%h", "1")]
    assert plan_workers("auto", []) == [WorkerPlan("cpu@%h", None)]
    assert plan_workers("cpu", ["0"]) == [WorkerPlan("cpu@%h", None)]
    assert plan_workers("cpu", [], procs_per_gpu=2) == [
        WorkerPlan("cpu-0@%h", None),
        WorkerPlan("cpu-1@%h", None),
    ]
    # auto: the cores per GPU less two; one front on the CPU.
    assert len(plan_workers("auto", ["0", "1"], procs_per_gpu=None, cpus=32)) == 2 * 14
    assert len(plan_workers("0", ["0"], procs_per_gpu=None, cpus=2)) == 1
    assert plan_workers("cpu", [], procs_per_gpu=None, cpus=16) == [WorkerPlan("cpu@%h", None)]
    assert [p.hostname for p in plan_workers("0", ["0"], procs_per_gpu=2)] == [
        "gpu0-0@%h",
        "gpu0-1@%h",
    ]
    with pytest.raises(ConfigError, match="GPU.*2.*not visible"):
        plan_workers("0,2", ["0", "1"])
    # One engine over two GPUs (a device_map: auto model): its forward process sees both.
    assert plan_workers("0+1", ["0", "1"]) == [WorkerPlan("gpu0+1@%h", "0,1")]
    assert forward_command("0,1", [], "/run/gpu0,1.sock")[1]["CUDA_VISIBLE_DEVICES"] == "0,1"
    with pytest.raises(ConfigError, match="GPU.*2.*not visible"):
        plan_workers("0+2", ["0", "1"])


def test_visible_gpus_honours_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_only_the_forward_process_sees_its_gpu() -> None:
    command, env = forward_command("3", ["--concurrency", "8"], "/run/gpu3.sock")
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert command[-4:] == ["--role", "forward", "--socket", "/run/gpu3.sock"]
    plan = WorkerPlan("gpu3@%h", "3")
    command, env = front_command(plan, ["--concurrency", "8"], 9400, "/run/gpu3.sock")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PIPEQ_METRICS_PORT"] == "9400"
    assert command[-6:] == ["--role", "front", "--socket", "/run/gpu3.sock", "--name", "gpu3@%h"]


def test_fronts_share_the_cores_for_ocr(monkeypatch: pytest.MonkeyPatch) -> None:
    """14 fronts each running 16 Tesseracts at once on 16 cores timed pages out (bench/docqa.py):
    the launcher gives each front twice its share of the cores, one OpenMP thread a page, unless
    the operator chose."""
    plan = WorkerPlan("gpu0-1@%h", "0")
    monkeypatch.delenv("PIPEQ_OCR_CONCURRENCY", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    _, env = front_command(plan, [], 9400, "/run/gpu0.sock", fronts=5)
    assert env["PIPEQ_OCR_CONCURRENCY"] == "7" and env["OMP_THREAD_LIMIT"] == "1"
    assert Settings(_env_file=None).ocr_concurrency is None
    _, env = front_command(plan, [], 9400, "/run/gpu0.sock", fronts=64)
    assert env["PIPEQ_OCR_CONCURRENCY"] == "1"
    monkeypatch.setenv("PIPEQ_OCR_CONCURRENCY", "7")
    _, env = front_command(plan, [], 9400, "/run/gpu0.sock", fronts=5)
    assert env["PIPEQ_OCR_CONCURRENCY"] == "7"
    assert Settings(_env_file=None).ocr_concurrency == 7


def test_one_pinned_worker_per_gpu(
    worker_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    """Two fake GPUs on this CPU machine: the launcher starts two pinned engines, each a forward
    process and a Celery front named after its GPU consuming every model's queues; SIGTERM stops
    all four."""
    log = tmp_path / "launcher.log"
    env = {**os.environ, **worker_env, "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONUNBUFFERED": "1"}
    args = ["worker", "--gpus", "auto", "--models", "tiny-sentiment", "--concurrency", "4"]
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pipeq.cli", *args],
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


def test_two_fronts_feed_one_forward_process(
    start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    """`--procs-per-gpu 2`: two Celery fronts, one process holding the model; both fronts' jobs
    are answered as `pipeline()` answers them."""
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{PAIR_DB}"
    redis.Redis.from_url(broker).flushdb()
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    worker = start_worker(
        "--models",
        "tiny-sentiment",
        "--procs-per-gpu",
        "2",
        "--concurrency",
        "4",
        name="pair{proc}@%h",
        env={"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker},
    )
    deadline = time.monotonic() + 120  # start_worker waits for the first front's ready line only
    while worker.log_path.read_text().count("pipeq worker ready") < 2:
        assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
        time.sleep(0.1)
    roles = [" ".join(c.cmdline()) for c in psutil.Process(worker.proc.pid).children()]
    assert sum("--role forward" in r for r in roles) == 1
    assert sum("--role front" in r for r in roles) == 2
    texts = [f"text {i} " + "good " * (i % 11) for i in range(120)]
    requests = [JobRequest(model="tiny-sentiment", inputs=[text]) for text in texts]
    ids = [doc.id for doc, _ in own.submit_many(requests)]
    docs = [own.wait(job_id, timeout_s=120) for job_id in ids]
    host = os.uname().nodename
    assert {d.worker for d in docs} == {f"pair0@{host}", f"pair1@{host}"}
    (spec,) = load_registry(settings.models).select(["tiny-sentiment"])
    pipe = pipeline(spec.task, model=spec.model)
    for text, doc in zip(texts[:20], docs[:20], strict=True):
        want = pipe(text)
        assert doc.outputs is not None and doc.outputs[0][0]["label"] == want[0]["label"]
        assert abs(doc.outputs[0][0]["score"] - want[0]["score"]) < 1e-4
