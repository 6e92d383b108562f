"""Caps that hold (issue 23, point 3): the issue's hostile files and bodies, made here for real.

A FLAC of 8 channels at 655,350 Hz (92 KB), a 9400x9400 single-colour PNG (281 KB) and a 20 MB
text are each refused with a typed error before they are decoded, which a fresh subprocess's peak
RSS shows; a request body over PIPEQ_MAX_REQUEST_BYTES gets a 413 from a real uvicorn, with a
Content-Length (before the body is sent) and chunked (as soon as the count passes the cap).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import soundfile
import uvicorn
from PIL import Image

from pipeq.config.errors import JobNotFound, MediaTooLarge, PayloadTooLarge, TextTooLong
from pipeq.config.settings import Settings
from pipeq.core.inputs import DataRef, DocumentInput
from pipeq.core.jobs import JobDocument, JobMessage
from pipeq.producer.api import create_app
from pipeq.producer.backfill import backfill
from pipeq.producer.client import Client
from pipeq.worker.decode import _resample
from pipeq.worker.media import MediaLoader

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
TWENTY_MB_TEXT = "all work and no play " * 1_000_000  # 21,000,000 characters


def inline(data: bytes) -> DataRef:
    return DataRef(data=base64.b64encode(data).decode())


def loader(**overrides: Any) -> MediaLoader:
    return MediaLoader(Settings(**({"allow_private_urls": True} | overrides)))


def flac_of_silence(rate: int, channels: int, seconds: float) -> bytes:
    """Written block by block, so making the file never holds its decoded samples."""
    buffer = io.BytesIO()
    block = np.zeros((1 << 16, channels), np.int16)
    frames = int(rate * seconds)
    with soundfile.SoundFile(buffer, "w", rate, channels, "PCM_16", format="FLAC") as audio:
        while frames > 0:
            audio.write(block[: min(frames, len(block))])
            frames -= len(block)
    return buffer.getvalue()


def png_of_one_colour(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG compressed row by row, so making it never holds its pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    pack = zlib.compressobj(6)
    row = b"\0" + bytes([200, 30, 30]) * width
    idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


_MEASURE = """
import base64, json, sys
from pipeq.config.settings import Settings
from pipeq.core.inputs import DataRef
from pipeq.worker.media import MediaLoader

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

path, modality, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ref = DataRef(data=base64.b64encode(open(path, "rb").read()).decode())
media = MediaLoader(Settings(**fields))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets the peak (VmHWM) to the current RSS
before = status_mb("VmRSS")
try:
    media.load(ref, modality)
    outcome = {"type": None, "message": ""}
except Exception as exc:
    outcome = {"type": type(exc).__name__, "message": str(exc)}
outcome["grew_mb"] = status_mb("VmHWM") - before
print(json.dumps(outcome))
"""


def load_in_subprocess(tmp_path: Path, data: bytes, modality: str, **fields: Any) -> dict[str, Any]:
    """Load `data` in a fresh interpreter: its error and how far its peak RSS rose meanwhile."""
    path = tmp_path / f"hostile.{modality}"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), modality, json.dumps(fields)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- audio -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flac_bomb() -> bytes:
    """The issue's file: 16.3 s of 8 channels at 655,350 Hz, FLAC's highest rate; 92 KB."""
    data = flac_of_silence(655_350, 8, 16.3)
    assert len(data) < 100_000
    return data


def test_flac_of_8_channels_at_655350_hz_is_refused_before_decoding(
    tmp_path: Path, flac_bomb: bytes
) -> None:
    # 16.3 s passes the old check (a 1 MiB cap allows 16.4 s at 16 kHz), but decoding it whole
    # is 85 million float32 samples: 342 MB.
    outcome = load_in_subprocess(tmp_path, flac_bomb, "audio", max_media_bytes=MIB)
    assert outcome["type"] == "MediaTooLarge", outcome
    assert "655350 Hz" in outcome["message"]
    assert outcome["grew_mb"] < 50, outcome


def test_many_samples_are_refused_even_at_an_allowed_rate(flac_bomb: bytes) -> None:
    # With the rate cap lifted, the samples to decode (frames x channels) still refuse it.
    media = loader(max_media_bytes=MIB, max_audio_sample_rate=1_000_000)
    with pytest.raises(MediaTooLarge, match="x 8 channels = .* samples, over"):
        media.load(inline(flac_bomb), "audio")
    media.close()


def test_samples_cap_counts_channels_not_seconds() -> None:
    # 4 s at 192 kHz (allowed) in 8 channels (allowed): short enough for the 16.4 s a 1 MiB cap
    # allows, yet 6.1 million samples to decode where a 1 MiB cap allows 3.1 million.
    media = loader(max_media_bytes=MIB)
    with pytest.raises(MediaTooLarge, match="samples"):
        media.load(inline(flac_of_silence(192_000, 8, 4.0)), "audio")
    media.close()


def test_more_channels_than_allowed_are_refused() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((1_000, 9), np.float32), 16_000, format="WAV")
    media = loader()
    with pytest.raises(MediaTooLarge, match="9 channels"):
        media.load(inline(buffer.getvalue()), "audio")
    media.close()


def test_audio_is_decoded_in_blocks_with_unchanged_samples() -> None:
    """8 channels at 192 kHz for 4 s: 24.6 MB as one float32 array, never held at once; the
    samples are exactly those of decoding it whole and mixing it down."""
    rate, channels = 192_000, 8
    t = np.arange(rate * 4) / rate
    tones = np.stack([0.1 * np.sin(2 * np.pi * 110 * (c + 1) * t) for c in range(channels)], 1)
    buffer = io.BytesIO()
    soundfile.write(buffer, tones.astype(np.float32), rate, format="FLAC")
    data = buffer.getvalue()
    whole_bytes = len(t) * channels * 4
    with soundfile.SoundFile(io.BytesIO(data)) as audio:
        whole = audio.read(dtype="float32", always_2d=True)
    expected = _resample(whole.mean(axis=1, dtype=np.float32), rate)
    del whole

    media = loader(max_media_bytes=8 * MIB)
    tracemalloc.start()
    try:
        raw = media.load(inline(data), "audio")["raw"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        media.close()
    assert np.array_equal(raw, expected)
    assert peak < whole_bytes * 0.75, (peak, whole_bytes)


def test_ffmpeg_output_is_capped_as_it_is_read(tmp_path: Path) -> None:
    # AAC goes through ffmpeg; 10 s is over the 2 s a 128,000-byte cap allows.
    out = tmp_path / "long.m4a"
    source = ["-f", "lavfi", "-i", "sine=frequency=440:duration=10:sample_rate=44100"]
    encode = ["-c:a", "aac", "-b:a", "24k", str(out)]
    subprocess.run(["ffmpeg", "-loglevel", "error", *source, *encode], check=True)
    assert out.stat().st_size < 128_000  # the fetch cap lets it through; the decode cap must not
    media = loader(max_media_bytes=128_000)
    with pytest.raises(MediaTooLarge, match="longer than the 2.0 s"):
        media.load(inline(out.read_bytes()), "audio")
    media.close()


# --- images ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    data = png_of_one_colour(9_400, 9_400)
    assert len(data) < 350_000
    return data


def test_9400_square_png_is_refused_before_decoding(tmp_path: Path, png_bomb: bytes) -> None:
    # 88.4 MP is under Pillow's own limit (89.5 MP): before the cap it decoded to 265 MB of RGB.
    outcome = load_in_subprocess(tmp_path, png_bomb, "image")
    assert outcome["type"] == "MediaTooLarge", outcome
    assert "9400x9400" in outcome["message"]
    assert outcome["grew_mb"] < 50, outcome
    # The same measure, with the cap lifted, sees the blow-up the cap prevents.
    lifted = load_in_subprocess(tmp_path, png_bomb, "image", max_image_pixels=100_000_000)
    assert lifted["type"] is None, lifted
    assert lifted["grew_mb"] > 250, lifted


def test_pixel_cap_comes_from_settings() -> None:
    media = loader(max_image_pixels=10_000)
    assert media.load(inline(png_of_one_colour(100, 100)), "image").size == (100, 100)
    with pytest.raises(MediaTooLarge, match="PIPEQ_MAX_IMAGE_PIXELS"):
        media.load(inline(png_of_one_colour(101, 100)), "image")
    document = DocumentInput(image=inline(png_of_one_colour(101, 100)), question="total?")
    with pytest.raises(MediaTooLarge):
        media.load(document, "document")
    media.close()


def test_jpeg_over_the_cap_is_decoded_at_a_reduced_scale() -> None:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((400, 300)).convert("RGB").save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    # Within the cap: full size, the very pixels Pillow decodes.
    full = loader().load(inline(jpeg), "image")
    assert full.tobytes() == Image.open(io.BytesIO(jpeg)).convert("RGB").tobytes()
    # 120,000 pixels over a 10,000 cap: 1/2 scale is 30,000, 1/4 is 100x75 = 7,500.
    media = loader(max_image_pixels=10_000)
    assert media.load(inline(jpeg), "image").size == (100, 75)
    media.close()
    # Not even 1/8 scale (50x38 = 1,900) fits 1,000 pixels.
    with pytest.raises(MediaTooLarge):
        loader(max_image_pixels=1_000).load(inline(jpeg), "image")


# --- texts -------------------------------------------------------------------------------------


def test_text_over_the_cap_is_refused_at_submit(client: Client) -> None:
    with pytest.raises(PayloadTooLarge, match="input 1 holds 21000000 characters"):
        client.submit("tiny-sentiment", ["fine", TWENTY_MB_TEXT])
    question = DocumentInput(image=inline(png_of_one_colour(8, 8)), question="why? " * 20_001)
    with pytest.raises(PayloadTooLarge, match="PIPEQ_MAX_TEXT_CHARS"):
        client.submit("tiny-docqa", [question.model_dump()])
    words = [("w", (0, 0, 1, 1))] * 100_001
    boxes = DocumentInput(image=inline(png_of_one_colour(8, 8)), question="q", word_boxes=words)
    with pytest.raises(PayloadTooLarge, match="PIPEQ_MAX_TEXT_CHARS"):
        client.submit("tiny-docqa", [boxes.model_dump()])


def test_loader_fails_only_the_long_text() -> None:
    media = loader()
    results = media.load_many(["fine", "x" * 100_001, "x" * 100_000], "text")
    assert [type(r).__name__ for r in results] == ["str", "TextTooLong", "str"]
    long_question = DocumentInput(image=inline(png_of_one_colour(8, 8)), question="q" * 100_001)
    with pytest.raises(TextTooLong):
        media.load(long_question, "document")
    media.close()


def publish_by_hand(client: Client, message: JobMessage) -> JobDocument:
    """Straight onto the queue, no record: the worker writes one when it claims the job."""
    client.send([message])
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.wait(message.id, timeout_s=120)
        except JobNotFound:
            assert time.monotonic() < deadline, f"no worker claimed {message.id}"
            time.sleep(0.2)


@pytest.mark.usefixtures("session_worker")
def test_hand_published_long_text_fails_its_own_input(client: Client) -> None:
    """A message that skipped submit (published straight to the broker): the worker refuses the
    long text as that input's error and answers the job's other input."""
    message = JobMessage(
        id="hand-published-long-text",
        model="tiny-sentiment",
        inputs=[TWENTY_MB_TEXT, "a fine day"],
        params={},
        lane="interactive",
        submitted_at=time.time(),
    )
    doc = publish_by_hand(client, message)
    assert doc.status == "succeeded", doc.errors
    assert doc.errors is not None and doc.outputs is not None
    assert doc.errors[0] is not None and doc.errors[0].type == "TextTooLong"
    assert doc.errors[1] is None and doc.outputs[1][0]["label"]

    image = inline(png_of_one_colour(32, 32))
    words = [("total", (0, 0, 10, 10))]
    document = JobMessage(
        id="hand-published-long-question",
        model="tiny-docqa",
        inputs=[
            DocumentInput(image=image, question="what? " * 20_000, word_boxes=words),
            DocumentInput(image=image, question="what?", word_boxes=words),
        ],
        params={},
        lane="interactive",
        submitted_at=time.time(),
    )
    doc = publish_by_hand(client, document)
    assert doc.errors is not None
    assert doc.errors[0] is not None and doc.errors[0].type == "TextTooLong"
    assert doc.errors[1] is None, doc.errors


@pytest.mark.usefixtures("session_worker")
def test_backfill_reports_a_long_text_as_a_bad_line(client: Client, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    lines = [{"id": "a", "input": "fine"}, {"id": "b", "input": "x" * 100_001}]
    lines.append({"id": "c", "input": "also fine"})
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    summary = backfill(client, str(manifest), "tiny-sentiment", out=str(out), show_progress=False)
    assert (summary.succeeded, summary.bad_lines, summary.complete) == (2, 1, True)
    failed = [json.loads(line) for f in out.glob("failed-*.jsonl") for line in f.open()]
    assert [(f["id"], f["line"]) for f in failed] == [("b", 2)]
    assert "PIPEQ_MAX_TEXT_CHARS" in failed[0]["error"]["message"]


# --- request bodies ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(settings: Settings, **fields: Any) -> Iterator[int]:
    """A real uvicorn on loopback (its port) over a broker database no worker consumes."""
    broker = settings.broker_url.rsplit("/", 1)[0] + "/11"  # type: ignore[union-attr]
    redis.Redis.from_url(broker).flushdb()
    port = _free_port()
    app = create_app(Client(settings.model_copy(update={"broker_url": broker, **fields})))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def small_body_api(settings: Settings) -> Iterator[int]:
    """An API whose body cap is 1 MiB."""
    with served(settings, max_request_bytes=MIB) as port:
        yield port


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read one HTTP/1.1 response (the server closes after a 413) and return status and JSON."""
    received = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in received or not _complete(received):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _request_head(port: int, framing: str) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def test_declared_body_over_the_cap_is_413_before_it_is_sent(small_body_api: int) -> None:
    with socket.create_connection(("127.0.0.1", small_body_api)) as sock:
        # Only the head: the answer must come without the server reading a byte of the body.
        sock.sendall(_request_head(small_body_api, f"Content-Length: {64 * MIB}"))
        status, body = _answer(sock)
    assert status == 413
    assert "PIPEQ_MAX_REQUEST_BYTES" in body["error"]["message"]


def test_chunked_body_over_the_cap_is_413_once_it_passes(small_body_api: int) -> None:
    with socket.create_connection(("127.0.0.1", small_body_api)) as sock:
        sock.sendall(_request_head(small_body_api, "Transfer-Encoding: chunked"))
        piece = b" " * 65536
        # 17 chunks of 64 KiB pass 1 MiB; the last chunk (end of body) is never sent.
        for _ in range(17):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        status, body = _answer(sock)
    assert status == 413
    assert "PIPEQ_MAX_REQUEST_BYTES" in body["error"]["message"]


def test_bodies_within_the_cap_still_work(small_body_api: int) -> None:
    job = {"model": "tiny-sentiment", "inputs": ["x" * 1000] * 900}  # ~0.9 MB
    with httpx.Client(base_url=f"http://127.0.0.1:{small_body_api}", timeout=30) as http:
        assert http.post("/v1/jobs", json=job).status_code == 202

        def chunks() -> Iterator[bytes]:
            yield from (b'{"model": "tiny-sentiment", ', b'"inputs": ["in chunks"]}')

        answer = http.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "queued"


def test_text_over_the_cap_is_413_over_http(settings: Settings) -> None:
    # Under the default body cap (about 68 MB), the 21 MB text meets the text cap.
    job = {"model": "tiny-sentiment", "inputs": ["fine", TWENTY_MB_TEXT]}
    with (
        served(settings) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
    ):
        answer = http.post("/v1/jobs", json=job)
    assert answer.status_code == 413, answer.text[:300]
    assert "PIPEQ_MAX_TEXT_CHARS" in answer.json()["error"]["message"]
