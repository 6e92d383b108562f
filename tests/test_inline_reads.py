"""Inputs by path or inline bytes, for a model that only reads them (`reads_inline`: the GPU
image pipeline's JPEGs), are read on the intake thread and reach the forward process with the
rest of their window, a block of 64 at a time, each answering as `pipeline()` on it alone; a path
that is missing fails alone."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from transformers import pipeline

from pipeq.config.registry import ModelSpec
from pipeq.config.settings import Settings
from pipeq.core.records import open_records
from pipeq.worker.batcher import WorkItem
from pipeq.worker.block_stages import BlockStages
from pipeq.worker.forward_client import ForwardClient
from pipeq.worker.forward_server import ForwardModel, ForwardServer, _Reports
from pipeq.worker.job_run import JobRun, ServedModel
from pipeq.worker.media import MediaLoader
from pipeq.worker.pipelines import StagedPipeline
from pipeq.worker.runner import JobRunner


class _ReadsInline(StagedPipeline):
    reads_inline = True


class _CountedClient(ForwardClient):
    """A forward client that notes how many parts each submission carries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list[int] = []

    def submit(self, items: list[WorkItem]) -> None:
        self.submitted.append(len(items))
        super().submit(items)


@pytest.fixture()
def served(model_dir: Path, tmp_path: Path) -> Iterator[ServedModel]:
    """tiny-vit behind a forward server on a unix socket (in this process's threads)."""
    path = str(model_dir / "models" / "tiny-vit")
    spec = ModelSpec(name="tiny-vit", task="image-classification", model=path, max_batch_size=16)
    staged = _ReadsInline(spec, pipeline("image-classification", model=path, device="cpu"))
    reports = _Reports()
    batcher = BlockStages(staged).batcher(spec, reports).start()
    socket = str(tmp_path / "forward.sock")
    listener = Listener(socket, family="AF_UNIX")
    stop = threading.Event()
    server = ForwardServer({"tiny-vit": ForwardModel(staged, batcher, reports)})
    threading.Thread(target=server.serve, args=(listener, stop), daemon=True).start()
    client = _CountedClient(
        staged, partial(Client, socket, family="AF_UNIX"), max_batch_size=16
    ).start()
    yield ServedModel(staged, client, threading.Semaphore(128))  # room for the whole window
    client.stop()
    stop.set()
    listener.close()
    batcher.stop()


def test_a_window_of_local_images_goes_in_blocks(
    settings: Settings, media_dir: Path, served: ServedModel
) -> None:
    images = []
    for shade in range(70):
        image = media_dir / f"inline-{shade}.png"
        Image.new("RGB", (40 + shade % 7, 30), (shade * 3, 90, 250 - shade * 3)).save(image)
        images.append(image)
    inputs: list[Any] = [{"path": str(image)} for image in images]
    inputs.append({"data": base64.b64encode(images[0].read_bytes()).decode(), "mime": "image/png"})
    inputs.append({"path": str(media_dir / "not-there.png")})
    messages = [
        {
            "id": uuid.uuid4().hex,
            "model": "tiny-vit",
            "inputs": [item],
            "params": {"top_k": 3},
            "lane": "interactive",
            "submitted_at": time.time(),
        }
        for item in inputs
    ]
    records = open_records(settings.effective_result_url, settings.result_ttl_s)
    runner = JobRunner(
        settings, records, {"tiny-vit": served}, MediaLoader(settings), prefetch_threads=2
    )
    ready: list[JobRun] = []
    done = threading.Event()

    def on_ready(run: JobRun) -> None:
        ready.append(run)
        if len(ready) == len(messages):
            done.set()

    runs = runner.claim([(message, None) for message in messages], "inline@test")
    runner.start([run for run in runs if run is not None], on_ready)
    assert done.wait(60)
    runner.close()
    # The 71 readable inputs crossed as a block of 64 once read, then the rest at the window's
    # end; the missing file never got that far.
    assert served.batcher.submitted == [64, 7]  # type: ignore[attr-defined]
    reference = served.staged.pipe
    by_id = {run.job.id: runner.finish(run) for run in ready}
    for message, item in zip(messages, inputs, strict=True):
        doc = by_id[message["id"]]
        if "not-there" in item.get("path", ""):
            assert doc.status == "failed" and doc.errors[0].type == "MediaNotFound"
            continue
        source = images[0] if "data" in item else Path(item["path"])
        want = reference(Image.open(source).convert("RGB"), top_k=3)
        got = doc.outputs[0]
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-4)
