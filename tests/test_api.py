"""The HTTP API served by a real uvicorn on loopback, driven with httpx."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from pipeq.config.settings import Settings
from pipeq.producer.api import create_app
from pipeq.producer.client import Client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(client: Client) -> Iterator[httpx.Client]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(client), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def api(client: Client) -> Iterator[httpx.Client]:
    yield from serve(client)


@pytest.fixture(scope="module")
def idle_api(settings: Settings) -> Iterator[httpx.Client]:
    """An API on a broker database no worker consumes: its jobs stay queued."""
    broker = settings.broker_url.rsplit("/", 1)[0] + "/12"  # type: ignore[union-attr]
    redis.Redis.from_url(broker).flushdb()
    yield from serve(Client(settings.model_copy(update={"broker_url": broker})))


@pytest.mark.usefixtures("session_worker")
def test_submit_and_long_poll(api: httpx.Client) -> None:
    accepted = api.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["a fine day"]})
    assert accepted.status_code == 202
    assert accepted.json()["status"] == "queued"
    job = api.get(f"/v1/jobs/{accepted.json()['id']}", params={"wait": 30}).json()
    assert job["status"] == "succeeded"
    assert job["outputs"][0][0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    assert job["errors"] == [None]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ["x"]},
        {"model": "tiny-sentiment", "inputs": []},
        {"model": "tiny-sentiment", "inputs": [{"url": "ftp://example.com/a.png"}]},
        {"model": "tiny-sentiment", "inputs": [{"url": "file:///etc/passwd"}]},
        {"model": "tiny-sentiment", "inputs": [{"data": "not base64!!"}]},
        {"model": "tiny-sentiment", "inputs": [{"s3": "s3://bucket-only"}]},
        {"model": "tiny-sentiment", "inputs": ["x"], "priority": "urgent"},
        {"model": "tiny-sentiment", "inputs": ["x"], "surprise": 1},
        {"model": "tiny-sentiment", "inputs": [42]},
    ],
)
def test_malformed_bodies_are_422(api: httpx.Client, body: dict[str, Any]) -> None:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest" and error["retryable"] is False
    assert error["message"] and response.json()["detail"]


def test_not_json_is_422(api: httpx.Client) -> None:
    response = api.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_unknown_model_and_job_are_404(api: httpx.Client) -> None:
    response = api.post("/v1/jobs", json={"model": "nope", "inputs": ["x"]})
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]
    assert api.get("/v1/jobs/does-not-exist").status_code == 404
    assert api.delete("/v1/jobs/does-not-exist").status_code == 404


def test_oversize_inline_data_is_413(api: httpx.Client, settings: Settings) -> None:
    blob = base64.b64encode(b"\0" * (settings.max_media_bytes + 1)).decode()
    response = api.post(
        "/v1/jobs", json={"model": "tiny-vit", "inputs": [{"data": blob, "mime": "image/png"}]}
    )
    assert response.status_code == 413


def test_idempotency_key(idle_api: httpx.Client) -> None:
    body = {"model": "tiny-sentiment", "inputs": ["same"], "id": "order-42"}
    assert idle_api.post("/v1/jobs", json=body).status_code == 202
    again = idle_api.post("/v1/jobs", json=body)
    assert again.status_code == 200 and again.json()["id"] == "order-42"
    other = idle_api.post("/v1/jobs", json={**body, "inputs": ["different"]})
    assert other.status_code == 409


def test_cancel_queued_job(idle_api: httpx.Client) -> None:
    job_id = idle_api.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["x"]}).json()[
        "id"
    ]
    cancelled = idle_api.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    again = idle_api.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["job"]["status"] == "cancelled"
    assert idle_api.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_every_error_has_one_body(settings: Settings) -> None:
    """401, 404 (job, model, route), 409, 413, 422 and 429: `{"error": {type, message,
    retryable}}` with the status of the error's class."""
    keyed = Client(
        settings.model_copy(
            update={"api_keys": ["k"], "broker_url": settings.broker_url.rsplit("/", 1)[0] + "/12"}
        )
    )
    auth = {"X-API-Key": "k"}
    blob = base64.b64encode(b"\0" * (settings.max_media_bytes + 1)).decode()
    job = {"model": "tiny-sentiment", "inputs": ["x"], "id": "one-body"}
    for http in serve(keyed):
        http.post("/v1/jobs", json=job, headers=auth)
        answers = {
            "Unauthorized": http.get("/v1/models"),
            "JobNotFound": http.get("/v1/jobs/nothing-here", headers=auth),
            "UnknownModel": http.post("/v1/jobs", json={**job, "model": "nope"}, headers=auth),
            "NotFound": http.get("/v2/nothing", headers=auth),
            "JobConflict": http.post("/v1/jobs", json={**job, "inputs": ["y"]}, headers=auth),
            "PayloadTooLarge": http.post(
                "/v1/jobs",
                json={"model": "tiny-vit", "inputs": [{"data": blob, "mime": "image/png"}]},
                headers=auth,
            ),
            "InvalidRequest": http.post("/v1/jobs", content=b"{", headers=auth),
            "InvalidParams": http.post(
                "/v1/jobs", json={**job, "id": None, "params": {"top_kk": 1}}, headers=auth
            ),
        }
    statuses = {
        "Unauthorized": 401,
        "JobNotFound": 404,
        "UnknownModel": 404,
        "NotFound": 404,
        "JobConflict": 409,
        "PayloadTooLarge": 413,
        "InvalidRequest": 422,
        "InvalidParams": 422,
    }
    for kind, answer in answers.items():
        assert answer.status_code == statuses[kind], (kind, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"type", "message", "retryable"} and error["type"] == kind
        assert error["message"] and error["retryable"] is False


@pytest.mark.usefixtures("session_worker")
def test_models_health_metrics(api: httpx.Client) -> None:
    models = api.get("/v1/models").json()
    assert models["tiny-vit"]["task"] == "image-classification"
    # The live workers serving each model, from their heartbeats in the queue ledger.
    assert models["tiny-sentiment"]["workers"], models["tiny-sentiment"]
    assert api.get("/healthz").json() == {"status": "ok"}
    assert "pipeq_api_requests_total" in api.get("/metrics").text


def test_openapi_is_honest(api: httpx.Client) -> None:
    """A valid OpenAPI document: each route's own statuses with the one error body, /metrics as
    text, the API keys as security schemes, and the Location header of a 202."""
    from openapi_spec_validator import validate

    spec = api.get("/openapi.json").json()
    validate(spec)
    statuses = {
        ("/v1/jobs", "post"): {"200", "202", "401", "404", "409", "413", "422", "429", "503"},
        ("/v1/jobs/{job_id}", "get"): {"200", "401", "404", "422", "503"},
        ("/v1/jobs/{job_id}", "delete"): {"202", "401", "404", "409", "422", "503"},
        ("/v1/models", "get"): {"200", "401", "503"},
    }
    for (path, method), expected in statuses.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == expected, (path, method)
        for status in expected - {"200", "202"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
        assert {"HTTPBearer", "APIKeyHeader"} <= {
            name for scheme in spec["paths"][path][method]["security"] for name in scheme
        }
    assert "Location" in spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["headers"]
    assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


def test_location_and_idempotency_key_header(idle_api: httpx.Client) -> None:
    body = {"model": "tiny-sentiment", "inputs": ["keyed"]}
    first = idle_api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77"})
    assert first.status_code == 202 and first.json()["id"] == "order-77"
    assert first.headers["Location"] == "/v1/jobs/order-77"
    again = idle_api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77"})
    assert again.status_code == 200 and again.headers["Location"] == "/v1/jobs/order-77"
    clash = idle_api.post(
        "/v1/jobs", json={**body, "id": "other"}, headers={"Idempotency-Key": "order-77"}
    )
    assert clash.status_code == 422 and clash.json()["error"]["type"] == "InvalidRequest"
    assert "pipeq_api_request_seconds_bucket" in idle_api.get("/metrics").text


def test_api_keys(settings: Settings) -> None:
    keyed = Client(settings.model_copy(update={"api_keys": ["s3cret"]}))
    for http in serve(keyed):
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert http.get("/healthz").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        assert (
            http.get("/v1/models").json()["error"]["message"].startswith("missing or wrong API key")
        )


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (
            {"model": "tiny-vit", "inputs": [{"path": "/a.png"}, "a cat"]},
            "InvalidInput",
            "inputs[1] is text; tiny-vit (image-classification) takes an object with one of url, "
            "s3, path or data",
        ),
        (
            {"model": "tiny-zeroshot", "inputs": ["my order never arrived"]},
            "InvalidParams",
            "params: candidate_labels is required (a list of labels to score)",
        ),
        (
            {"model": "tiny-sentiment", "inputs": ["x"], "params": {"top_kk": 2}},
            "InvalidParams",
            "params.top_kk is not accepted for text-classification; accepted: "
            "function_to_apply, top_k, truncation",
        ),
        (
            {"model": "tiny-vit", "inputs": [{"url": "ftp://example.com/a.png"}]},
            "InvalidRequest",
            "inputs.0.url: the URL scheme 'ftp' is not accepted: use http://, https:// or "
            "{'s3': 's3://bucket/key'}",
        ),
        (
            {"model": "tiny-sentiment", "inputs": ["x"], "webhook": {"url": "http://127.0.0.1/h"}},
            "InvalidInput",
            "webhook.url: 127.0.0.1 is 127.0.0.1, a private or reserved address; pipeq fetches "
            "only public addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true",
        ),
        (
            {"model": "tiny-sentiment", "inputs": ["x"], "webhook": {"url": "http://localhost/h"}},
            "InvalidInput",
            "webhook.url: localhost is 127.0.0.1, a private or reserved address; webhooks go "
            "only to public addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true",
        ),
    ],
)
def test_inputs_are_checked_before_they_are_queued(
    idle_api: httpx.Client, body: dict[str, Any], kind: str, message: str
) -> None:
    """Each refusal a new user met as a 202 and a job that failed later: a 422 naming the input
    or param, with what would be accepted, and nothing queued."""
    job_id = f"checked-{kind}-{len(message)}"
    answer = idle_api.post("/v1/jobs", json={**body, "id": job_id})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["type"] == kind
    assert answer.json()["error"]["message"] == message
    assert len(answer.json().get("detail") or [None]) == 1  # one error for the one bad input
    assert idle_api.get(f"/v1/jobs/{job_id}").status_code == 404
