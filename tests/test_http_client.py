"""`HttpClient` against the real API (uvicorn on loopback, a real worker) and, for its retries,
a real HTTP server that refuses first."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from pipeq.config.errors import (
    InvalidInput,
    JobConflict,
    JobNotFound,
    Overloaded,
    ServiceUnavailable,
)
from pipeq.producer.client import Client
from pipeq.producer.http_client import HttpClient
from tests.test_api import serve


@pytest.fixture(scope="module")
def http_client(client: Client) -> Iterator[HttpClient]:
    for api in serve(client):
        with HttpClient(str(api.base_url)) as http:
            yield http


@pytest.mark.usefixtures("session_worker")
def test_submit_wait_and_typed_errors(http_client: HttpClient) -> None:
    job_id = http_client.submit("tiny-sentiment", ["a fine day"], {"top_k": 2}, id="http-1")
    assert http_client.submit("tiny-sentiment", ["a fine day"], {"top_k": 2}, id="http-1") == job_id
    doc = http_client.wait(job_id, timeout_s=60)
    assert doc.status == "succeeded" and len(doc.outputs[0]) == 2
    with pytest.raises(JobConflict, match="only queued jobs can be cancelled"):
        http_client.cancel(job_id)
    with pytest.raises(JobNotFound):
        http_client.get("never-submitted")
    with pytest.raises(InvalidInput, match=r"inputs\[0\] is text; tiny-vit"):
        http_client.submit("tiny-vit", ["a cat"])


def test_api_down_is_service_unavailable() -> None:
    with HttpClient("http://127.0.0.1:9", retry_budget_s=0) as client:
        with pytest.raises(ServiceUnavailable, match="cannot be reached"):
            client.get("x")


class _Refusing(http.server.BaseHTTPRequestHandler):
    """429 with Retry-After: 0 to the first `refusals` submits, then 202."""

    refusals = 0
    seen = 0

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen += 1
        if type(self).seen <= type(self).refusals:
            body = {"error": {"type": "Overloaded", "message": "busy", "retryable": True}}
            self._answer(429, body, {"Retry-After": "0"})
        else:
            self._answer(202, {"id": "after-retry", "status": "queued"}, {})

    def _answer(self, status: int, body: dict[str, object], headers: dict[str, str]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(raw))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("refusals", "budget_s"), [(2, 5.0), (1000, 0.0)])
def test_429_is_retried_within_the_budget(refusals: int, budget_s: float) -> None:
    handler = type("Handler", (_Refusing,), {"refusals": refusals, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with HttpClient(url, retry_budget_s=budget_s) as client:
            if refusals <= 2:
                assert client.submit("m", ["x"]) == "after-retry"
                assert handler.seen == 3
            else:
                with pytest.raises(Overloaded, match="busy"):
                    client.submit("m", ["x"])
    finally:
        server.shutdown()
