"""API keys are tenants (issue 23, point 7): a key sees, cancels and names only its own jobs, a
409 shows nothing of another job, and a key with its own webhook secret gets its webhooks signed
with that secret alone. Real Redis (broker DB 8, records DB 9), a real uvicorn API, real
`pipeq worker` and `pipeq webhooks worker` processes, a real receiver on loopback."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from pipeq.config.errors import InvalidSignature
from pipeq.config.settings import Settings
from pipeq.core.jobs import owner_of, scoped_id
from pipeq.core.webhooks import verify
from pipeq.producer.client import Client
from tests.conftest import REDIS, WorkerProcess
from tests.test_api import serve
from tests.test_results_and_webhooks import Receiver, running_webhooks_worker

BROKER_DB, RESULT_DB = 8, 9
KEY_A, KEY_B, KEY_C = "key-of-alice", "key-of-bob", "key-of-carol"


def _secret(seed: bytes) -> str:
    return "whsec_" + base64.b64encode(seed.ljust(24, b"-")).decode()


SECRET_A, SECRET_B, SHARED = _secret(b"alice"), _secret(b"bob"), _secret(b"shared")
# Carol has no secret of her own: her webhooks are signed with the shared one.
API_KEYS = f"{KEY_A}={SECRET_A},{KEY_B}={SECRET_B},{KEY_C}"
SERVED = "tiny-sentiment"  # the only model the worker below serves: tiny-features jobs stay queued


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def env(worker_env: dict[str, str]) -> dict[str, str]:
    for db in (BROKER_DB, RESULT_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    return {
        **worker_env,
        "PIPEQ_BROKER_URL": f"{REDIS}/{BROKER_DB}",
        "PIPEQ_RESULT_URL": f"{REDIS}/{RESULT_DB}",
        "PIPEQ_API_KEYS": API_KEYS,
        "PIPEQ_WEBHOOK_SECRET": SHARED,
        "PIPEQ_ALLOW_PRIVATE_URLS": "true",
    }


@pytest.fixture(scope="module")
def operator(env: dict[str, str], settings: Settings) -> Client:
    """The trusted Python client, on the same broker and records as the API."""
    return Client(
        settings.model_copy(
            update={
                "broker_url": env["PIPEQ_BROKER_URL"],
                "result_url": env["PIPEQ_RESULT_URL"],
                "api_keys": API_KEYS.split(","),
                "webhook_secret": SHARED,
                "allow_private_urls": True,
            }
        )
    )


@pytest.fixture(scope="module")
def api(operator: Client) -> Iterator[httpx.Client]:
    yield from serve(operator)


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    log_path = tmp_path_factory.mktemp("tenants-logs") / "worker.log"
    process = WorkerProcess(env, log_path, "--name", "tenants@%h", "--models", SERVED)
    process.wait_ready()
    yield
    process.stop()


@pytest.fixture(scope="module")
def webhooks_worker(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    log_path: Path = tmp_path_factory.mktemp("tenants-logs") / "webhooks-worker.log"
    with running_webhooks_worker(env, log_path, concurrency=4):
        yield


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def test_another_keys_job_is_a_404_like_one_that_never_existed(api: httpx.Client) -> None:
    # No worker serves tiny-features: the job stays queued, so a cancel would succeed.
    body = {"model": "tiny-features", "inputs": ["private"], "id": "alices-job"}
    body["webhook"] = {"url": "https://hooks.example.com/in?token=alice-token"}
    assert api.post("/v1/jobs", json=body, headers=_as(KEY_A)).status_code == 202

    missing = api.get("/v1/jobs/no-such-job", headers=_as(KEY_B))
    for response in (
        api.get("/v1/jobs/alices-job", headers=_as(KEY_B)),
        api.get("/v1/jobs/alices-job", params={"wait": 1}, headers=_as(KEY_B)),
        api.delete("/v1/jobs/alices-job", headers=_as(KEY_B)),
        # Nor by naming the id as it is stored.
        api.get(f"/v1/jobs/{scoped_id(owner_of(KEY_A), 'alices-job')}", headers=_as(KEY_B)),
    ):
        assert response.status_code == 404, response.text
        assert "alice-token" not in response.text and "queued" not in response.text
        error = response.json()["error"]["message"]
        assert error.replace(response.url.path.rsplit("/", 1)[1], "ID") == missing.json()["error"][
            "message"
        ].replace("no-such-job", "ID")

    mine = api.get("/v1/jobs/alices-job", headers=_as(KEY_A))
    assert mine.status_code == 200 and mine.json()["status"] == "queued"
    assert mine.json()["id"] == "alices-job" and "owner" not in mine.json()
    cancelled = api.delete("/v1/jobs/alices-job", headers=_as(KEY_A))
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["id"] == "alices-job"


@pytest.mark.usefixtures("worker")
def test_two_keys_use_the_same_id_and_each_gets_its_own_job(
    api: httpx.Client, operator: Client
) -> None:
    alice = {"model": SERVED, "inputs": ["a fine day"], "id": "same"}
    bob = {"model": SERVED, "inputs": ["a bad day", "another day"], "id": "same"}
    for key, body in ((KEY_A, alice), (KEY_B, bob)):
        accepted = api.post("/v1/jobs", json=body, headers=_as(key))
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["id"] == "same"

    jobs = {
        key: api.get("/v1/jobs/same", params={"wait": 30}, headers=_as(key)).json()
        for key in (KEY_A, KEY_B)
    }
    assert jobs[KEY_A]["status"] == jobs[KEY_B]["status"] == "succeeded"
    assert len(jobs[KEY_A]["outputs"]) == 1 and len(jobs[KEY_B]["outputs"]) == 2
    assert all(job["id"] == "same" and "owner" not in job for job in jobs.values())

    # Stored apart, each under its owner; the operator's client reads them by the stored id.
    for key, count in ((KEY_A, 1), (KEY_B, 2)):
        record = operator.get(scoped_id(owner_of(key), "same"))
        assert record.owner == owner_of(key) and len(record.outputs or []) == count
    assert KEY_A not in str(operator.get(scoped_id(owner_of(KEY_A), "same")))
    # The same body again from its own key is the idempotent repeat, with its own id.
    again = api.post("/v1/jobs", json=alice, headers=_as(KEY_A))
    assert again.status_code == 200 and again.json() == {"id": "same", "status": "succeeded"}


def test_another_keys_id_is_free_and_a_conflict_shows_no_job(api: httpx.Client) -> None:
    hook = {"url": "https://hooks.example.com/in?token=alice-secret-token"}
    alice = {"model": "tiny-features", "inputs": ["alice's"], "id": "taken", "webhook": hook}
    assert api.post("/v1/jobs", json=alice, headers=_as(KEY_A)).status_code == 202

    # Bob's "taken" is his own job: not a 409 that would tell him Alice's exists, or show it.
    bob = {"model": "tiny-features", "inputs": ["bob's", "two"], "id": "taken"}
    accepted = api.post("/v1/jobs", json=bob, headers=_as(KEY_B))
    assert accepted.status_code == 202 and accepted.json() == {"id": "taken", "status": "queued"}
    assert "alice" not in accepted.text
    assert api.get("/v1/jobs/taken", headers=_as(KEY_B)).json().get("webhook") is None

    # Alice's own conflicting body: a 409 with an error, and nothing of the job in it.
    conflict = api.post(
        "/v1/jobs", json={**alice, "inputs": ["something else"]}, headers=_as(KEY_A)
    )
    assert conflict.status_code == 409
    assert set(conflict.json()) == {"error"} and "taken" in conflict.json()["error"]["message"]
    for leaked in ("alice-secret-token", "alice's", "queued", owner_of(KEY_A)):
        assert leaked not in conflict.text


@pytest.mark.usefixtures("worker", "webhooks_worker")
def test_each_keys_webhooks_are_signed_with_its_own_secret(
    api: httpx.Client, receiver: Receiver
) -> None:
    for key, path in ((KEY_A, "/alice"), (KEY_B, "/bob"), (KEY_C, "/carol")):
        body = {"model": SERVED, "inputs": ["ok"], "id": "hooked"}
        body["webhook"] = {"url": receiver.url(path)}
        assert api.post("/v1/jobs", json=body, headers=_as(key)).status_code == 202

    hits = {
        path: receiver.wait_for(path, lambda hits: len(hits) == 1)[0]
        for path in ("/alice", "/bob", "/carol")
    }

    # Alice's and Bob's: their own id, signed with their own secret and no other.
    for path, own, others in (
        ("/alice", SECRET_A, (SECRET_B, SHARED)),
        ("/bob", SECRET_B, (SECRET_A, SHARED)),
    ):
        hit = hits[path]
        assert hit.headers["webhook-id"] == "hooked.succeeded"
        job = verify(hit.body, hit.headers, own)
        assert job["id"] == "hooked" and job["status"] == "succeeded" and "owner" not in job
        for secret in others:
            with pytest.raises(InvalidSignature):
                verify(hit.body, hit.headers, secret)

    # Carol's, under the shared secret every tenant's webhooks may carry: its id names her, so
    # no key can get a shared-secret webhook for a bare id (or another key's) of its choosing.
    carol = hits["/carol"]
    stored = scoped_id(owner_of(KEY_C), "hooked")
    assert carol.headers["webhook-id"] == f"{stored}.succeeded"
    assert verify(carol.body, carol.headers, SHARED)["id"] == stored
    with pytest.raises(InvalidSignature):
        verify(carol.body, carol.headers, SECRET_A)
