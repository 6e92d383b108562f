"""`pipeq worker --gpus auto|cpu|0,1`: one worker process per GPU, each pinned with
CUDA_VISIBLE_DEVICES before Python in it touches CUDA, each named after its GPU (`gpu1@host`).

With one GPU (or the CPU) the worker runs in this process; with several, this process supervises
one child per GPU, forwards SIGTERM/SIGINT to them, and restarts a child that dies on its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from config.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    hostname: str
    gpu: str | None  # None: the CPU


def visible_gpus(env: dict[str, str]) -> list[str]:
    """GPU indices this process may use, without initialising CUDA (a forked or pinned child
    must be the first to do that)."""
    pinned = env.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [gpu.strip() for gpu in pinned.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


def plan_workers(
    gpus: str, visible: list[str], name: str | None = None, procs_per_gpu: int = 1
) -> list[WorkerPlan]:
    """Which worker processes `--gpus` asks for, given the GPUs this process can see.

    Several processes per GPU (each with its own copy of the models) let more cores feed one GPU
    when per-job Python work, not the forward pass, is the limit; the GPU interleaves their batches.
    """
    if gpus == "cpu" or (gpus == "auto" and not visible):
        return [WorkerPlan(name or "cpu@%h", None)]
    wanted = visible if gpus == "auto" else [g.strip() for g in gpus.split(",") if g.strip()]
    unknown = [gpu for gpu in wanted if gpu not in visible]
    if unknown or not wanted:
        raise ConfigError(
            f"--gpus {gpus}: GPU(s) {', '.join(unknown) or '(none)'} not visible; "
            f"visible: {', '.join(visible) or 'none (use --gpus cpu)'}"
        )
    template = name or ("gpu{gpu}@%h" if procs_per_gpu == 1 else "gpu{gpu}-{proc}@%h")
    return [
        WorkerPlan(template.format(gpu=gpu, proc=proc), gpu)
        for gpu in wanted
        for proc in range(procs_per_gpu)
    ]


def child_command(
    plan: WorkerPlan, argv: list[str], metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one pinned child: the same `pipeq worker` invocation
    restricted to its GPU, which inside the child is the only one visible."""
    assert plan.gpu is not None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": plan.gpu, "PIPEQ_METRICS_PORT": str(metrics_port)}
    command = [sys.executable, "-m", "producer.cli", "worker", *argv, "--gpus", plan.gpu]
    command += ["--procs-per-gpu", "1", "--name", plan.hostname]
    return command, env


def supervise(
    plans: list[WorkerPlan], argv: list[str], metrics_port: int, restart_delay_s: float = 5.0
) -> int:
    """Run one child per plan; metrics ports are `metrics_port` + the plan's index (0 = off)."""
    ports = {plan: metrics_port and metrics_port + i for i, plan in enumerate(plans)}

    def start(plan: WorkerPlan) -> subprocess.Popen[bytes]:
        command, env = child_command(plan, argv, ports[plan])
        return subprocess.Popen(command, env=env)

    children = {plan: start(plan) for plan in plans}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        for plan, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping:
                log.error(
                    "worker %s exited with %s; restarting in %.0f s",
                    plan.hostname,
                    code,
                    restart_delay_s,
                )
                time.sleep(restart_delay_s)
                children[plan] = start(plan)
        if stopping and all(child.poll() is not None for child in children.values()):
            return max(child.returncode for child in children.values())
        time.sleep(0.5)
