"""Monitoring: `pipeq flower` read in headless Chromium, worker and API metrics after real jobs.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/setup), driven by Playwright's Python
package; Playwright's own browser download is never used. DOCS_SCREENSHOT=1 also writes the
Flower screenshot to docs/flower.png.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from playwright.sync_api import Error as PlaywrightError

from pipeq.config.errors import ErrorInfo
from pipeq.config.queues import RUN_TASK, queue_name
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument
from pipeq.core.queue_depth import priority_keys
from pipeq.producer.api import create_app
from pipeq.producer.client import Client
from pipeq.worker.task_events import outcome_event

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "flower.png"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _own_broker(worker_env: dict[str, str], db: int) -> str:
    """A broker database of this module's own, so the session worker cannot take its jobs."""
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(broker).flushdb()
    return broker


class Flower:
    def __init__(self, url: str, user: str, password: str, log_path: Path) -> None:
        self.url, self.user, self.password, self.log_path = url, user, password, log_path


@contextmanager
def _running_flower(env: dict[str, str], log_path: Path) -> Iterator[Flower]:
    """`pipeq flower` on `env`'s broker, with credentials, until the block ends."""
    port, password = _free_port(), secrets.token_urlsafe(12)
    env = {**os.environ, **env, "PIPEQ_FLOWER_BASIC_AUTH": f"ops:{password}"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq.cli", "flower", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/healthcheck", timeout=2)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = log_path.read_text()[-4000:]
                raise RuntimeError(f"flower did not start:\n{tail}") from None
            time.sleep(0.2)
    try:
        yield Flower(url, "ops", password, log_path)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def flower(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Flower]:
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    with _running_flower(worker_env, log_path) as running:
        yield running


def _logged_in(browser: Any, flower: Flower, **options: Any) -> Any:
    """A browser context that sends Flower's credentials."""
    credentials = {"username": flower.user, "password": flower.password}
    return browser.new_context(http_credentials=credentials, **options)


def _page_until(page: Any, url: str, pattern: str, timeout_s: float = 30) -> str:
    """Load `url` until its rendered text matches `pattern`; Flower learns from events, which
    arrive a moment after the fact."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(url)
        page.wait_for_load_state("networkidle")
        text = str(page.inner_text("main, body >> nth=0"))
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _cells(page: Any, table: str, contains: str) -> dict[str, str]:
    """One row of a Flower table as {column: text}; text_content, as narrow cells clip."""
    columns = page.locator(f"{table} thead th").evaluate_all(
        "ths => ths.map(th => th.dataset.column || th.textContent.trim())"
    )
    row = page.locator(f"{table} tbody tr", has_text=contains)
    cells = [str(text).strip() for text in row.locator("td").all_text_contents()]
    return dict(zip(columns, cells, strict=True))


def _stack(shots: list[Path], out: Path) -> None:
    from PIL import Image

    images = [Image.open(shot) for shot in shots]
    size = (max(i.width for i in images), sum(i.height for i in images))
    canvas = Image.new("RGB", size, "white")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    canvas.save(out, optimize=True)


def test_flower_shows_pipeq_worker_and_finished_job(
    flower: Flower, browser: Any, session_worker: Any, client: Client, tmp_path: Path
) -> None:
    context = _logged_in(browser, flower, viewport={"width": 1700, "height": 420})
    page = context.new_page()
    _page_until(page, f"{flower.url}/workers", r"session@")
    worker = _cells(page, "#workers-table", "session@")
    assert re.fullmatch(r"session@\S+", worker["Worker"]), worker
    assert worker["Status"] == "Online", worker

    # Flower keeps only the events it sees, so the jobs are run once it sees the worker.
    jobs = [
        client.submit("tiny-sentiment", ["a fine day"]),
        client.submit("tiny-sentiment", ["rain again", "sun at last"], priority="bulk"),
        client.submit("tiny-features", ["an embedding"]),
    ]
    docs = [client.wait(job_id, timeout_s=120) for job_id in jobs]
    assert [doc.status for doc in docs] == ["succeeded"] * 3
    page.goto(f"{flower.url}/workers")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(tmp_path / "workers.png"), full_page=True)

    tasks = _page_until(page, f"{flower.url}/tasks", "(?s)" + ".*".join(jobs[::-1]))
    for job_id in jobs:
        assert job_id in tasks
    row = _cells(page, "#tasks-table", jobs[1])
    assert row["name"] == "pipeq.run" and row["state"] == "SUCCESS", row
    assert row["args"] == "tiny-sentiment x2 bulk", row  # the producer's argsrepr, not inputs
    assert row["worker"] == worker["Worker"], row
    assert re.fullmatch(r"[\d.]+ m?s", row["runtime"]), row
    page.screenshot(path=str(tmp_path / "tasks.png"), full_page=True)
    _stack([tmp_path / "workers.png", tmp_path / "tasks.png"], tmp_path / "flower.png")
    if os.environ.get("DOCS_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "flower.png", DOCS_PNG)

    task = _page_until(page, f"{flower.url}/task/{jobs[0]}", "SUCCESS")
    assert "pipeq.run" in task and "tiny-sentiment x1 interactive" in task
    assert "a fine day" not in task  # inputs never reach Flower
    context.close()


def test_flower_shows_failed_and_partly_failed_jobs(
    flower: Flower, browser: Any, session_worker: Any, client: Client, media_dir: Path
) -> None:
    """A job whose every input failed is a FAILURE (Flower's Failed filter finds it); one with
    some failed inputs stays a SUCCESS, its counts as the result."""
    context = _logged_in(browser, flower, viewport={"width": 1500, "height": 600})
    page = context.new_page()
    _page_until(page, f"{flower.url}/workers", r"session@")
    from PIL import Image

    good = {"path": str(media_dir / "flower-ok.png")}
    Image.new("RGB", (32, 32), "teal").save(good["path"])
    bad = {"path": str(media_dir / "flower-missing.png")}  # MediaNotFound
    failed = client.submit("tiny-vit", [bad])
    partly = client.submit("tiny-vit", [good, bad, good, good])
    assert client.wait(failed, timeout_s=120).status == "failed"
    doc = client.wait(partly, timeout_s=120)
    assert doc.status == "succeeded" and doc.errors and doc.errors[1]
    assert doc.errors[1].type == "MediaNotFound"

    _page_until(page, f"{flower.url}/tasks", f"(?s){failed}.*FAILURE|FAILURE.*{failed}")
    row = _cells(page, "#tasks-table", failed)
    assert row["state"] == "FAILURE", row
    assert _cells(page, "#tasks-table", partly)["state"] == "SUCCESS"
    assert _cells(page, "#tasks-table", partly)["result"] == "3 succeeded, 1 failed"
    page.click("button.task-state-filter[data-task-state=FAILURE]")
    page.wait_for_load_state("networkidle")
    page.locator("#tasks-table tbody tr", has_text=failed).wait_for()
    listed = page.inner_text("#tasks-table tbody")
    assert failed in listed and partly not in listed

    task = _page_until(page, f"{flower.url}/task/{failed}", "FAILURE")
    assert "MediaNotFound: " in task and "(0 succeeded, 1 failed)" in task, task
    task = _page_until(page, f"{flower.url}/task/{partly}", "SUCCESS")
    assert "3 succeeded, 1 failed" in task, task
    context.close()
    api = httpx.get(f"{flower.url}/api/tasks", auth=(flower.user, flower.password), timeout=10)
    assert api.json()[failed]["state"] == "FAILURE"
    assert api.json()[partly]["state"] == "SUCCESS"


def test_flower_outcome_of_expired_and_bare_failures() -> None:
    expired = ErrorInfo(type="Expired", message="the deadline passed")
    record = JobDocument(id="j", model="m", status="expired", errors=[expired, expired])
    assert outcome_event(record) == (
        "task-failed",
        {"exception": "Expired: the deadline passed (0 succeeded, 2 failed)"},
    )
    # A failure with no per-input errors still fails in Flower, named by its status.
    assert outcome_event(record.model_copy(update={"status": "failed", "errors": None})) == (
        "task-failed",
        {"exception": "failed (0 succeeded, 0 failed)"},
    )
    assert outcome_event(None) == ("task-succeeded", {"result": "nothing to do"})


def test_flower_broker_page_lists_pipeq_queues(
    worker_env: dict[str, str], browser: Any, settings: Settings, tmp_path: Path
) -> None:
    """The Broker page reads pipeq's Redis queues (it said "'redis' broker is not supported"),
    counting every priority step's list. Its own broker database: no worker takes the jobs."""
    broker = _own_broker(worker_env, 10)
    idle = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    for text in ("one", "two"):
        idle.submit("tiny-sentiment", [text])
    queue = queue_name("tiny-vit", "bulk")
    idle.celery.send_task(RUN_TASK, args=[{"id": "not-a-job"}], queue=queue, priority=5)
    env = {**worker_env, "PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker}
    with _running_flower(env, tmp_path / "flower.log") as own:
        context = _logged_in(browser, own)
        page = context.new_page()
        text = _page_until(page, f"{own.url}/broker", r"pipeq\.tiny-vit\.bulk")
        assert "not supported" not in text and "redis://" in text, text
        sentiment = _cells(page, "#queue-table", queue_name("tiny-sentiment", "interactive"))
        assert sentiment["Messages"] == "2", sentiment
        assert _cells(page, "#queue-table", queue)["Messages"] == "1"
        assert (
            _cells(page, "#queue-table", queue_name("tiny-vit", "interactive"))["Messages"] == "0"
        )
        context.close()


def test_flower_refuses_without_credentials(flower: Flower, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
        page.goto(f"{flower.url}/workers")  # headless Chromium has no prompt: the 401 is final
    page = context.new_page()  # the first one is busy showing its error page
    page.goto(f"{flower.url}/healthcheck")
    answers = page.evaluate(
        """async () => Promise.all(['/workers', '/tasks', '/api/workers'].map(async path => {
            const response = await fetch(path, {credentials: 'omit'});
            return [response.status, response.headers.get('www-authenticate')];
        }))"""
    )
    assert [status for status, _ in answers] == [401] * 3, answers
    assert answers[0][1] == 'Basic realm="flower"', answers  # the pages ask for basic auth
    context.close()
    wrong = httpx.get(f"{flower.url}/tasks", auth=("ops", "not-the-password"), timeout=10)
    assert wrong.status_code == 401


def _samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in the Prometheus text format."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{.*\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def test_worker_metrics_count_the_jobs_run(
    start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    broker = _own_broker(worker_env, 11)
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    port = _free_port()
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker, "PIPEQ_METRICS_PORT": str(port)}
    start_worker("--models", "tiny-sentiment", name="metrics@%h", env=env)
    scrape = f"http://127.0.0.1:{port}/metrics"
    before = httpx.get(scrape, timeout=10).text
    assert set(_samples(before, "pipeq_batch_size_count").values()) <= {0.0}
    assert set(_samples(before, "pipeq_jobs_total").values()) <= {0.0}

    inputs: list[list[Any]] = [["one"], ["two", "three"], ["four"], ["five", "six", "seven"], ["8"]]
    ids = [own.submit("tiny-sentiment", texts) for texts in inputs]
    assert all(own.wait(job_id, timeout_s=120).status == "succeeded" for job_id in ids)

    after = httpx.get(scrape, timeout=10).text
    model = 'model="tiny-sentiment"'
    jobs = _samples(after, "pipeq_jobs_total")
    assert jobs == {f'{{{model},status="succeeded"}}': len(inputs)}
    assert _samples(after, "pipeq_inputs_total") == {f'{{{model},outcome="ok"}}': 8.0}
    batches = _samples(after, "pipeq_batch_size_count")[f"{{{model}}}"]
    assert 1 <= batches <= 8
    assert _samples(after, "pipeq_batch_size_sum")[f"{{{model}}}"] == 8
    assert _samples(after, "pipeq_items_forwarded_total")[f"{{{model}}}"] == 8
    waits = _samples(after, "pipeq_queue_wait_seconds_count")
    assert waits[f'{{lane="interactive",{model}}}'] == len(inputs)
    assert _samples(after, "pipeq_pipeline_load_seconds")[f"{{{model}}}"] > 0


def test_api_metrics_show_queue_depth(worker_env: dict[str, str], settings: Settings) -> None:
    broker = _own_broker(worker_env, 10)
    idle = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    http = TestClient(create_app(idle))
    for lane, count in (("interactive", 3), ("bulk", 5)):
        for i in range(count):
            body = {"model": "tiny-sentiment", "inputs": [f"text {i}"], "priority": lane}
            assert http.post("/v1/jobs", json=body).status_code == 202
    # A message at a non-zero priority goes to another Redis list (kombu's priority steps).
    queue = queue_name("tiny-vit", "bulk")
    idle.celery.send_task(RUN_TASK, args=[{"id": "not-a-job"}], queue=queue, priority=5)
    step_keys = priority_keys(queue, idle.celery.conf.broker_transport_options)
    lengths = [redis.Redis.from_url(broker).llen(key) for key in step_keys]
    assert lengths[0] == 0 and sum(lengths) == 1, lengths

    text = http.get("/metrics").text
    depth = _samples(text, "pipeq_queue_depth")
    assert depth['{lane="interactive",model="tiny-sentiment"}'] == 3
    assert depth['{lane="bulk",model="tiny-sentiment"}'] == 5
    assert depth['{lane="bulk",model="tiny-vit"}'] == 1
    assert depth['{lane="interactive",model="tiny-vit"}'] == 0
    age = _samples(text, "pipeq_queue_oldest_age_seconds")
    assert 0 < age['{lane="interactive",model="tiny-sentiment"}'] < 60
    assert 0 < age['{lane="bulk",model="tiny-sentiment"}'] < 60
    # The priority-5 message is no pipeq job: it counts as waiting but has no known age.
    assert '{lane="bulk",model="tiny-vit"}' not in age
    posted = _samples(text, "pipeq_api_requests_total")
    assert posted['{route="/v1/jobs",status="202"}'] == 8
