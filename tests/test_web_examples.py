"""The examples a web team copies (docs/examples/), run as written against a real API, worker and
webhook sender: the FastAPI app under uvicorn, the Django views through Django's test client.
Both wait for an answer, and both answer 202 and take the result on their signed webhook."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import uvicorn

from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from tests.test_api import serve
from tests.test_results_and_webhooks import running_webhooks_worker

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SECRET = "whsec_" + base64.b64encode(b"pipeq-examples-secret-012").decode()
MODEL = "tiny-sentiment"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pipeq_api(
    settings: Settings,
    session_worker: object,
    worker_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The real API (loopback webhooks allowed) and a webhook sender signing with SECRET."""
    opened = settings.model_copy(update={"allow_private_urls": True, "webhook_secret": SECRET})
    env = {
        **worker_env,
        "PIPEQ_WEBHOOK_SECRET": SECRET,
        "PIPEQ_ALLOW_PRIVATE_URLS": "true",
    }
    log = tmp_path_factory.mktemp("examples") / "webhooks.log"
    with running_webhooks_worker(env, log, concurrency=4):
        for http in serve(Client(opened)):
            yield str(http.base_url)


def _serve_app(app: object, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server


def _until(condition: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_fastapi_example(pipeq_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PIPEQ_API_URL": pipeq_api,
        "PIPEQ_WEBHOOK_SECRET": SECRET,
        "REVIEWS_MODEL": MODEL,
    }.items():
        monkeypatch.setenv(name, value)
    example = _load("fastapi_app")
    port = _free_port()
    server = _serve_app(example.app, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as backend:
            scored = backend.post("/reviews/score", json={"text": "what a wonderful film"})
            assert scored.status_code == 200, scored.text
            assert scored.json()["labels"][0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}
            queued = backend.post("/reviews/batch", json={"texts": ["fine", "awful"]})
            assert queued.status_code == 202, queued.text
            job_id = queued.json()["job"]
            _until(lambda: job_id in example.finished)
            assert example.finished[job_id]["status"] == "succeeded"
            forged = backend.post("/pipeq-webhook", content=b"{}", headers={"webhook-id": "x"})
            assert forged.status_code == 401
    finally:
        server.should_exit = True


def test_django_example(pipeq_api: str) -> None:
    django = pytest.importorskip("django")
    from django.conf import settings as django_settings

    if not django_settings.configured:
        django_settings.configure(
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["*"],
            PIPEQ_API_URL=pipeq_api,
            PIPEQ_API_KEY=None,
            PIPEQ_WEBHOOK_SECRET=SECRET,
            REVIEWS_MODEL=MODEL,
        )
        django.setup()
    from django.test import AsyncClient as DjangoAsyncClient
    from django.test import Client as DjangoClient

    views = _load("django_views")
    global urlpatterns
    from django.urls import path

    urlpatterns = [
        path("reviews/score", views.score),
        path("reviews/batch", views.batch),
        path("pipeq-webhook", views.pipeq_webhook, name="pipeq-webhook"),
    ]
    import asyncio

    scored = asyncio.run(
        DjangoAsyncClient().post(
            "/reviews/score", {"text": "what a wonderful film"}, content_type="application/json"
        )
    )
    assert scored.status_code == 200, scored.content
    assert json.loads(scored.content)["labels"][0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    # The webhook must reach the Django view over real HTTP: a small WSGI server in front of it.
    from wsgiref.simple_server import WSGIServer, make_server

    from django.core.wsgi import get_wsgi_application

    port = _free_port()
    wsgi: WSGIServer = make_server("127.0.0.1", port, get_wsgi_application())
    threading.Thread(target=wsgi.serve_forever, daemon=True).start()
    try:
        queued = DjangoClient().post(
            "/reviews/batch",
            {"texts": ["fine", "awful"]},
            content_type="application/json",
            HTTP_HOST=f"127.0.0.1:{port}",
        )
        assert queued.status_code == 202, queued.content
        job_id = json.loads(queued.content)["job"]
        _until(lambda: job_id in views.finished)
        assert views.finished[job_id]["status"] == "succeeded"
    finally:
        wsgi.shutdown()


urlpatterns: list[object] = []


def test_web_clients_pull_no_torch_nor_celery() -> None:
    """What a web backend imports of pipeq loads no torch, and Celery and kombu only when a job is
    first published (their import is most of the clients' import time: bench/import_time.py)."""
    probe = (
        "import sys\n"
        "import pipeq.producer.client, pipeq.producer.async_client\n"
        "import pipeq.producer.http_client, pipeq.producer.async_http_client\n"
        "heavy = ('torch', 'transformers', 'celery', 'kombu')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    )
    assert done.stdout.strip() == "[]"
