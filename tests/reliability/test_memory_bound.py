"""A worker's memory bound fails the input that needs too much, not the worker.

A 40 MP RGBA PNG (at PIPEQ_MAX_IMAGE_PIXELS, a few hundred KiB on the wire) decodes to 160 MB and
to 120 MB more as RGB. With PIPEQ_WORKER_MEMORY_HEADROOM_MB at 96 its decode fails with
MemoryError, which becomes that input's OutOfMemory, and the worker serves the next job. Without
the bound the image decodes and the job succeeds.

The bomb has a job of its own: while it holds memory at the bound, any allocation in the process
fails, and a forward pass starting then would fail too (or, for OpenMP's first thread team on a
thread, abort the process); a small image is run first so that team exists."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from pipeq.producer.client import Client

pytestmark = pytest.mark.reliability


def _png(width: int, height: int, mode: str) -> dict[str, str]:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "white").save(buffer, "PNG")
    return {"data": base64.b64encode(buffer.getvalue()).decode(), "mime": "image/png"}


def test_an_image_over_the_memory_bound_fails_alone(
    start_worker: Any, own_env: dict[str, str], own_client: Client
) -> None:
    client = own_client  # a Redis of its own: no other worker (the session's) may take the bomb
    worker = start_worker(
        "--models",
        "tiny-vit",
        "--concurrency",
        "1",
        name="bounded@%h",
        env={**own_env, "PIPEQ_WORKER_MEMORY_HEADROOM_MB": "96", "PIPEQ_LOG_LEVEL": "INFO"},
    )
    assert "worker private memory bounded at" in worker.log_path.read_text()
    bomb, small = _png(10_000, 4_000, "RGBA"), _png(64, 48, "RGB")
    assert client.wait(client.submit("tiny-vit", [small]), 60).status == "succeeded"

    doc = client.wait(client.submit("tiny-vit", [bomb]), 120)

    assert doc.status == "failed", doc
    assert doc.errors is not None and doc.errors[0] is not None
    assert doc.errors[0].type == "OutOfMemory", doc.errors[0]
    assert worker.proc.poll() is None, "the worker died"
    again = client.wait(client.submit("tiny-vit", [small, small]), 60)
    assert again.status == "succeeded" and again.errors == [None, None], again
