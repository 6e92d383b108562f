"""Hostile servers against media fetching and webhook delivery (issue 23, points 3, 5 and 6).

Real servers on loopback: an http.server that records every request it gets, and a raw socket
server that sends response headers one line at a time. Only DNS is staged: no test can make a real
resolver change its answer between two lookups, so `rebinding_dns` patches `socket.getaddrinfo`
for one made-up name (first answer public, every later one 127.0.0.1: what an attacker's DNS
server does) and leaves every other name and address to the real resolver.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeq.config.errors import (
    MediaError,
    MediaTimeout,
    MediaTooLarge,
    UnsafeReference,
    UnsupportedEncoding,
)
from pipeq.config.settings import Settings
from pipeq.core.inputs import UrlRef
from pipeq.core.records import open_records
from pipeq.core.stores import ResultStores
from pipeq.core.webhooks import WebhookDelivery
from pipeq.worker.callbacks import Failure, WebhookSender
from pipeq.worker.guarded_network import guarded_client
from pipeq.worker.media import MediaLoader
from pipeq.worker.webhook_service import webhook_http_client
from tests.conftest import REDIS

SECRET = "whsec_" + base64.b64encode(b"pipeq-test-secret-0123456789").decode()
PAYLOAD = b"media bytes " * 100
CAP = 1 << 20  # PIPEQ_MAX_MEDIA_BYTES in the encoding tests
BOMB_ZEROS = 64 << 20  # inflated size of the gzip bombs: 64 times the cap
REBOUND_NAME = "rebind.pipeq.test"
PUBLIC_ANSWER = "93.184.216.34"
SLOW_LINE_S = 0.5
JOIN_S = 15.0  # far past the 2 s deadlines; only a fetch that never ends reaches it


def gzipped(chunks: Iterator[bytes] | list[bytes]) -> bytes:
    """One gzip layer over `chunks`, compressed as they come (a bomb never sits in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(chunk) for chunk in chunks]
    return b"".join([*parts, compressor.flush()])


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Recorder(BaseHTTPRequestHandler):
    """Answers GET /<route> from `routes` (status, headers, body) and POST with 204; records all."""

    seen: list[Seen] = []
    routes: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._record()
        status, headers, body = self.routes.get(self.path, (404, [], b""))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetch hung up on purpose (size cap)

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _record(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.seen.append(Seen(self.command, self.path, headers))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[int]:
    """The port of a recording server on 127.0.0.1."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`REBOUND_NAME` resolves to a public address once, then to 127.0.0.1; returns the answers."""
    real_getaddrinfo = socket.getaddrinfo
    answers: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != REBOUND_NAME:
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers.append(PUBLIC_ANSWER if not answers else "127.0.0.1")
        return real_getaddrinfo(answers[-1], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def settings(**overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "allow_private_urls": False,
        "media_timeout_s": 2.0,
        "webhook_timeout_s": 2.0,
        "webhook_secret": SECRET,
        "max_media_bytes": CAP,
    }
    return Settings(**(fields | overrides))


@pytest.fixture
def make_sender() -> Iterator[Callable[[Settings], WebhookSender]]:
    clients = []

    def make(own: Settings) -> WebhookSender:
        clients.append(http := webhook_http_client(own))
        return WebhookSender(own, http, ResultStores(own, open_records(REDIS, 60)))

    yield make
    for client in clients:
        client.close()


def delivery(url: str) -> WebhookDelivery:
    body = {"id": "j1", "status": "succeeded", "event": "succeeded"}
    return WebhookDelivery(
        id="j1.succeeded", url=url, event="succeeded", body=body, first_attempt_at=time.time()
    )


def fetch(url: str, **overrides: Any) -> bytes:
    loader = MediaLoader(settings(**overrides))
    try:
        return loader.fetch(UrlRef(url=url))
    finally:
        loader.close()


# --- 5: connect to the address that was checked ------------------------------------------------


def test_rebound_name_never_reaches_loopback_for_media(
    recorder: int, rebinding_dns: list[str]
) -> None:
    before = len(Recorder.seen)
    with pytest.raises(MediaError):  # whatever the public address does; it is not loopback
        fetch(f"http://{REBOUND_NAME}:{recorder}/image")
    assert Recorder.seen[before:] == []
    assert rebinding_dns[0] == PUBLIC_ANSWER


def test_rebound_name_never_reaches_loopback_for_webhooks(
    recorder: int, rebinding_dns: list[str], make_sender: Callable[[Settings], WebhookSender]
) -> None:
    sender = make_sender(settings())
    before = len(Recorder.seen)
    first = sender.send(delivery(f"http://{REBOUND_NAME}:{recorder}/hook"))
    retry = sender.send(delivery(f"http://{REBOUND_NAME}:{recorder}/hook"))
    assert Recorder.seen[before:] == []
    assert first is not None  # the public address is not a webhook receiver
    assert retry == Failure(
        f"{REBOUND_NAME} is 127.0.0.1, a private or reserved address; pipeq fetches only public "
        "addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true",
        retryable=False,
    )


def test_name_of_a_loopback_address_is_refused_without_a_request(
    recorder: int, make_sender: Callable[[Settings], WebhookSender]
) -> None:
    before = len(Recorder.seen)
    with pytest.raises(UnsafeReference, match="PIPEQ_ALLOW_PRIVATE_URLS"):
        fetch(f"http://localhost:{recorder}/image")
    failure = make_sender(settings()).send(delivery(f"http://localhost:{recorder}/hook"))
    assert failure is not None and not failure.retryable
    assert "PIPEQ_ALLOW_PRIVATE_URLS" in failure.reason
    assert Recorder.seen[before:] == []


def test_connection_goes_to_the_checked_address_with_host_from_the_name(recorder: int) -> None:
    Recorder.routes["/image"] = (200, [], PAYLOAD)
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    before = len(Recorder.seen)
    with guarded_client(2.0, allow_private=True, resolve=resolve) as client:
        response = client.get(f"http://media.example:{recorder}/image")
    assert (response.status_code, response.content) == (200, PAYLOAD)
    assert asked == ["media.example"]
    (seen,) = Recorder.seen[before:]
    assert seen.headers["host"] == f"media.example:{recorder}"


# --- 6: one deadline per fetch and per delivery attempt ----------------------------------------


@pytest.fixture(scope="module")
def slow_headers() -> Iterator[int]:
    """The port of a server that sends a status line, then one header line every 0.5 s, forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for line in range(1_000_000):
                    if stop.wait(SLOW_LINE_S):
                        return
                    conn.sendall(f"X-Slow-{line}: still coming\r\n".encode())
            except OSError:
                return  # the client gave up: that is the point

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `call`; the list gets its result or its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - handed to the test to check
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_slow_headers_end_the_fetch_at_its_deadline(slow_headers: int) -> None:
    url = f"http://127.0.0.1:{slow_headers}/image"
    thread, outcome = in_thread(lambda: fetch(url, allow_private_urls=True))
    thread.join(JOIN_S)
    assert not thread.is_alive(), "the fetch is still waiting for headers"
    (error,) = outcome
    assert isinstance(error, MediaTimeout), error
    assert "PIPEQ_MEDIA_TIMEOUT_S" in str(error)


def test_slow_headers_end_the_webhook_attempt_at_its_deadline(
    slow_headers: int, make_sender: Callable[[Settings], WebhookSender]
) -> None:
    sender = make_sender(settings(allow_private_urls=True))
    url = f"http://127.0.0.1:{slow_headers}/hook"
    thread, outcome = in_thread(lambda: sender.send(delivery(url)))
    thread.join(JOIN_S)
    assert not thread.is_alive(), "the delivery is still waiting for headers"
    (failure,) = outcome
    assert isinstance(failure, Failure) and failure.retryable
    assert failure.reason.startswith("no answer in time")


# --- 3: Content-Encoding is asked for as identity and inflated under the cap ------------------


@pytest.fixture(scope="module")
def bombs(recorder: int) -> None:
    zeros = bytes(1 << 20)
    bomb = gzipped(zeros for _ in range(BOMB_ZEROS // len(zeros)))
    stacked = gzipped([gzipped([bomb])])
    Recorder.routes |= {
        "/stacked": (200, [("Content-Encoding", "gzip, gzip, gzip")], stacked),
        "/stacked-lines": (200, [("Content-Encoding", "gzip")] * 3, stacked),
        "/brotli": (200, [("Content-Encoding", "br")], b"\x0b\x02\x80hello\x03"),
        "/bomb": (200, [("Content-Encoding", "gzip")], bomb),
        "/gzip": (200, [("Content-Encoding", "gzip")], gzip.compress(PAYLOAD)),
        "/deflate": (200, [("Content-Encoding", "deflate")], zlib.compress(PAYLOAD)),
        "/identity": (200, [("Content-Encoding", "identity")], PAYLOAD),
    }


def peak_bytes_of(call: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.usefixtures("bombs")
@pytest.mark.parametrize("path", ["/stacked", "/stacked-lines", "/brotli"])
def test_stacked_or_unknown_encodings_are_refused_before_decoding(recorder: int, path: str) -> None:
    url = f"http://127.0.0.1:{recorder}{path}"
    errors: list[Exception] = []

    def refused() -> None:
        with pytest.raises(
            UnsupportedEncoding, match="decodes at most one gzip or deflate"
        ) as info:
            fetch(url, allow_private_urls=True)
        errors.append(info.value)

    assert peak_bytes_of(refused) < 8 * CAP
    assert not errors[0].retryable


@pytest.mark.usefixtures("bombs")
def test_one_gzip_layer_is_inflated_in_bounded_steps(recorder: int) -> None:
    url = f"http://127.0.0.1:{recorder}/bomb"

    def too_large() -> None:
        with pytest.raises(MediaTooLarge, match=f"{CAP} bytes"):
            fetch(url, allow_private_urls=True)

    # httpx inflates each 64 KiB network chunk whole: 64 MiB at once, 64 times the cap.
    assert peak_bytes_of(too_large) < 8 * CAP


@pytest.mark.usefixtures("bombs")
@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/identity"])
def test_one_layer_or_identity_decodes_and_identity_is_asked_for(recorder: int, path: str) -> None:
    before = len(Recorder.seen)
    assert fetch(f"http://127.0.0.1:{recorder}{path}", allow_private_urls=True) == PAYLOAD
    (seen,) = Recorder.seen[before:]
    assert seen.headers["accept-encoding"] == "identity"
