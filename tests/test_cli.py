"""The `pipeq` command as a user runs it: the README's first command, `pipeq up` on the embedded
broker, `submit`, `models`."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from pipeq.cli.client_commands import parse_param
from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from pipeq.producer.manifest import parse_input


def _pipeq(
    *args: str, cwd: Path, env: dict[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeq.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No PIPEQ_BROKER_URL: the embedded filesystem broker and SQLite records under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEQ_")}
    return {**env, "PIPEQ_DATA_DIR": str(tmp_path / ".pipeq"), "PIPEQ_METRICS_PORT": "0", **extra}


def test_parse_param_reads_json_where_it_parses() -> None:
    assert parse_param("top_k=2") == ("top_k", 2)
    assert parse_param('candidate_labels=["a", "b"]') == ("candidate_labels", ["a", "b"])
    assert parse_param("language=en") == ("language", "en")


def test_parse_input(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert parse_input("https://example.com/a.jpg") == {"url": "https://example.com/a.jpg"}
    assert parse_input("s3://bucket/key.jpg") == {"s3": "s3://bucket/key.jpg"}
    assert parse_input(str(image)) == {"path": str(image.resolve())}
    assert parse_input("just some text") == "just some text"
    assert parse_input('{"data": "aGk=", "mime": "text/plain"}') == {
        "data": "aGk=",
        "mime": "text/plain",
    }


def test_demo_runs_every_task_offline(tmp_path: Path) -> None:
    """The README's first command, after set-up: `pipeq demo` on the embedded broker."""
    result = _pipeq("demo", cwd=tmp_path, env=_embedded_env(tmp_path), timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for model in (
        "minilm",
        "tiny-sentiment",
        "tiny-zeroshot",
        "tiny-vit",
        "tiny-whisper",
        "tiny-docqa",
    ):
        assert model in result.stdout
    assert "succeeded" in result.stdout and "cosine similarity" in result.stdout
    # It ends with the next step: the commands that serve what it built.
    export = re.search(r"export PIPEQ_MODELS=(\S+) PIPEQ_MEDIA_ROOTS=(\S+)", result.stdout)
    assert export is not None, result.stdout[-2000:]
    assert Path(export.group(1)).is_file() and Path(export.group(2)).is_dir()
    assert "pipeq up" in result.stdout and "curl -s localhost:8000/v1/jobs" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_up_serves_jobs_on_the_embedded_broker(tmp_path: Path, model_dir: Path) -> None:
    """`pipeq up` as a new user runs it, on the embedded broker; then the CLI over HTTP."""
    port = _free_port()
    env = _embedded_env(
        tmp_path, PIPEQ_MODELS=str(model_dir / "models.yaml"), PIPEQ_WEBHOOK_SECRET=WEBHOOK_SECRET
    )
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeq.cli", "up", "--port", str(port), "--gpus", "cpu"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90) as http:
            deadline = time.monotonic() + 180
            job = None
            while time.monotonic() < deadline and job is None:
                try:
                    response = http.post(
                        "/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["a fine day"]}
                    )
                    job = response.json()["id"]
                except httpx.TransportError:
                    assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
                    time.sleep(0.5)
            assert job is not None
            doc = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert doc["status"] == "succeeded", doc
            assert doc["outputs"][0][0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}
            assert http.get("/v1/models").json()["tiny-sentiment"]["workers"]
            # Not silently: webhooks need Redis, and `up` says so.
            assert (
                "webhooks are not sent on the embedded broker" in (tmp_path / "up.log").read_text()
            )
        # The same job read back by `pipeq submit`'s sibling machinery: the CLI on the same data dir.
        listed = _pipeq("models", cwd=tmp_path, env=env)
        assert json.loads(listed.stdout)["tiny-sentiment"]["task"] == "text-classification"
        submitted = _pipeq(
            "submit",
            "tiny-sentiment",
            "what a film",
            "--param",
            "top_k=2",
            "--wait",
            "60",
            cwd=tmp_path,
            env=env,
        )
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        printed = json.loads(submitted.stdout)
        assert printed["status"] == "succeeded" and len(printed["outputs"][0]) == 2
        _http_first_cli(tmp_path, env, f"http://127.0.0.1:{port}")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        log.close()
    # Nothing `pipeq up` started outlives it.
    deadline = time.monotonic() + 60
    while _children_of_data_dir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children_of_data_dir(tmp_path)


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"pipeq-up-test-secret-0123").decode()


class _Receiver:
    """A webhook receiver on loopback that keeps the bodies it is sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.received = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                owner.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                owner.received.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def _kill_worker_of(tmp_path: Path) -> None:
    """SIGKILL the `pipeq worker` supervisor that `up` started for this test's data dir."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if (
            cmdline[1:5] == [b"-m", b"pipeq.cli", b"worker", b"--gpus"]
            and str(tmp_path).encode() in environ
        ):
            os.kill(int(proc.name), signal.SIGKILL)
            return
    raise AssertionError("no worker of `pipeq up` found")


def _http_first_cli(tmp_path: Path, env: dict[str, str], url: str) -> None:
    """`pipeq submit`, `get` and `cancel` over the HTTP API, as a web team runs them: a local
    file is read and sent inline (the worker has no PIPEQ_MEDIA_ROOTS to read its path), and
    each expected failure is one line and a non-zero exit, never a traceback."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)
    done = _pipeq(
        "submit", "tiny-vit", str(photo), "--url", url, "--wait", "60", cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded", job
    got = _pipeq("get", job["id"], "--url", url, cwd=tmp_path, env=env)
    assert got.returncode == 0 and json.loads(got.stdout)["outputs"] == job["outputs"]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{unused.getsockname()[1]}"
    failures = {
        ("cancel", job["id"], "--url", url): "pipeq: JobConflict: job ",
        ("submit", "tiny-sentiment", "nope.png", "--url", url): (
            "pipeq: InvalidInput: no such file: nope.png"
        ),
        ("submit", "tiny-sentiment", "{not json", "--url", url): (
            "pipeq: InvalidInput: INPUT '{not json' is not valid JSON"
        ),
        ("submit", "tiny-vit", "some text", "--url", url): (
            "pipeq: InvalidInput: inputs[0] is text; tiny-vit"
        ),
        ("get", job["id"], "--url", down): (
            f"pipeq: ServiceUnavailable: the API at {down} cannot be reached"
        ),
    }
    for args, start in failures.items():
        failed = _pipeq(*args, cwd=tmp_path, env=env, timeout_s=60)
        assert failed.returncode != 0, args
        assert failed.stderr.startswith(start) and failed.stderr.count("\n") == 1, failed.stderr


def _start_up(tmp_path: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    log = (tmp_path / "up.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeq.cli", "up", "--port", str(port), "--gpus", "cpu"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop_up(up: subprocess.Popen[bytes], tmp_path: Path) -> None:
    up.send_signal(signal.SIGTERM)
    up.wait(60)
    deadline = time.monotonic() + 60
    while _children_of_data_dir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children_of_data_dir(tmp_path)


def test_up_supervises_its_children_and_sends_webhooks(
    tmp_path: Path, model_dir: Path, worker_env: dict[str, str]
) -> None:
    """On Redis: `up` starts the webhook sender (a job's webhook reaches its receiver),
    `/v1/models` names the live workers, and a worker killed under `up` is started again."""
    port = _free_port()
    receiver = _Receiver()
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(broker).flushdb()
    env = _embedded_env(
        tmp_path,
        PIPEQ_MODELS=str(model_dir / "models.yaml"),
        PIPEQ_BROKER_URL=broker,
        PIPEQ_WEBHOOK_SECRET=WEBHOOK_SECRET,
        PIPEQ_ALLOW_PRIVATE_URLS="true",
        PIPEQ_LEASE_S="5",
    )
    up = _start_up(tmp_path, env, port)
    log = tmp_path / "up.log"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90) as http:
            hooked = _submit_when_up(http, up, log, {"url": receiver.url, "events": ["succeeded"]})
            assert receiver.received.wait(120), log.read_text()[-3000:]
            assert json.loads(receiver.bodies[0])["id"] == hooked
            assert http.get("/v1/models").json()["tiny-sentiment"]["workers"]
            _kill_worker_of(tmp_path)
            again = http.post("/v1/jobs", json={"model": "tiny-sentiment", "inputs": ["again"]})
            job_id = again.json()["id"]
            deadline = time.monotonic() + 180
            doc = http.get(f"/v1/jobs/{job_id}").json()
            while doc["status"] != "succeeded" and time.monotonic() < deadline:
                doc = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
            assert doc["status"] == "succeeded", log.read_text()[-3000:]
            assert "pipeq up: worker exited with -9; starting it again in 1 s" in log.read_text()
    finally:
        receiver.close()
        _stop_up(up, tmp_path)


def test_up_stops_when_its_worker_cannot_start(tmp_path: Path) -> None:
    """A model that cannot load (offline, not on disk): `up` exits non-zero, names the model and
    says where a local registry comes from, instead of an API that takes jobs nobody runs."""
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n  ghost:\n    task: text-classification\n    model: /nowhere/ghost-model\n"
    )
    env = _embedded_env(tmp_path, PIPEQ_MODELS=str(registry), HF_HUB_OFFLINE="1")
    up = _start_up(tmp_path, env, _free_port())
    assert up.wait(240) == 1
    log = (tmp_path / "up.log").read_text()
    assert "model 'ghost' (/nowhere/ghost-model) failed to load" in log, log[-3000:]
    assert "needs a local registry: point PIPEQ_MODELS at one" in log
    _stop_up(up, tmp_path)


def _submit_when_up(
    http: httpx.Client, up: subprocess.Popen[bytes], log: Path, webhook: dict[str, Any]
) -> str:
    """Submit a job with `webhook` once the API answers; its id."""
    body = {"model": "tiny-sentiment", "inputs": ["hooked"], "webhook": webhook}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            return str(http.post("/v1/jobs", json=body).json()["id"])
        except httpx.TransportError:
            assert up.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError("the API of `pipeq up` never answered")


def _children_of_data_dir(tmp_path: Path) -> list[str]:
    """pipeq processes whose environment names this test's data dir (the worker, Flower)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if b"pipeq.cli" in cmdline and str(tmp_path).encode() in environ and state != "Z":
            found.append(proc.name)
    return found


def test_bad_registry_is_refused_with_the_field_named(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  m:\n    task: text-classification\n    model: x\n    max_batch: 4\n")
    result = _pipeq("models", cwd=tmp_path, env=_embedded_env(tmp_path, PIPEQ_MODELS=str(bad)))
    assert result.returncode == 2
    assert (
        "models.m.max_batch" in result.stderr and "Extra inputs are not permitted" in result.stderr
    )


@pytest.mark.parametrize("value", ["not-a-number"])
def test_bad_setting_is_refused(tmp_path: Path, value: str) -> None:
    result = _pipeq(
        "models", cwd=tmp_path, env=_embedded_env(tmp_path, PIPEQ_MAX_MEDIA_BYTES=value)
    )
    assert result.returncode == 2
    assert "max_media_bytes" in result.stderr


@pytest.mark.parametrize("command", [["models"], ["submit", "tiny-sentiment", "x"]])
def test_unknown_setting_stops_every_command(tmp_path: Path, command: list[str]) -> None:
    env = _embedded_env(tmp_path, PIPEQ_BORKER_URL="redis://127.0.0.1:6379/0")
    done = _pipeq(*command, cwd=tmp_path, env=env, timeout_s=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "pipeq: ConfigError: unknown setting PIPEQ_BORKER_URL; did you mean PIPEQ_BROKER_URL?"
    )
    assert not (tmp_path / ".pipeq").exists()  # nothing started, nothing queued


def test_submit_from_any_folder_reaches_one_embedded_broker(tmp_path: Path) -> None:
    """Without PIPEQ_DATA_DIR, `pipeq submit` from two folders queues both jobs in the user's
    one data folder (XDG_DATA_HOME here), not a `.pipeq/` in each."""
    env = _embedded_env(tmp_path, XDG_DATA_HOME=str(tmp_path / "xdg"))
    del env["PIPEQ_DATA_DIR"]
    ids = []
    for folder in ("web", "scripts"):
        (tmp_path / folder).mkdir()
        done = _pipeq("submit", "sentiment", f"from {folder}", cwd=tmp_path / folder, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        ids.append(json.loads(done.stdout)["id"])
        assert not (tmp_path / folder / ".pipeq").exists()
    # No worker: a --wait that runs out says so in one line and exits non-zero.
    waited = _pipeq("submit", "sentiment", "x", "--wait", "0.5", cwd=tmp_path / "web", env=env)
    assert waited.returncode == 1
    assert waited.stderr.strip().endswith("is still queued after 0.5 s")
    ids.append(json.loads(waited.stdout)["id"])
    data_dir = tmp_path / "xdg" / "pipeq"
    # Explicitly embedded: this test process may hold the suite's PIPEQ_BROKER_URL.
    client = Client(Settings(data_dir=data_dir, broker_url=None, result_url=None))
    assert [client.get(job_id).status for job_id in ids] == ["queued"] * 3
    assert len(list((data_dir / "broker").glob("*.msg"))) == 3


def test_version(tmp_path: Path) -> None:
    done = _pipeq("--version", cwd=tmp_path, env=_embedded_env(tmp_path), timeout_s=60)
    assert done.returncode == 0 and done.stdout.strip() == "pipeq 0.1.0"
