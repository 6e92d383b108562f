"""Whisper and document QA through the queue, against pipeline() on the same decoded input.

The reference for audio is pipeline({"raw": the worker's own decoding, "sampling_rate": 16000}):
the same decoder (soundfile, else ffmpeg; scipy to resample), so what is compared is the queue
(chunking, batching across jobs, stitching), not two MP3 decoders.

Word timestamps of chunked audio are the one place where the library itself differs between
batch sizes: with `batch_size` > 1 it aligns the tokens our random model writes past a chunk's
audio differently than with `batch_size=1` (seen: up to 3.9 s apart; text identical). A lone
job's chunks share one forward pass in the worker, so those outputs are compared with
pipeline(batch_size=16), and their text and words with pipeline() at batch size 1.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from pipeq.worker.batcher import LANE_RANK, Batcher, WorkItem
from pipeq.worker.decode import decode_audio
from pipeq.worker.pipelines import StagedPipeline
from tests.parity import assert_close, reference_pipeline

RATE = 16_000
SEGMENT_PARAMS: list[dict[str, Any]] = [
    {},
    {"return_timestamps": True},
    {"generate_kwargs": {"language": "en", "task": "transcribe"}},
]


def _signal(seconds: float, seed: int) -> np.ndarray:
    """A chirp plus noise: the tiny model's text depends on its input, so clips differ."""
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (150 + 20 * seed + 10 * t) * t) + 0.05 * noise).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def audio(media_dir: Path) -> dict[str, Path]:
    clip = _signal(6.0, 1)
    files = {}
    for fmt, subtype in [("wav", "FLOAT"), ("flac", "PCM_16"), ("ogg", "VORBIS")]:
        files[fmt] = media_dir / f"clip.{fmt}"
        sf.write(files[fmt], clip, RATE, subtype=subtype)
    files["mp3"] = media_dir / "clip.mp3"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(files["wav"]),
            str(files["mp3"]),
        ],
        check=True,
    )
    t = np.arange(int(44_100 * 6.0)) / 44_100
    files["flac44k"] = media_dir / "clip44k.flac"
    sf.write(
        files["flac44k"], (0.3 * np.sin(2 * np.pi * (300 + 30 * t) * t)).astype(np.float32), 44_100
    )
    for name, seconds, seed in [("long45", 45.0, 2), ("long70", 70.0, 3)]:
        files[name] = media_dir / f"{name}.flac"
        sf.write(files[name], _signal(seconds, seed), RATE, subtype="PCM_16")
    files["not_audio"] = media_dir / "not_audio.mp3"
    files["not_audio"].write_text("this is a text file wearing an .mp3 name\n" * 50)
    return files


def _decoded(path: Path) -> dict[str, Any]:
    """What the worker decodes `path` to (a fresh dict: the pipeline pops keys from it)."""
    return decode_audio(path.read_bytes(), max_samples=1 << 30, max_rate=192_000, max_channels=8)


def _inline(path: Path) -> dict[str, str]:
    return {"data": base64.b64encode(path.read_bytes()).decode()}


def _run(client: Client, model: str, inputs: list[Any], params: dict[str, Any], **kw: Any) -> Any:
    doc = client.wait(client.submit(model, inputs, params, **kw), timeout_s=180)
    assert doc.status == "succeeded", doc
    return doc


@pytest.mark.usefixtures("session_worker")
class TestWhisperMatchesPipeline:
    def test_formats_by_path_and_inline(
        self, settings: Settings, client: Client, audio: dict[str, Path]
    ) -> None:
        names = ["wav", "flac", "ogg", "mp3", "flac44k"]
        queued = [{"path": str(audio[n])} for n in names] + [_inline(audio[n]) for n in names]
        pipe = reference_pipeline(settings.models, "tiny-whisper")
        for params in SEGMENT_PARAMS:
            doc = _run(client, "tiny-whisper", queued, params)
            assert doc.errors == [None] * len(queued)
            for i, name in enumerate(names * 2):
                assert_close(
                    doc.outputs[i], pipe(_decoded(audio[name]), **params), where=f"{name} {params}"
                )
        # A 16 kHz float WAV decodes the same in both, so here the pipeline reads the file itself.
        assert_close(doc.outputs[0], pipe(str(audio["wav"]), **params), where="wav by path")
        # The 44.1 kHz file was resampled to 6 s at 16 kHz, and every format decoded to audio.
        assert _decoded(audio["flac44k"])["raw"].size == 6 * RATE
        assert len({o["text"] for o in doc.outputs[:5]}) > 1

    @pytest.mark.parametrize(
        "params",
        [
            {"chunk_length_s": 30},
            {"chunk_length_s": 30, "return_timestamps": True},
            {"chunk_length_s": 10, "stride_length_s": 2, "return_timestamps": True},
            {"chunk_length_s": 30, "generate_kwargs": {"language": "en", "task": "transcribe"}},
        ],
    )
    def test_long_audio_in_chunks(
        self, params: dict[str, Any], settings: Settings, client: Client, audio: dict[str, Path]
    ) -> None:
        doc = _run(
            client,
            "tiny-whisper",
            [{"path": str(audio["long45"])}, {"path": str(audio["long70"])}],
            params,
        )
        pipe = reference_pipeline(settings.models, "tiny-whisper")
        for i, name in enumerate(["long45", "long70"]):
            assert_close(
                doc.outputs[i], pipe(_decoded(audio[name]), **params), where=f"{name} {params}"
            )

    @pytest.mark.parametrize(
        "params",
        [
            {"chunk_length_s": 30, "return_timestamps": "word"},
            {"chunk_length_s": 10, "stride_length_s": 2, "return_timestamps": "word"},
        ],
    )
    def test_word_timestamps_in_chunks(
        self, params: dict[str, Any], settings: Settings, client: Client, audio: dict[str, Path]
    ) -> None:
        pipe = reference_pipeline(settings.models, "tiny-whisper")
        for name in ["long45", "long70"]:
            got = _run(client, "tiny-whisper", [{"path": str(audio[name])}], params).outputs[0]
            # Same batching as the worker's (all of a lone job's chunks in one forward pass).
            assert_close(got, pipe(_decoded(audio[name]), batch_size=16, **params), where=name)
            one_by_one = pipe(_decoded(audio[name]), **params)
            assert got["text"] == one_by_one["text"]
            assert [c["text"] for c in got["chunks"]] == [c["text"] for c in one_by_one["chunks"]]

    def test_word_timestamps_unchunked(
        self, settings: Settings, client: Client, audio: dict[str, Path]
    ) -> None:
        params = {"return_timestamps": "word"}
        doc = _run(
            client, "tiny-whisper", [{"path": str(audio["flac"])}, _inline(audio["mp3"])], params
        )
        pipe = reference_pipeline(settings.models, "tiny-whisper")
        for i, name in enumerate(["flac", "mp3"]):
            assert_close(doc.outputs[i], pipe(_decoded(audio[name]), **params), where=name)

    def test_not_audio_fails_alone(
        self, settings: Settings, client: Client, audio: dict[str, Path]
    ) -> None:
        doc = _run(
            client,
            "tiny-whisper",
            [{"path": str(audio["not_audio"])}, {"path": str(audio["ogg"])}],
            {},
        )
        assert doc.errors[0] is not None and doc.errors[0].type == "DecodeError"
        assert doc.errors[1] is None
        pipe = reference_pipeline(settings.models, "tiny-whisper")
        assert_close(doc.outputs[1], pipe(_decoded(audio["ogg"])))


def test_chunks_of_several_jobs_share_forward_passes(
    settings: Settings, audio: dict[str, Path]
) -> None:
    """Two long bulk files and one short interactive clip, straight through StagedPipeline and a
    Batcher: chunks of different jobs share forward passes, the short clip rides in the first
    one, and every job's answer equals pipeline()'s."""
    pipe = reference_pipeline(settings.models, "tiny-whisper")
    staged = StagedPipeline(load_registry(settings.models).models["tiny-whisper"], pipe)
    params = {"chunk_length_s": 10, "stride_length_s": 2, "return_timestamps": True}
    call = staged.call_params(params)
    batches: list[list[int]] = []
    owner: dict[int, str] = {}

    def forward(parts: list[Any], call_: Any) -> list[Any]:
        batches.append([owner[id(p)] for p in parts])
        return staged.forward(parts, call_)

    batcher = Batcher("tiny-whisper", forward, max_batch_size=8, max_wait_ms=50)
    jobs = {"long45": "bulk", "long70": "bulk", "flac": "interactive"}
    futures = {}
    for name, lane in jobs.items():
        parts = staged.preprocess(_decoded(audio[name]), call)
        items = [
            WorkItem(part=p, group=staged.group_key(p, call), call=call, lane_rank=LANE_RANK[lane])
            for p in parts
        ]
        owner.update({id(p): name for p in parts})
        futures[name] = [item.future for item in items]
        batcher.submit(items)  # before start(): all pending when the first batch is chosen
    batcher.start()
    outputs = {name: [f.result(timeout=60) for f in fs] for name, fs in futures.items()}
    batcher.stop()
    assert "flac" in batches[0], batches
    assert any(len(set(batch)) > 1 for batch in batches), batches
    assert sum(map(len, batches)) == sum(map(len, futures.values()))
    assert max(map(len, batches)) == 8
    for name, outs in outputs.items():
        assert_close(
            staged.postprocess(outs, call), pipe(_decoded(audio[name]), **params), where=name
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batch_sizes(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for stat in ("sum", "count"):
        match = re.search(rf'^pipeq_batch_size_{stat}{{model="tiny-whisper"}} (\S+)$', text, re.M)
        values[stat] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def test_long_jobs_batched_together_with_progress(
    start_worker: Any, worker_env: dict[str, str], settings: Settings, media_dir: Path
) -> None:
    """A real worker: three 5-minute bulk files and a short interactive clip at once. Their
    chunks share forward passes (pipeq_batch_size), the long jobs report progress while they
    run, and all four answer as pipeline() does."""
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(broker).flushdb()
    own = Client(settings.model_copy(update={"broker_url": broker, "result_url": broker}))
    port = _free_port()
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_RESULT_URL": broker, "PIPEQ_METRICS_PORT": str(port)}
    files = {}
    for name, seconds, seed in [
        ("bulk0", 300.0, 4),
        ("bulk1", 300.0, 5),
        ("bulk2", 300.0, 6),
        ("short", 3.0, 7),
    ]:
        files[name] = media_dir / f"batched-{name}.flac"
        sf.write(files[name], _signal(seconds, seed), RATE, subtype="PCM_16")
    start_worker("--concurrency", "8", "--models", "tiny-whisper", name="chunks@%h", env=env)
    params = {"chunk_length_s": 10, "stride_length_s": 2}
    ids = {
        name: own.submit(
            "tiny-whisper",
            [{"path": str(path)}],
            params,
            priority="interactive" if name == "short" else "bulk",
        )
        for name, path in files.items()
    }
    seen: list[tuple[int, int]] = []
    while not all(own.get(job_id).done for job_id in ids.values()):
        progress = own.get(ids["bulk0"]).progress
        if progress is not None:
            seen.append((progress.done, progress.total))
        time.sleep(0.05)
    docs = {name: own.get(job_id) for name, job_id in ids.items()}
    pipe = reference_pipeline(settings.models, "tiny-whisper")
    for name, doc in docs.items():
        assert doc.status == "succeeded", doc
        assert_close(doc.outputs[0], pipe(_decoded(files[name]), **params), where=name)
    # 300 s in 10 s chunks with 2 s strides on each side: a chunk every 6 s.
    assert (
        docs["bulk0"].progress is not None
        and docs["bulk0"].progress.done == docs["bulk0"].progress.total == 50
    )
    assert any(0 < done < total for done, total in seen), seen
    assert docs["short"].timings["finished_at"] < max(
        d.timings["finished_at"] for d in docs.values()
    )
    total_items, batches = _batch_sizes(port)
    assert total_items == 3 * 50 + 1
    assert total_items / batches > 4, (total_items, batches)


def _invoice(path: Path) -> Path:
    image = Image.new("RGB", (1000, 700), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    lines = [
        "ACME Corporation",
        "Invoice number: 1234",
        "Date: 2024-01-15",
        "Total amount: $560.00",
    ]
    for i, line in enumerate(lines):
        draw.text((50, 50 + 140 * i), line, fill="black", font=font)
    image.save(path)
    return path


@pytest.mark.usefixtures("session_worker")
def test_document_qa_with_ocr(settings: Settings, client: Client, media_dir: Path) -> None:
    path = _invoice(media_dir / "invoice.png")
    question = "What is the invoice number?"
    queued = [
        {"image": {"path": str(path)}, "question": question},
        {"image": _inline(path), "question": "What is the total amount?"},
    ]
    pipe = reference_pipeline(settings.models, "tiny-docqa")
    image = Image.open(path).convert("RGB")
    for params in ({}, {"top_k": 3}):
        doc = _run(client, "tiny-docqa", queued, params)
        assert doc.errors == [None, None]
        for i, item in enumerate(queued):
            want = pipe(image=image, question=item["question"], **params)
            assert_close(doc.outputs[i], want, where=f"input {i} {params}")
    # The answer is words Tesseract read off the image (no word_boxes were sent).
    words = "ACME Corporation Invoice number: 1234 Date: 2024-01-15 Total amount: $560.00".split()
    assert set(doc.outputs[0][0]["answer"].split()) <= set(words)
