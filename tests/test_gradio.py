"""`pipeq gradio`: the page served against the session worker, driven in headless Chromium.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright's Python package, as in
tests/test_monitoring.py. DOCS_SCREENSHOT=1 also writes the screenshot to docs/gradio.png.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from tests.parity import reference_pipeline

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from pipeq.producer.gradio_app import build_app, launch_page  # noqa: E402 - gradio reads it at import

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "gradio.png"
RESULT_TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(client: Client, session_worker: Any) -> Iterator[Callable[[str], str]]:
    """Start `model`'s page in this process (gradio's own server thread); return its URL."""
    apps: list[Any] = []

    def start(model: str) -> str:
        app = build_app(client, model)
        apps.append(app)
        port = _free_port()
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        return f"http://127.0.0.1:{port}"

    yield start
    for app in apps:
        app.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 700})
    yield context.new_page()
    context.close()


def _submit_and_read_labels(page: Any) -> tuple[str, list[tuple[str, int]]]:
    """Submit, wait for the job to finish; the gr.Label's heading and (label, percent) rows."""
    page.click("#submit")
    page.wait_for_function(
        "() => /succeeded|failed|expired/.test(document.querySelector('#status textarea').value)",
        timeout=RESULT_TIMEOUT_MS,
    )
    status = page.input_value("#status textarea")
    assert "succeeded" in status, status
    heading = str(page.inner_text("#labels [data-testid='label-output-value']")).strip()
    # inner_text reads "Labels", the heading, then one label line and one "34%" line per row.
    rows = str(page.inner_text("#labels")).splitlines()[2:]
    pairs = zip(rows[::2], rows[1::2], strict=True)
    return heading, [(label, int(percent.rstrip("%"))) for label, percent in pairs]


def _assert_shows(shown: tuple[str, list[tuple[str, int]]], output: list[dict[str, Any]]) -> None:
    heading, rows = shown
    want = sorted(output, key=lambda item: -item["score"])
    assert heading == want[0]["label"]
    assert [label for label, _ in rows] == [item["label"] for item in want]
    for (label, percent), item in zip(rows, want, strict=True):
        assert abs(percent - 100 * item["score"]) <= 1, (label, percent, item)


def test_image_upload_shows_pipelines_labels(
    serve: Callable[[str], str], page: Any, settings: Settings, tmp_path: Path
) -> None:
    image_path = tmp_path / "shapes.png"
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 200, 160), fill="darkblue")
    image.save(image_path)

    page.goto(serve("tiny-vit"))
    page.set_input_files("#image input[type=file]", str(image_path))
    shown = _submit_and_read_labels(page)

    _assert_shows(shown, reference_pipeline(settings.models, "tiny-vit")(str(image_path)))
    shot = DOCS_PNG if os.environ.get("DOCS_SCREENSHOT") == "1" else tmp_path / "gradio.png"
    page.screenshot(path=str(shot), full_page=True)


def test_text_shows_pipelines_labels(
    serve: Callable[[str], str], page: Any, settings: Settings
) -> None:
    text = "what a wonderful film"
    page.goto(serve("tiny-sentiment"))
    page.fill("#text textarea", text)
    shown = _submit_and_read_labels(page)

    _assert_shows(shown, reference_pipeline(settings.models, "tiny-sentiment")(text))


def test_zero_shot_shows_pipelines_labels(
    serve: Callable[[str], str], page: Any, settings: Settings
) -> None:
    text, labels = "my order never arrived", ["delivery", "price", "quality"]
    page.goto(serve("tiny-zeroshot"))
    page.fill("#text textarea", text)
    page.fill("#candidate_labels textarea", ", ".join(labels))
    shown = _submit_and_read_labels(page)

    want = reference_pipeline(settings.models, "tiny-zeroshot")(text, candidate_labels=labels)
    scored = zip(want["labels"], want["scores"], strict=True)
    _assert_shows(shown, [{"label": label, "score": score} for label, score in scored])


def test_a_keyed_service_puts_its_page_behind_an_api_key(
    settings: Settings, session_worker: Any
) -> None:
    # The page submits to the queue directly, so without a login of its own it would run jobs
    # for callers the API turns away (PIPEQ_API_KEYS).
    from gradio_client import Client as GradioClient
    from gradio_client.exceptions import AuthenticationError

    keyed = Client(settings.model_copy(update={"api_keys": ["key-one", "key-two"]}))
    port = _free_port()
    app = launch_page(keyed, "tiny-sentiment", "127.0.0.1", port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.post(f"{url}/gradio_api/call/run", json={"data": ["hi"]}).status_code == 401
        with pytest.raises(AuthenticationError):
            GradioClient(url, verbose=False)
        with pytest.raises(ValueError, match="login"):
            GradioClient(url, auth=("anyone", "not-a-key"), verbose=False)
        page = GradioClient(url, auth=("anyone", "key-two"), verbose=False)
        status, labels = page.predict("what a wonderful film", api_name="/run")
        assert "succeeded" in status, status
        assert labels["label"] in [row["label"] for row in labels["confidences"]], labels
    finally:
        app.close()
