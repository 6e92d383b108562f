"""`pipeq worker --gpus auto|cpu|0,1|0+1`: one engine per GPU (or per group of GPUs joined by
`+`, or one on the CPU), supervised.

An engine is one forward process, pinned with CUDA_VISIBLE_DEVICES before Python in it touches
CUDA and the only holder of that GPU's models (worker/forward_server.py), and `--procs-per-gpu`
fronts: Celery consumers named after the GPU (`gpu1@host`, `gpu1-0@host`...) that take jobs,
prepare their inputs, hand the parts to the forward process, and store the results
(worker/serve.py). This process starts them, forwards SIGTERM/SIGINT, restarts a child that dies
on its own, and takes its children with it if it is killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client
from types import FrameType

from pipeq.config.errors import ConfigError

log = logging.getLogger(__name__)

# `pipeq worker`'s exit code when its models cannot load: restarting it would not help.
CANNOT_START = 2

_PR_SET_PDEATHSIG = 1


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
    gpus: str,
    visible: list[str],
    name: str | None = None,
    procs_per_gpu: int | None = 1,
    cpus: int | None = None,
) -> list[WorkerPlan]:
    """Which fronts `--gpus` asks for, given the GPUs this process can see.

    Several fronts per GPU let more cores take, prepare and store jobs for the one forward
    process of that GPU: per-job Python work, not the forward pass, is the limit of one front.
    `procs_per_gpu=None` (`--procs-per-gpu auto`): one front on the CPU; on GPUs, the host's
    cores shared between them, less two per GPU (its forward process, and Redis and the OS).
    """
    if gpus == "cpu" or (gpus == "auto" and not visible):
        count = procs_per_gpu or 1
        template = name or ("cpu@%h" if count == 1 else "cpu-{proc}@%h")
        return [WorkerPlan(template.format(proc=proc), None) for proc in range(count)]
    # "0+1": one engine over GPUs 0 and 1, whose forward process sees both (a `device_map: auto`
    # model placed over them).
    wanted = visible if gpus == "auto" else [g.strip() for g in gpus.split(",") if g.strip()]
    unknown = [gpu for group in wanted for gpu in group.split("+") if gpu not in visible]
    if unknown or not wanted:
        raise ConfigError(
            f"--gpus {gpus}: GPU(s) {', '.join(unknown) or '(none)'} not visible; "
            f"visible: {', '.join(visible) or 'none (use --gpus cpu)'}"
        )
    if procs_per_gpu is None:
        procs_per_gpu = max(1, (cpus or os.cpu_count() or 1) // len(wanted) - 2)
    template = name or ("gpu{gpu}@%h" if procs_per_gpu == 1 else "gpu{gpu}-{proc}@%h")
    return [
        WorkerPlan(template.format(gpu=group, proc=proc), group.replace("+", ","))
        for group in wanted
        for proc in range(procs_per_gpu)
    ]


def front_command(
    plan: WorkerPlan, argv: list[str], metrics_port: int, socket: str, fronts: int = 1
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one front: the same `pipeq worker` invocation as a Celery
    consumer named after its GPU, which hands its parts to the forward process at `socket`. A
    front never touches CUDA. Unless the operator set PIPEQ_OCR_CONCURRENCY, each front may run
    Tesseract twice its share of the host's cores at once, one thread per page: unbounded (16 a
    front, OpenMP threads each) pages outran the OCR timeout, and a share of exactly one left
    cores idle, as claims do not spread pages evenly over the fronts."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PIPEQ_METRICS_PORT": str(metrics_port)}
    env.setdefault("PIPEQ_OCR_CONCURRENCY", str(max(1, -(-2 * (os.cpu_count() or 1) // fronts))))
    env.setdefault("OMP_THREAD_LIMIT", "1")
    command = [sys.executable, "-m", "pipeq.cli", "worker", *argv, "--role", "front"]
    command += ["--socket", socket, "--name", plan.hostname]
    return command, env


def forward_command(
    gpu: str | None, argv: list[str], socket: str
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of the forward process of `gpu` (None: the CPU), the only
    process that sees that GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else ""}
    command = [sys.executable, "-m", "pipeq.cli", "worker", *argv, "--role", "forward"]
    return command + ["--socket", socket], env


def _die_with_parent() -> None:
    # A SIGKILLed supervisor takes its engine with it, as a one-process worker would die: its
    # jobs come back through their leases, none keeps running unsupervised.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509


def _listening(socket: str) -> bool:
    try:
        Client(socket, family="AF_UNIX").close()
    except OSError:
        return False
    return True


@dataclass
class _Engine:
    """One GPU's (or the CPU's) forward process and its fronts."""

    gpu: str | None
    socket: str
    plans: list[WorkerPlan] = field(default_factory=list)
    forward: subprocess.Popen[bytes] | None = None
    fronts: dict[WorkerPlan, subprocess.Popen[bytes]] = field(default_factory=dict)


def supervise(
    plans: list[WorkerPlan], argv: list[str], metrics_port: int, restart_delay_s: float = 5.0
) -> int:
    """Run one engine per GPU in `plans`: its forward process, then one front per plan (metrics
    ports `metrics_port` + the plan's index; 0 = off). A process that dies is restarted; fronts
    resend their unanswered parts to a restarted forward process. SIGTERM stops the fronts
    first (they finish their jobs through the forward process), then the forward processes."""
    ports = {plan: metrics_port and metrics_port + i for i, plan in enumerate(plans)}
    engines = _plan_engines(plans)
    if not _start_engines(engines, argv, ports):
        return CANNOT_START
    stopping = False

    def forward_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for engine in engines.values():
            for child in engine.fronts.values():
                if child.poll() is None:
                    child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    while True:
        fronts = [child for engine in engines.values() for child in engine.fronts.values()]
        if stopping and all(child.poll() is not None for child in fronts):
            _stop_all(engines)
            return max(child.returncode for child in fronts)
        if not stopping:
            _restart_dead(engines, argv, ports, restart_delay_s)
        time.sleep(0.5)


def _plan_engines(plans: list[WorkerPlan]) -> dict[str | None, _Engine]:
    folder = tempfile.mkdtemp(prefix="pipeq-engine-")
    engines: dict[str | None, _Engine] = {}
    for plan in plans:
        socket = os.path.join(folder, f"gpu{plan.gpu or 'cpu'}.sock")
        engines.setdefault(plan.gpu, _Engine(plan.gpu, socket)).plans.append(plan)
    return engines


def _start_engines(
    engines: dict[str | None, _Engine], argv: list[str], ports: dict[WorkerPlan, int]
) -> bool:
    """Start every forward process, and once each listens, its fronts."""
    for engine in engines.values():
        engine.forward = _start(*forward_command(engine.gpu, argv, engine.socket))
    for engine in engines.values():
        if not _wait_listening(engine):
            log.error("the forward process for %s could not start", engine.gpu or "the CPU")
            _stop_all(engines)
            return False
    for engine in engines.values():
        for plan in engine.plans:
            engine.fronts[plan] = _start(
                *front_command(plan, argv, ports[plan], engine.socket, len(ports))
            )
    return True


def _wait_listening(engine: _Engine) -> bool:
    assert engine.forward is not None
    while not _listening(engine.socket):
        if engine.forward.poll() is not None:
            return False
        time.sleep(0.2)
    return True


def _restart_dead(
    engines: dict[str | None, _Engine],
    argv: list[str],
    ports: dict[WorkerPlan, int],
    restart_delay_s: float,
) -> None:
    for engine in engines.values():
        assert engine.forward is not None
        code = engine.forward.poll()
        if code is not None:
            log.error("forward process for %s exited with %s; restarting", engine.gpu, code)
            engine.forward = _start(*forward_command(engine.gpu, argv, engine.socket))
        for plan, child in list(engine.fronts.items()):
            code = child.poll()
            if code is not None:
                log.error(
                    "worker %s exited with %s; restarting in %.0f s",
                    plan.hostname,
                    code,
                    restart_delay_s,
                )
                time.sleep(restart_delay_s)
                engine.fronts[plan] = _start(
                    *front_command(plan, argv, ports[plan], engine.socket, len(ports))
                )


def _stop_all(engines: dict[str | None, _Engine]) -> None:
    children = [e.forward for e in engines.values() if e.forward is not None]
    children += [c for e in engines.values() for c in e.fronts.values()]
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
