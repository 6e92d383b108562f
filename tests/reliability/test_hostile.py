"""Hostile input gets a clear error and does no harm.

Covered elsewhere, not repeated here: oversize inline data (413) and API keys (401) in
tests/test_api.py; path traversal, symlinks, SSRF by private address, by redirect and after DNS,
and decompression bombs in tests/test_media.py; forged, tampered and replayed webhook signatures
in tests/test_results_and_webhooks.py (test_verify_rejects_forged_tampered_stale_and_unsigned_...).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu import Connection, Queue

from pipeq.config.queues import RUN_TASK, queue_name
from pipeq.config.settings import Settings
from pipeq.producer.api import create_app
from pipeq.producer.client import Client
from tests.reliability.conftest import RedisServer

pytestmark = pytest.mark.reliability


@pytest.fixture
def api(client: Client) -> TestClient:
    return TestClient(create_app(client), raise_server_exceptions=False)


def _post_raw(api: TestClient, params_json: str) -> tuple[int, dict[str, object]]:
    body = '{"model": "tiny-sentiment", "inputs": ["x"], "params": ' + params_json + "}"
    answer = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    return answer.status_code, answer.json()


@pytest.mark.parametrize("depth", [20, 900, 100_000])
def test_deeply_nested_params_are_422(api: TestClient, depth: int) -> None:
    status, body = _post_raw(api, '{"a":' * depth + "1" + "}" * depth)
    assert status == 422, body
    assert "error" in body


def test_many_megabytes_of_inputs_are_refused(api: TestClient) -> None:
    answer = api.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["x"] * 200_001})
    assert answer.status_code == 422


@pytest.mark.usefixtures("session_worker")
def test_unicode_junk_is_an_ordinary_input(api: TestClient, client: Client) -> None:
    junk = [
        "\x00\x07 controls \u202e right-to-left \ufeff bom",
        "z\u0301\u0301\u0301\u0301a\u0336\u0336l\u0338go " * 50,
        "\U0001f4a9" * 2000,
    ]
    # A lone surrogate can only arrive escaped (it has no UTF-8 encoding).
    raw = '{"model": "tiny-sentiment", "inputs": ["\\ud800 lone surrogate \\udfff"]}'
    answers = [api.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": junk})]
    answers.append(api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}))
    for answer in answers:
        assert answer.status_code == 202, answer.text
        doc = client.wait(answer.json()["id"], timeout_s=60)
        assert doc.status in ("succeeded", "failed"), doc
    bad_utf8 = b'{"model": "tiny-sentiment", "inputs": ["\xff\xfe"]}'
    answer = api.post("/v1/jobs", content=bad_utf8, headers={"content-type": "application/json"})
    assert answer.status_code == 422


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.usefixtures("session_worker")
def test_pickled_message_is_refused_unopened(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    queue = queue_name("tiny-sentiment", "interactive")
    with Connection(settings.broker_url) as conn:
        conn.Producer().publish(
            pickle.dumps(_Payload(marker)),
            routing_key=queue,
            exchange="",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": RUN_TASK, "id": "pickled-job", "lang": "py"},
            declare=[Queue(queue)],
        )
    time.sleep(1)
    # The worker keeps serving, and the payload never ran.
    doc = client.wait(client.submit("tiny-sentiment", ["after the pickle"]), timeout_s=60)
    assert doc.status == "succeeded"
    assert not marker.exists()


def test_broker_down_is_503_then_recovers(own_redis: RedisServer, own_client: Client) -> None:
    api = TestClient(create_app(own_client), raise_server_exceptions=False)
    job = {"model": "tiny-sentiment", "inputs": ["x"]}
    assert api.post("/v1/jobs", json=job).status_code == 202
    own_redis.stop()
    began = time.monotonic()
    down = [api.post("/v1/jobs", json=job), api.get("/v1/jobs/anything")]
    assert [a.status_code for a in down] == [503, 503], [a.text for a in down]
    assert all(a.headers["retry-after"] for a in down)
    assert time.monotonic() - began < 30, "the API hung while the broker was down"
    own_redis.start()
    deadline = time.monotonic() + 30
    while (answer := api.post("/v1/jobs", json=job)).status_code != 202:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
