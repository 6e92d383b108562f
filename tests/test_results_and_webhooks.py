"""Result stores, webhooks and Celery links, end to end: real Redis (broker DB 10, records DB 11),
moto's S3 server, real worker processes (`pipeq worker`, `pipeq webhooks worker`), and a real HTTP
receiver on loopback (hence PIPEQ_ALLOW_PRIVATE_URLS=true here)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import redis
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook

from pipeq.config.celery import make_celery
from pipeq.config.errors import InvalidSignature, JobNotFound
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument, JobRequest
from pipeq.core.stores import ResultStores
from pipeq.core.webhooks import DeadLetters, verify
from pipeq.producer.api import create_app
from pipeq.producer.client import Client
from tests.conftest import REDIS, WorkerProcess
from tests.parity import assert_close, reference_pipeline

BROKER_DB, RESULT_DB = 10, 11
BUCKET = "pipeq-results"
SECRET = "whsec_" + base64.b64encode(b"pipeq-test-secret-0123456789").decode()
THRESHOLD_BYTES = 8000
HANG_S = 2.0
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# --- a receiver on loopback ------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered; 0 = it never did


class Receiver:
    """POST /<path> answers from a per-path script (a status, or "hang"); the last entry repeats."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[int | str]] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def script(self, path: str, answers: list[int | str]) -> None:
        with self._lock:
            self.scripts[path] = list(answers)

    def hits(self, path: str) -> list[Hit]:
        with self._lock:
            return [hit for hit in self._hits if hit.path == path]

    def wait_for(
        self, path: str, done: Callable[[list[Hit]], bool], timeout_s: float = 30
    ) -> list[Hit]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done(hits := self.hits(path)):
                return hits
            time.sleep(0.05)
        raise AssertionError(f"receiver {path}: condition not met; hits {self.hits(path)}")

    def _next_answer(self, path: str) -> int | str:
        with self._lock:
            script = self.scripts.setdefault(path, [204])
            return script.pop(0) if len(script) > 1 else script[0]

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                answer = receiver._next_answer(self.path)
                if answer == "hang":
                    time.sleep(HANG_S)
                    receiver._record(Hit(self.path, headers, body, 0))
                    return
                assert isinstance(answer, int)
                receiver._record(Hit(self.path, headers, body, answer))
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        return Handler


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: str) -> str:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def own_env(worker_env: dict[str, str], s3_endpoint: str) -> dict[str, str]:
    """Our own Redis databases (the session worker never sees these jobs), S3, webhooks."""
    for db in (BROKER_DB, RESULT_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    return {
        **worker_env,
        **AWS,
        "PIPEQ_BROKER_URL": f"{REDIS}/{BROKER_DB}",
        "PIPEQ_RESULT_URL": f"{REDIS}/{RESULT_DB}",
        "PIPEQ_S3_ENDPOINT_URL": s3_endpoint,
        "PIPEQ_S3_BUCKET": BUCKET,
        "PIPEQ_S3_RESULT_THRESHOLD_BYTES": str(THRESHOLD_BYTES),
        "PIPEQ_WEBHOOK_SECRET": SECRET,
        "PIPEQ_WEBHOOK_TIMEOUT_S": "1",
        "PIPEQ_WEBHOOK_RETRY_SPAN_S": "4",
        "PIPEQ_WEBHOOK_BACKOFF_FIRST_S": "0.2",
        "PIPEQ_ALLOW_PRIVATE_URLS": "true",
    }


def _settings(env: dict[str, str], **overrides: Any) -> Settings:
    fields = {
        key.removeprefix("PIPEQ_").lower(): value
        for key, value in env.items()
        if key.startswith("PIPEQ_") and key != "PIPEQ_VISIBILITY_TIMEOUT"
    }
    return Settings(**{**fields, **overrides})


@pytest.fixture(scope="module")
def own_settings(own_env: dict[str, str], settings: Settings) -> Settings:
    return _settings(own_env)


@pytest.fixture(scope="module")
def own_client(own_settings: Settings) -> Client:
    return Client(own_settings)


@pytest.fixture(scope="module")
def api(own_client: Client) -> TestClient:
    return TestClient(create_app(own_client))


@pytest.fixture(scope="module")
def features_worker(
    own_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("results-logs") / "features-worker.log"
    worker = WorkerProcess(own_env, log_path, "--name", "features@%h", "--models", "tiny-features")
    yield worker.wait_ready()
    worker.stop()


@pytest.fixture(scope="module")
def sentiment_worker(
    own_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """Started only when a test asks for it; its records live 3 s."""
    log_path = tmp_path_factory.mktemp("results-logs") / "sentiment-worker.log"
    env = {**own_env, "PIPEQ_RESULT_TTL_S": "3"}
    worker = WorkerProcess(env, log_path, "--name", "sentiment@%h", "--models", "tiny-sentiment")
    yield worker.wait_ready()
    worker.stop()


@pytest.fixture(scope="module")
def webhooks_worker(
    own_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The sender, and the URL of its /metrics."""
    log_path = tmp_path_factory.mktemp("results-logs") / "webhooks-worker.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = {**own_env, "PIPEQ_METRICS_PORT": str(port)}
    with running_webhooks_worker(env, log_path, concurrency=8):
        yield f"http://127.0.0.1:{port}/metrics"


@contextmanager
def running_webhooks_worker(
    env: dict[str, str], log_path: Path, concurrency: int
) -> Iterator[None]:
    """`pipeq webhooks worker` as a subprocess, from its ready line until the block ends."""
    with log_path.open("w") as log:
        command = [sys.executable, "-m", "pipeq.cli", "webhooks", "worker"]
        proc = subprocess.Popen(
            [*command, "--concurrency", str(concurrency)],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "PIPEQ_LOG_LEVEL": "INFO"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "pipeq webhooks worker ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipeq.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _long_text(words: int) -> str:
    return " ".join(["the service was great and the food was good"] * (words // 9 + 1))


# --- result stores ---------------------------------------------------------------------------


@pytest.mark.usefixtures("features_worker")
def test_large_result_lands_in_s3_and_reads_back(
    own_client: Client, own_settings: Settings, api: TestClient, s3: Any
) -> None:
    text = _long_text(120)
    job_id = own_client.submit("tiny-features", [text])
    doc = own_client.wait(job_id, timeout_s=120)
    assert doc.status == "succeeded", doc
    assert_close(
        doc.outputs[0], reference_pipeline(own_settings.models, "tiny-features")(text), where=job_id
    )

    # The record keeps status, errors, timings and where the outputs are; not the outputs.
    record = own_client.records.get(job_id)
    assert record is not None and record.outputs is None and record.errors == [None]
    assert record.result_url == f"s3://{BUCKET}/pipeq/results/{job_id}.json"
    assert {"queued_s", "run_s"} <= record.timings.keys()
    stored = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"pipeq/results/{job_id}.json")["Body"].read()
    )
    assert stored["id"] == job_id and stored["outputs"] == doc.outputs
    assert len(json.dumps(stored)) > THRESHOLD_BYTES

    served = api.get(f"/v1/jobs/{job_id}")
    assert served.status_code == 200
    assert served.json()["outputs"] == doc.outputs
    assert served.json()["result_url"] == record.result_url

    presigned = api.get(f"/v1/jobs/{job_id}", params={"presign": "true"}).json()["result_url"]
    assert presigned.startswith(own_settings.s3_endpoint_url + "/")
    assert httpx.get(presigned).json()["outputs"] == doc.outputs


@pytest.mark.usefixtures("features_worker")
def test_small_results_stay_inline_unless_the_job_asks_for_s3(
    own_client: Client, api: TestClient
) -> None:
    inline = own_client.wait(own_client.submit("tiny-features", ["ok"]), timeout_s=60)
    assert inline.status == "succeeded" and inline.result_url is None
    assert own_client.records.get(inline.id) == inline

    asked = own_client.wait(own_client.submit("tiny-features", ["ok"], store="s3"), timeout_s=60)
    assert (
        asked.status == "succeeded"
        and asked.result_url == f"s3://{BUCKET}/pipeq/results/{asked.id}.json"
    )
    assert asked.outputs == inline.outputs
    assert own_client.records.get(asked.id).outputs is None
    assert api.get(f"/v1/jobs/{asked.id}").json()["outputs"] == inline.outputs


def test_s3_writes_are_idempotent_by_job_id(
    own_client: Client, own_settings: Settings, s3: Any
) -> None:
    stores = ResultStores(own_settings, own_client.records)
    first = JobDocument(id="same-id", model="m", status="succeeded", outputs=[1], errors=[None])
    stores.save(first, "s3")
    again = stores.save(first.model_copy(update={"outputs": [2]}), "s3")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="pipeq/results/same-id")["Contents"]
    assert [obj["Key"] for obj in listed] == ["pipeq/results/same-id.json"]
    assert stores.load(again).outputs == [2]


# --- Celery links ----------------------------------------------------------------------------


@pytest.mark.usefixtures("features_worker")
def test_link_and_link_error_get_the_job_document(
    own_client: Client, own_settings: Settings
) -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    app = make_celery(own_settings)

    @app.task(name="tests.on_done")
    def on_done(doc: dict[str, Any]) -> None:
        received.append(("link", doc))

    @app.task(name="tests.on_failed")
    def on_failed(doc: dict[str, Any]) -> None:
        received.append(("link_error", doc))

    link = app.signature("tests.on_done", queue="tests.callbacks")
    link_error = app.signature("tests.on_failed", queue="tests.callbacks")
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, queues=["tests.callbacks"]
    ):
        ok = own_client.submit("tiny-features", ["fine"], link=link, link_error=link_error)
        # A text model cannot use a file as its one input: every input fails, so the job fails.
        # Published by hand: the submit itself would refuse it (InvalidInput).
        message = JobRequest.model_validate(
            {"model": "tiny-features", "inputs": [{"path": "/etc/passwd"}]}
        ).to_message(owner=None)
        own_client.send([message], link=link, link_error=link_error)
        bad = message.id
        deadline = time.monotonic() + 60
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a third (wrong) callback would arrive by now
    by_id = {doc["id"]: (kind, doc) for kind, doc in received}
    assert len(received) == 2 and set(by_id) == {ok, bad}
    assert by_id[ok][0] == "link" and by_id[ok][1]["status"] == "succeeded"
    assert by_id[ok][1]["outputs"] == own_client.get(ok).outputs
    assert by_id[bad][0] == "link_error" and by_id[bad][1]["status"] == "failed"
    assert by_id[bad][1]["errors"][0] is not None


# --- webhooks --------------------------------------------------------------------------------


@pytest.mark.usefixtures("features_worker", "webhooks_worker")
def test_flaky_receiver_gets_the_webhook_once_as_a_success(
    own_client: Client, receiver: Receiver
) -> None:
    receiver.script("/flaky", [500, 503, 204])
    job_id = own_client.submit("tiny-features", ["ok"], webhook={"url": receiver.url("/flaky")})
    doc = own_client.wait(job_id, timeout_s=60)
    receiver.wait_for("/flaky", lambda hits: any(hit.status == 204 for hit in hits))
    time.sleep(1.5)  # room for a duplicate to show up
    hits = receiver.hits("/flaky")
    assert [hit.status for hit in hits] == [500, 503, 204]
    assert {hit.headers["webhook-id"] for hit in hits} == {f"{job_id}.succeeded"}
    body = Webhook(SECRET).verify(hits[-1].body, hits[-1].headers)  # the reference library
    assert body == {**doc.model_dump(mode="json"), "event": "succeeded"}
    assert verify(hits[-1].body, hits[-1].headers, SECRET) == body


@pytest.mark.usefixtures("features_worker", "webhooks_worker")
def test_webhook_of_an_s3_result_carries_a_presigned_url(
    own_client: Client, receiver: Receiver
) -> None:
    hook = {"url": receiver.url("/s3"), "events": ["succeeded"]}
    job_id = own_client.submit("tiny-features", ["ok"], webhook=hook, store="s3")
    doc = own_client.wait(job_id, timeout_s=60)
    (hit,) = receiver.wait_for("/s3", lambda hits: len(hits) == 1)
    body = verify(hit.body, hit.headers, SECRET)
    assert body["outputs"] is None and body["status"] == "succeeded"
    assert httpx.get(body["result_url"]).json()["outputs"] == doc.outputs


@pytest.mark.usefixtures("features_worker", "webhooks_worker")
def test_unanswered_webhook_is_dead_lettered_then_replayed(
    own_client: Client, own_env: dict[str, str], receiver: Receiver, webhooks_worker: str
) -> None:
    receiver.script("/down", ["hang"])
    job_id = own_client.submit(
        "tiny-features", ["x"], webhook={"url": receiver.url("/down"), "events": ["succeeded"]}
    )
    webhook_id = f"{job_id}.succeeded"
    dead = DeadLetters(own_client.settings.effective_result_url)
    deadline = time.monotonic() + 60
    while not any(letter.delivery.id == webhook_id for letter in dead.list()):
        assert time.monotonic() < deadline, "the webhook never became a dead letter"
        time.sleep(0.2)
    (letter,) = [letter for letter in dead.list() if letter.delivery.id == webhook_id]
    assert letter.attempts >= 2 and "no answer in time" in letter.error

    listed = [json.loads(line) for line in _cli(own_env, "webhooks", "failed").splitlines()]
    assert {"id": webhook_id, "attempts": letter.attempts} in [
        {"id": entry["id"], "attempts": entry["attempts"]} for entry in listed
    ]

    # What Prometheus scrapes, and docs/monitoring.md's dead-letter alert reads.
    metrics = httpx.get(webhooks_worker, timeout=10).text
    assert re.search(r"^pipeq_webhook_dead_letters_total [1-9]", metrics, re.M), metrics
    assert 'pipeq_webhook_deliveries_total{event="succeeded",outcome="retried"}' in metrics
    assert "pipeq_webhook_delivery_seconds_bucket" in metrics

    # Replayed to another URL (the receiver moved).
    receiver.script("/elsewhere", [200])
    _cli(own_env, "webhooks", "replay", webhook_id, "--url", receiver.url("/elsewhere"))
    hits = receiver.wait_for("/elsewhere", lambda hits: any(hit.status == 200 for hit in hits))
    delivered = [hit for hit in hits if hit.status == 200]
    assert len(delivered) == 1 and delivered[0].headers["webhook-id"] == webhook_id
    assert verify(delivered[0].body, delivered[0].headers, SECRET)["status"] == "succeeded"
    assert webhook_id not in {letter.delivery.id for letter in dead.list()}


def test_verify_rejects_forged_tampered_stale_and_unsigned_requests() -> None:
    body = json.dumps({"id": "j1", "status": "succeeded", "event": "succeeded"})
    now = datetime.now(tz=UTC)

    def headers(secret: str, at: datetime, data: str = body) -> dict[str, str]:
        return {
            "webhook-id": "j1.succeeded",
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign("j1.succeeded", at, data),
        }

    assert verify(body, headers(SECRET, now), SECRET)["id"] == "j1"
    other = "whsec_" + base64.b64encode(b"somebody-else-entirely").decode()
    rejected = [
        (body, headers(other, now)),  # forged: signed with another secret
        (body.replace("succeeded", "failed"), headers(SECRET, now)),  # tampered body
        (body, headers(SECRET, now - timedelta(minutes=10))),  # stale: a replay of an old request
        (body, {"webhook-id": "j1.succeeded"}),  # unsigned
        (body, {**headers(SECRET, now), "webhook-signature": "v1"}),  # garbage
    ]
    for data, given in rejected:
        with pytest.raises(InvalidSignature):
            verify(data, given, SECRET)


# --- cancel and expiry -----------------------------------------------------------------------


@pytest.mark.usefixtures("webhooks_worker")
def test_cancel_before_start_prevents_the_run(
    request: pytest.FixtureRequest, own_client: Client, receiver: Receiver
) -> None:
    hook = {"url": receiver.url("/cancelled"), "events": ["cancelled", "succeeded"]}
    job_id = own_client.submit("tiny-sentiment", ["never run me"], webhook=hook)
    doc, cancelled = own_client.cancel(job_id)
    assert cancelled and doc.status == "cancelled"
    (hit,) = receiver.wait_for("/cancelled", lambda hits: len(hits) == 1)
    assert verify(hit.body, hit.headers, SECRET)["event"] == "cancelled"

    request.getfixturevalue("sentiment_worker")  # no worker served this queue until now
    after = own_client.submit("tiny-sentiment", ["run me"])
    assert own_client.wait(after, timeout_s=60).status == "succeeded"
    time.sleep(0.5)
    final = own_client.get(job_id)
    assert final.status == "cancelled" and final.worker is None and final.outputs is None
    assert "started_at" not in final.timings
    assert len(receiver.hits("/cancelled")) == 1  # no `succeeded`: it never ran


def test_expired_record_is_404_not_stale(
    request: pytest.FixtureRequest, own_env: dict[str, str], api: TestClient, s3: Any
) -> None:
    request.getfixturevalue("sentiment_worker")  # writes records with a 3 s TTL
    short = Client(_settings(own_env, result_ttl_s=3))
    inline = short.submit("tiny-sentiment", ["short lived"])
    in_s3 = short.submit("tiny-sentiment", ["short lived too"], store="s3")
    for job_id in (inline, in_s3):
        assert short.wait(job_id, timeout_s=60).status == "succeeded"
    time.sleep(3.5)
    for job_id in (inline, in_s3):
        with pytest.raises(JobNotFound):
            short.get(job_id)
        assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    # The record is the authority: the S3 object outlives it, and is not served.
    assert s3.get_object(Bucket=BUCKET, Key=f"pipeq/results/{in_s3}.json")["Body"].read()
