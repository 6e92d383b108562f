"""`pipeq up`: the API in this process, workers (and Flower, where installed) beside it."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys

import uvicorn

from pipeq.config.celery import broker_folder
from pipeq.config.settings import Settings
from pipeq.producer.api import create_app

_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    # uvicorn re-raises the SIGTERM it caught once it has shut down, which ends this process
    # before a `finally` could stop the children: the kernel tells them instead (Linux).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_up(settings: Settings, host: str, port: int, gpus: str) -> int:
    pipeq = [sys.executable, "-m", "pipeq.cli"]
    commands = [[*pipeq, "worker", "--gpus", gpus]]
    if importlib.util.find_spec("flower") is not None:
        commands.append([*pipeq, "flower"])
    children = [
        subprocess.Popen(command, env=dict(os.environ), preexec_fn=_stop_with_parent)
        for command in commands
    ]
    broker = settings.broker_url or f"embedded ({broker_folder(settings)})"
    print(f"pipeq up: API on http://{host}:{port}, broker {broker}", flush=True)
    try:
        uvicorn.run(create_app(), host=host, port=port, log_level="info")
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(60)
    return 0
