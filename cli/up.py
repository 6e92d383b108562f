"""`pipeq up`: the API in this process; the workers, the webhook sender and (where installed)
Flower beside it, supervised. A child that exits is started again after a backoff, said in the
log; a worker that cannot start (its models cannot load) stops `up`, which says why and exits
non-zero, rather than an API that accepts jobs nobody will run."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import uvicorn

from pipeq.config.celery import broker_folder
from pipeq.config.settings import Settings
from pipeq.producer.api import create_app
from pipeq.worker.launch import CANNOT_START

_PR_SET_PDEATHSIG = 1
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
WATCH_EVERY_S = 0.5
CANNOT_START_HINT = (
    "pipeq up: the worker could not start (its error is above). A model that cannot be loaded "
    "offline needs a local registry: point PIPEQ_MODELS at one, such as the one `pipeq demo` "
    "writes (it prints the command)."
)


def _stop_with_parent() -> None:
    # uvicorn re-raises the SIGTERM it caught once it has shut down, which ends this process
    # before a `finally` could stop the children: the kernel tells them instead (Linux).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, env=dict(os.environ), preexec_fn=_stop_with_parent
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def backoff_s(self) -> float:
        return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**self.restarts))


def children(settings: Settings, gpus: str) -> list[Child]:
    pipeq = [sys.executable, "-m", "pipeq.cli"]
    started = [Child("worker", [*pipeq, "worker", "--gpus", gpus])]
    if not settings.webhook_secret:
        print("pipeq up: webhooks are not sent: set PIPEQ_WEBHOOK_SECRET", file=sys.stderr)
    elif not settings.effective_result_url.startswith(("redis://", "rediss://")):
        print(
            "pipeq up: webhooks are not sent on the embedded broker (their retries and dead "
            "letters live in Redis): set PIPEQ_BROKER_URL=redis://...",
            file=sys.stderr,
        )
    else:
        started.append(Child("webhooks", [*pipeq, "webhooks", "worker"]))
    if importlib.util.find_spec("flower") is not None:
        started.append(Child("flower", [*pipeq, "flower"]))
    return started


def watch(started: list[Child], server: uvicorn.Server, failures: list[str]) -> None:
    """Start again each child that exits, after its backoff; a worker that cannot start stops
    the server (the reason goes to `failures`)."""
    while not server.should_exit:
        now = time.monotonic()
        for child in started:
            assert child.proc is not None
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if code == CANNOT_START:
                # Its settings or models are wrong: starting it again would fail the same way.
                hint = CANNOT_START_HINT if child.name == "worker" else ""
                failures.append(
                    hint or f"pipeq up: {child.name} could not start (its error is above)"
                )
                server.should_exit = True
                return
            if now - child.started_at > BACKOFF_MAX_S:
                child.restarts = 0  # it ran a while: a fresh failure starts the backoff over
            delay_s = child.backoff_s()
            child.restarts += 1
            child.restart_at = now + delay_s
            print(
                f"pipeq up: {child.name} exited with {code}; starting it again in {delay_s:g} s",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(WATCH_EVERY_S)


def run_up(settings: Settings, host: str, port: int, gpus: str) -> int:
    started = children(settings, gpus)
    for child in started:
        child.start()
    server = uvicorn.Server(uvicorn.Config(create_app(), host=host, port=port, log_level="info"))
    failures: list[str] = []
    watcher = threading.Thread(
        target=watch, args=(started, server, failures), name="up-watch", daemon=True
    )
    watcher.start()
    broker = settings.broker_url or f"embedded ({broker_folder(settings)})"
    print(f"pipeq up: API on http://{host}:{port}, broker {broker}", flush=True)
    try:
        server.run()
    finally:
        server.should_exit = True
        for child in started:
            child.stop()
        for child in started:
            if child.proc is not None:
                child.proc.wait(60)
    if failures:
        print(failures[0], file=sys.stderr, flush=True)
        return 1
    return 0
