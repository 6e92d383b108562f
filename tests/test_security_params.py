"""Call params are an allow-list per task (issue 23, points 1 and 2, and the OCR timeout).

Each demonstration of the review is replayed through the real path: the API and Client refuse
the params at submit, a message published by hand (past that check) fails in a real worker with
a typed error and touches nothing, valid params still answer as pipeline() does, chunks are made
as the batcher takes them, and OCR that runs past PIPEQ_OCR_TIMEOUT_S fails only its input.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf
from PIL import Image

from pipeq.config.errors import InvalidParams, JobNotFound
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument, JobRequest
from pipeq.producer.client import Client
from pipeq.worker.batcher import Batcher, WorkItem
from pipeq.worker.feeding import feed
from pipeq.worker.job_run import ServedModel
from pipeq.worker.progress import ProgressTracker
from tests.parity import assert_close, reference_pipeline
from tests.test_api import serve
from tests.test_speech_documents import _invoice

LEAKED_PASSWD_LINE = "root:x:0:0"


@pytest.fixture(scope="module")
def api(client: Client) -> Iterator[httpx.Client]:
    yield from serve(client)


@pytest.fixture(scope="module")
def invoice(media_dir: Path) -> Path:
    return _invoice(media_dir / "security-invoice.png")


REFUSED = [
    # Tesseract read /etc/passwd and the job's error quoted it.
    ("tiny-docqa", {"tesseract_config": "--oem 0 /etc/passwd"}, "tesseract_config"),
    ("tiny-docqa", {"lang": "eng"}, "lang"),
    # 0.6 -> 1.9 GB for one short text.
    (
        "tiny-features",
        {"tokenize_kwargs": {"padding": "max_length", "max_length": 3_000_000}},
        "tokenize_kwargs",
    ),
    # ~480 chunks of a 16 s clip at once.
    ("tiny-whisper", {"chunk_length_s": 0.05}, "chunk_length_s"),
    ("tiny-whisper", {"chunk_length_s": 2, "stride_length_s": 0.99}, "stride_length_s"),
    ("tiny-whisper", {"generate_kwargs": {"max_new_tokens": 1_000_000}}, "max_new_tokens"),
    ("tiny-whisper", {"max_new_tokens": 5}, "max_new_tokens"),
    ("tiny-sentiment", {"top_kk": 2}, "top_kk"),
    ("tiny-sentiment", {"top_k": 0}, "top_k"),
    ("tiny-zeroshot", {}, "candidate_labels"),
    ("tiny-zeroshot", {"candidate_labels": ["a"] * 101}, "candidate_labels"),
    (
        "tiny-zeroshot",
        {"candidate_labels": ["a"], "hypothesis_template": "{0:>999999999}"},
        "hypothesis_template",
    ),
    ("tiny-vit", {"timeout": 1}, "timeout"),
]


@pytest.mark.parametrize(("model", "params", "named"), REFUSED)
def test_api_refuses_params_outside_the_allow_list(
    api: httpx.Client, client: Client, model: str, params: dict[str, Any], named: str
) -> None:
    job_id = f"refused-{uuid.uuid4().hex}"
    body = {"model": model, "inputs": ["x"], "params": params, "id": job_id}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]["message"]
    with pytest.raises(JobNotFound):
        client.get(job_id)  # nothing was recorded or queued


def test_unknown_param_names_the_accepted_ones(client: Client) -> None:
    with pytest.raises(InvalidParams) as refused:
        client.submit("tiny-sentiment", ["x"], {"top_kk": 2})
    assert "top_kk" in str(refused.value)
    assert "accepted: function_to_apply, top_k, truncation" in str(refused.value)


def _wait_record(client: Client, job_id: str, timeout_s: float = 120) -> JobDocument:
    """The finished record of a job published without one (the worker creates it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            doc = client.get(job_id)
        except JobNotFound:
            doc = None
        if doc is not None and doc.done:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")


def _publish_by_hand(client: Client, model: str, inputs: list[Any], params: dict[str, Any]) -> str:
    """Publish past Client's checks, as anyone holding the broker's address could."""
    message = JobRequest(model=model, inputs=inputs, params=params).to_message()
    client.send([message])
    return message.id


@pytest.mark.usefixtures("session_worker")
def test_hand_published_tesseract_config_touches_nothing(
    client: Client, invoice: Path, tmp_path: Path
) -> None:
    target = tmp_path / "overwritten-by-tesseract"
    document = {"image": {"path": str(invoice)}, "question": "What is the invoice number?"}
    jobs = {
        "debug_file": _publish_by_hand(
            client, "tiny-docqa", [document], {"tesseract_config": f"-c debug_file={target}"}
        ),
        "read": _publish_by_hand(
            client, "tiny-docqa", [document], {"tesseract_config": "--oem 0 /etc/passwd"}
        ),
    }
    for name, job_id in jobs.items():
        doc = _wait_record(client, job_id)
        assert doc.status == "failed", (name, doc)
        assert doc.errors is not None and doc.errors[0] is not None
        assert doc.errors[0].type == "InvalidParams"
        assert "tesseract_config" in doc.errors[0].message
        assert LEAKED_PASSWD_LINE not in doc.errors[0].message
        assert "/etc/passwd" not in doc.errors[0].message  # the params are not echoed
    assert not target.exists()


@pytest.mark.usefixtures("session_worker")
def test_hand_published_tokenize_kwargs_fails_every_input(client: Client) -> None:
    params = {"tokenize_kwargs": {"padding": "max_length", "max_length": 3_000_000}}
    doc = _wait_record(client, _publish_by_hand(client, "tiny-features", ["a", "b"], params))
    assert doc.status == "failed"
    assert doc.errors is not None
    assert [e.type if e else None for e in doc.errors] == ["InvalidParams", "InvalidParams"]
    assert "3000000" not in doc.errors[0].message


@pytest.fixture(scope="module")
def clip(media_dir: Path) -> Path:
    path = media_dir / "security-clip.wav"
    t = np.arange(16_000 * 3) / 16_000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16_000)
    return path


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("tiny-sentiment", {"top_k": None, "function_to_apply": "sigmoid", "truncation": True}),
    (
        "tiny-zeroshot",
        {
            "candidate_labels": "price, service",
            "hypothesis_template": "This review is about {}.",
            "multi_label": True,
        },
    ),
    ("tiny-features", {"truncation": True}),
    ("tiny-vit", {"top_k": 2, "function_to_apply": "none"}),
    (
        "tiny-whisper",
        {
            "chunk_length_s": 1.5,
            "stride_length_s": [0.25, 0.5],
            "return_timestamps": True,
            "generate_kwargs": {"max_new_tokens": 20, "num_beams": 2, "task": "transcribe"},
        },
    ),
    (
        "tiny-docqa",
        {
            "top_k": 2,
            "max_answer_len": 5,
            "handle_impossible_answer": True,
            "max_seq_len": 256,
            "doc_stride": 64,
        },
    ),
]


@pytest.mark.usefixtures("session_worker")
@pytest.mark.parametrize(("model", "params"), ACCEPTED)
def test_valid_params_of_each_task_answer_as_pipeline(
    settings: Settings,
    client: Client,
    invoice: Path,
    clip: Path,
    media_dir: Path,
    model: str,
    params: dict[str, Any],
) -> None:
    image = media_dir / "security-image.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    pipe = reference_pipeline(settings.models, model)
    if model == "tiny-docqa":
        question = "What is the total amount?"
        queued: list[Any] = [{"image": {"path": str(invoice)}, "question": question}]
        want = [pipe(image=Image.open(invoice).convert("RGB"), question=question, **params)]
    elif model == "tiny-vit":
        queued, want = [{"path": str(image)}], [pipe(Image.open(image).convert("RGB"), **params)]
    elif model == "tiny-whisper":
        queued, want = [{"path": str(clip)}], [pipe(str(clip), **params)]
    else:
        texts = ["the parcel came late", "great value"]
        queued, want = list(texts), [pipe(text, **params) for text in texts]
    doc = client.wait(client.submit(model, queued, params), timeout_s=120)
    assert doc.status == "succeeded", doc
    for i, expected in enumerate(want):
        assert_close(doc.outputs[i], expected, where=f"{model} input {i}")


def test_chunks_are_made_as_the_batcher_takes_them() -> None:
    """A long input's parts are produced while earlier ones are forwarded, never all at once:
    with the model busy, the feed stops two batches ahead."""
    gate = threading.Event()
    made: list[int] = []

    def forward(parts: list[Any], _call: Any) -> list[Any]:
        gate.wait()
        return [part * 2 for part in parts]

    def parts() -> Iterator[int]:
        for i in range(200):
            made.append(i)
            yield i

    batcher = Batcher("m", forward, max_batch_size=4, max_wait_ms=0).start()
    chunked = SimpleNamespace(chunked=True)  # a long input, cut into parts as it is fed
    served = ServedModel(staged=chunked, batcher=batcher, permits=threading.Semaphore(1))  # type: ignore[arg-type]
    fed: list[WorkItem] = []
    feeder = threading.Thread(
        target=feed,
        args=(
            served,
            parts(),
            lambda part: WorkItem(part=part, group="g", call=None),
            ProgressTracker(),
            fed,
            batcher.submit,
        ),
    )
    feeder.start()
    deadline = time.monotonic() + 10
    while len(made) < 9 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room to run ahead, had the feed not waited for the forward passes
    assert len(made) == 2 * 4 + 1, len(made)  # two batches waiting, and the part that waits
    gate.set()
    feeder.join(30)
    batcher.stop()
    assert [work.future.result(timeout=10) for work in fed] == [i * 2 for i in range(200)]


def test_ocr_past_its_timeout_fails_only_that_input(
    start_worker: Any, worker_env: dict[str, str], settings: Settings, invoice: Path
) -> None:
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(broker).flushdb()
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker, "PIPEQ_OCR_TIMEOUT_S": "0.001"}
    start_worker("--models", "tiny-docqa", name="ocr@%h", env=env)
    question = "What is the invoice number?"
    boxes = [
        ["Invoice", [50, 260, 200, 300]],
        ["number:", [210, 260, 380, 300]],
        ["1234", [390, 260, 480, 300]],
    ]
    queued = [
        {"image": {"path": str(invoice)}, "question": question},  # OCR: past 1 ms
        {"image": {"path": str(invoice)}, "question": question, "word_boxes": boxes},
    ]
    doc = own.wait(own.submit("tiny-docqa", queued), timeout_s=120)
    assert doc.status == "succeeded", doc
    assert doc.errors is not None and doc.errors[0] is not None
    assert doc.errors[0].type == "OcrTimeout"
    assert doc.errors[1] is None
    pipe = reference_pipeline(settings.models, "tiny-docqa")
    want = pipe(image=Image.open(invoice).convert("RGB"), question=question, word_boxes=boxes)
    assert_close(doc.outputs[1], want)
