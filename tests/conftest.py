"""Fixtures: the real Redis on 127.0.0.1:6379, tiny offline models, real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeq.config.settings import Settings
from pipeq.producer.client import Client

REDIS = os.environ.get("TEST_REDIS", "redis://127.0.0.1:6379")
BROKER_DB, RESULT_DB = 14, 15
READY_LINE = "pipeq worker ready"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeq.cli.demo import write_demo_registry

    root = tmp_path_factory.mktemp("models")
    write_demo_registry(root)
    return root


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


def flush_redis() -> None:
    for db in (BROKER_DB, RESULT_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()


@pytest.fixture(scope="session")
def worker_env(model_dir: Path, media_dir: Path) -> dict[str, str]:
    """PIPEQ_* variables shared by the test's own Client and the worker processes."""
    flush_redis()
    return {
        "PIPEQ_BROKER_URL": f"{REDIS}/{BROKER_DB}",
        "PIPEQ_RESULT_URL": f"{REDIS}/{RESULT_DB}",
        "PIPEQ_MODELS": str(model_dir / "models.yaml"),
        "PIPEQ_MEDIA_ROOTS": str(media_dir),
        "PIPEQ_VISIBILITY_TIMEOUT": "8",
        "PIPEQ_UNACKED_RESTORE_INTERVAL_S": "1",
        "PIPEQ_LOG_LEVEL": "WARNING",
        "PIPEQ_METRICS_PORT": "0",
    }


@pytest.fixture(scope="session")
def settings(worker_env: dict[str, str], monkeypatch_session: pytest.MonkeyPatch) -> Settings:
    for key, value in worker_env.items():
        monkeypatch_session.setenv(key, value)
    return Settings()


@pytest.fixture(scope="session")
def monkeypatch_session() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="session")
def client(settings: Settings) -> Client:
    return Client(settings)


class WorkerProcess:
    """`pipeq worker` as a real subprocess: started, awaited until ready, signalled."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq.cli", "worker", "--gpus", "cpu", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_LINE in self.log_path.read_text():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"worker did not become ready:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._log.close()
        return code


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[object]:
    started: list[WorkerProcess] = []

    def start(*args: str, name: str = "cpu@%h", env: dict[str, str] | None = None) -> WorkerProcess:
        log_path = tmp_path / f"worker{len(started)}.log"
        worker = WorkerProcess({**worker_env, **(env or {})}, log_path, "--name", name, *args)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.stop(signal.SIGKILL, timeout_s=10)


@pytest.fixture(scope="session")
def session_worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker serving every tiny model, shared by the tests that only read results."""
    log_path = tmp_path_factory.mktemp("logs") / "session-worker.log"
    worker = WorkerProcess(worker_env, log_path, "--name", "session@%h", "--concurrency", "32")
    worker.wait_ready()
    yield worker
    worker.stop()


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by .ci/setup; never `playwright install`
# Without the background-networking flags Chromium keeps dialling Google on this closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright (browser tests of Flower and the Gradio page)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def s3_server(monkeypatch_session: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on loopback (server mode: real HTTP, real boto3); yields its endpoint.
    Modules create the buckets they need."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch_session.setenv(key, "testing")
    monkeypatch_session.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
