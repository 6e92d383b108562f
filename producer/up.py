"""`pipeq up`: the API in this process, workers (and Flower, where installed) beside it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import uvicorn

from config.settings import Settings
from producer.api import create_app


def run_up(settings: Settings, host: str, port: int, gpus: str) -> int:
    pipeq = [sys.executable, "-m", "producer.cli"]
    children = [subprocess.Popen([*pipeq, "worker", "--gpus", gpus], env=dict(os.environ))]
    if importlib.util.find_spec("flower") is not None:
        children.append(subprocess.Popen([*pipeq, "flower"], env=dict(os.environ)))
    broker = settings.broker_url or f"embedded ({settings.data_dir / 'broker'})"
    print(f"pipeq up: API on http://{host}:{port}, broker {broker}", flush=True)
    try:
        uvicorn.run(create_app(), host=host, port=port, log_level="info")
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(60)
    return 0
