"""MediaLoader against real servers on loopback: http.server, moto's S3 server, real files.

Loopback is itself a private address, so the ordinary fetch tests run with
`allow_private_urls=True` and the SSRF tests with it off. A redirect from a public hop to a
private one cannot be staged with loopback servers alone, so that one case uses
`httpx.MockTransport` answering for a public IP literal (no DNS needed, nothing is connected):
the per-hop check must refuse the second hop before it is requested.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
import soundfile
from PIL import Image

from pipeq.config.errors import (
    DecodeError,
    FetchFailed,
    InputError,
    MediaNotFound,
    MediaTimeout,
    MediaTooLarge,
    UnsafeReference,
)
from pipeq.config.settings import Settings
from pipeq.core.inputs import DataRef, DocumentInput, PathRef, S3Ref, UrlRef
from pipeq.core.urlguard import is_public
from pipeq.worker.media import MediaLoader

PUBLIC_IP = "93.184.215.14"  # a global unicast address; only ever answered by MockTransport


def png_bytes(size: tuple[int, int] = (8, 6), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def wav_bytes(rate: int, seconds: float, channels: int) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone] * channels, axis=1), rate, format="WAV")
    return buffer.getvalue()


IMAGE = png_bytes()


class Handler(BaseHTTPRequestHandler):
    hits: Counter[str] = Counter()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.hits[self.path] += 1
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        if route is None:
            self.send_error(404)
        else:
            try:
                route()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the loader hung up on purpose (size cap, deadline)

    def log_message(self, *args: Any) -> None:
        pass

    def send_body(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_image(self) -> None:
        self.send_body(IMAGE)

    def route_redirect(self) -> None:
        self.redirect("/image")

    def route_loop(self) -> None:
        self.redirect("/loop")

    def route_broken(self) -> None:
        self.send_body(b"oops", status=503)

    def route_forbidden(self) -> None:
        self.send_body(b"no", status=403)

    def route_slow(self) -> None:
        time.sleep(1.0)
        self.send_body(IMAGE)

    def route_endless(self) -> None:
        self.send_response(200)
        self.end_headers()  # no Content-Length: the body runs until the connection closes
        while True:
            self.wfile.write(b"\0" * 65536)

    def route_drip(self) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    return root


def make_loader(media_root: Path | None = None, **overrides: Any) -> MediaLoader:
    fields: dict[str, Any] = {"allow_private_urls": True, "media_timeout_s": 5.0}
    fields["media_roots"] = [media_root] if media_root else []
    return MediaLoader(Settings(**(fields | overrides)))


@pytest.fixture
def loader(media_root: Path) -> Iterator[MediaLoader]:
    media = make_loader(media_root)
    yield media
    media.close()


# --- http ----------------------------------------------------------------------------------------


def test_url_image_is_rgb(server: str, loader: MediaLoader) -> None:
    image = loader.load(UrlRef(url=f"{server}/image"), "image")
    assert isinstance(image, Image.Image)
    assert (image.mode, image.size) == ("RGB", (8, 6))


def test_redirect_is_followed(server: str, loader: MediaLoader) -> None:
    assert loader.fetch(UrlRef(url=f"{server}/redirect")) == IMAGE


def test_redirect_loop_stops(server: str, loader: MediaLoader) -> None:
    before = Handler.hits["/loop"]
    with pytest.raises(FetchFailed, match="redirected more than 5 times"):
        loader.fetch(UrlRef(url=f"{server}/loop"))
    assert Handler.hits["/loop"] - before == 6


def test_404_is_not_found(server: str, loader: MediaLoader) -> None:
    with pytest.raises(MediaNotFound, match="404"):
        loader.fetch(UrlRef(url=f"{server}/nothing-here"))


def test_4xx_is_not_retried(server: str, loader: MediaLoader) -> None:
    before = Handler.hits["/forbidden"]
    with pytest.raises(FetchFailed, match="403"):
        loader.fetch(UrlRef(url=f"{server}/forbidden"))
    assert Handler.hits["/forbidden"] - before == 1


def test_5xx_is_retried_then_fails(server: str, loader: MediaLoader) -> None:
    before = Handler.hits["/broken"]
    with pytest.raises(FetchFailed, match="503 after 3 tries"):
        loader.fetch(UrlRef(url=f"{server}/broken"))
    assert Handler.hits["/broken"] - before == 3


def test_slow_server_times_out(server: str, media_root: Path) -> None:
    media = make_loader(media_root, media_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(MediaTimeout):
        media.fetch(UrlRef(url=f"{server}/slow"))
    assert time.monotonic() - started < 3
    media.close()


def test_dripping_body_hits_the_deadline(server: str, media_root: Path) -> None:
    media = make_loader(media_root, media_timeout_s=0.5)
    with pytest.raises(MediaTimeout, match="too slowly"):
        media.fetch(UrlRef(url=f"{server}/drip"))
    media.close()


@pytest.mark.parametrize("path", ["/endless", "/image"])  # no Content-Length; one over the cap
def test_body_over_the_cap(server: str, media_root: Path, path: str) -> None:
    media = make_loader(media_root, max_media_bytes=len(IMAGE) - 1)
    with pytest.raises(MediaTooLarge, match=f"{len(IMAGE) - 1} bytes"):
        media.fetch(UrlRef(url=f"{server}{path}"))
    media.close()


# --- SSRF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/image",
        "http://localhost:{port}/image",
        "http://[::1]:{port}/image",
        "http://[::ffff:127.0.0.1]:{port}/image",
        "http://2130706433:{port}/image",  # 127.0.0.1 as one decimal number
        "http://0.0.0.0:{port}/image",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
    ],
)
def test_private_addresses_are_refused_before_any_request(server: str, url: str) -> None:
    port = server.rsplit(":", 1)[1]
    media = make_loader(allow_private_urls=False)
    requests_before = sum(Handler.hits.values())
    with pytest.raises(UnsafeReference, match="PIPEQ_ALLOW_PRIVATE_URLS"):
        media.fetch(UrlRef(url=url.format(port=port)))
    assert sum(Handler.hits.values()) == requests_before
    media.close()


def test_public_addresses_pass() -> None:
    for text in ("8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"):
        assert is_public(ipaddress.ip_address(text)), text


def mock_public_site(seen: list[str]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        targets = {
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-file": "file:///etc/passwd",
            "/to-public": f"http://{PUBLIC_IP}/image",
        }
        if request.url.path in targets:
            return httpx.Response(302, headers={"Location": targets[request.url.path]})
        # An iterator, as a socket would stream it: bytes content would count as read already.
        return httpx.Response(200, content=iter([IMAGE]))

    return httpx.Client(transport=httpx.MockTransport(answer))


@pytest.mark.parametrize("path", ["/to-metadata", "/to-file"])
def test_redirect_to_a_forbidden_hop_is_refused(path: str) -> None:
    seen: list[str] = []
    media = MediaLoader(Settings(allow_private_urls=False), http=mock_public_site(seen))
    with pytest.raises(UnsafeReference):
        media.fetch(UrlRef(url=f"http://{PUBLIC_IP}{path}"))
    assert seen == [f"http://{PUBLIC_IP}{path}"]
    media.close()


def test_redirect_between_public_hops_is_followed() -> None:
    seen: list[str] = []
    media = MediaLoader(Settings(allow_private_urls=False), http=mock_public_site(seen))
    assert media.fetch(UrlRef(url=f"http://{PUBLIC_IP}/to-public")) == IMAGE
    assert len(seen) == 2
    media.close()


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: str) -> str:
    bucket = boto3.client("s3", endpoint_url=s3_server)
    bucket.create_bucket(Bucket="media")
    bucket.put_object(Bucket="media", Key="dir/cat.png", Body=IMAGE)
    bucket.put_object(Bucket="media", Key="big.bin", Body=b"\0" * 200_000)
    return s3_server


def test_s3_object_is_read(s3_endpoint: str) -> None:
    media = make_loader(s3_endpoint_url=s3_endpoint)
    image = media.load(S3Ref(s3="s3://media/dir/cat.png"), "image")
    assert image.size == (8, 6)
    media.close()


@pytest.mark.parametrize("uri", ["s3://media/missing.png", "s3://no-such-bucket/cat.png"])
def test_s3_missing_is_not_found(s3_endpoint: str, uri: str) -> None:
    media = make_loader(s3_endpoint_url=s3_endpoint)
    with pytest.raises(MediaNotFound):
        media.fetch(S3Ref(s3=uri))
    media.close()


def test_s3_object_over_the_cap(s3_endpoint: str) -> None:
    media = make_loader(s3_endpoint_url=s3_endpoint, max_media_bytes=100_000)
    with pytest.raises(MediaTooLarge):
        media.fetch(S3Ref(s3="s3://media/big.bin"))
    media.close()


# --- local paths and inline data -----------------------------------------------------------------


def test_path_under_root_is_read(media_root: Path, loader: MediaLoader) -> None:
    (media_root / "a.png").write_bytes(IMAGE)
    assert loader.fetch(PathRef(path=str(media_root / "a.png"))) == IMAGE


def test_dotdot_out_of_root_is_refused(media_root: Path, loader: MediaLoader) -> None:
    (media_root.parent / "secret.png").write_bytes(IMAGE)
    with pytest.raises(UnsafeReference, match="outside PIPEQ_MEDIA_ROOTS"):
        loader.fetch(PathRef(path=f"{media_root}/../secret.png"))
    with pytest.raises(UnsafeReference):
        loader.fetch(PathRef(path=f"{media_root}/../../../../etc/passwd"))


def test_symlink_out_of_root_is_refused(media_root: Path, loader: MediaLoader) -> None:
    (media_root.parent / "secret.png").write_bytes(IMAGE)
    (media_root / "link.png").symlink_to(media_root.parent / "secret.png")
    with pytest.raises(UnsafeReference, match="outside"):
        loader.fetch(PathRef(path=str(media_root / "link.png")))


def test_missing_file_inside_vs_outside_root(media_root: Path, loader: MediaLoader) -> None:
    with pytest.raises(MediaNotFound):
        loader.fetch(PathRef(path=str(media_root / "nope.png")))
    # Outside the roots a missing file reads as 'outside', so errors reveal nothing about it.
    with pytest.raises(UnsafeReference):
        loader.fetch(PathRef(path="/no/such/file.png"))


def test_fifo_and_directory_are_not_files(media_root: Path, loader: MediaLoader) -> None:
    os.mkfifo(media_root / "pipe")
    (media_root / "dir").mkdir()
    for name in ("pipe", "dir"):
        with pytest.raises(MediaNotFound, match="not a regular file"):
            loader.fetch(PathRef(path=str(media_root / name)))


def test_no_media_roots_means_no_paths(media_root: Path) -> None:
    (media_root / "a.png").write_bytes(IMAGE)
    media = make_loader(None)
    with pytest.raises(UnsafeReference, match="PIPEQ_MEDIA_ROOTS"):
        media.fetch(PathRef(path=str(media_root / "a.png")))
    media.close()


def test_relative_paths_are_refused(loader: MediaLoader) -> None:
    with pytest.raises(UnsafeReference, match="relative"):
        loader.fetch(PathRef(path="a.png"))


def test_inline_data_over_the_cap(media_root: Path) -> None:
    media = make_loader(media_root, max_media_bytes=10)
    with pytest.raises(MediaTooLarge):
        media.fetch(DataRef(data=base64.b64encode(b"x" * 11).decode()))
    media.close()


# --- decoding ------------------------------------------------------------------------------------


def inline(data: bytes) -> DataRef:
    return DataRef(data=base64.b64encode(data).decode())


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, complete 1-bit PNG whose pixel data compresses to almost nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    pack = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused(loader: MediaLoader) -> None:
    bomb = png_of_zeros(20_000, 20_000)
    assert len(bomb) < 100_000
    with pytest.raises(MediaTooLarge, match="pixels"):
        loader.load(inline(bomb), "image")


def test_image_just_over_the_pixel_limit_is_refused(loader: MediaLoader) -> None:
    # Between one and two times the limit Pillow only warns; the loader must still refuse.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(MediaTooLarge):
        loader.load(inline(png_of_zeros(10_000, 10_000)), "image")


@pytest.mark.parametrize("data", [b"not an image at all", IMAGE[:60], b""])
def test_corrupt_image_is_decode_error(loader: MediaLoader, data: bytes) -> None:
    with pytest.raises(DecodeError):
        loader.load(inline(data), "image")


def test_exif_orientation_is_applied(loader: MediaLoader) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "blue").save(buffer, "JPEG", exif=exif)
    assert loader.load(inline(buffer.getvalue()), "image").size == (20, 40)


def test_wav_is_resampled_to_16k_mono(loader: MediaLoader) -> None:
    audio = loader.load(inline(wav_bytes(44_100, 1.0, channels=2)), "audio")
    assert audio["sampling_rate"] == 16_000
    raw = audio["raw"]
    assert (raw.dtype, raw.ndim, raw.shape[0]) == (np.float32, 1, 16_000)
    assert 0.45 < np.abs(raw[1000:-1000]).max() < 0.55  # the tone survived the mixdown


def test_audio_longer_than_the_cap(media_root: Path) -> None:
    # 2 s of 8 kHz 16-bit WAV is 32 kB fetched, but 128 kB as 16 kHz float32.
    media = make_loader(media_root, max_media_bytes=64_000)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16_000, np.float32), 8_000, format="WAV", subtype="PCM_16")
    with pytest.raises(MediaTooLarge, match="2.0 s"):
        media.load(inline(buffer.getvalue()), "audio")
    media.close()


def test_corrupt_audio_is_decode_error(loader: MediaLoader) -> None:
    with pytest.raises(DecodeError):
        loader.load(inline(b"RIFF\0\0\0\0WAVEgarbage" * 10), "audio")


def ffmpeg_encode(tmp_path: Path, name: str, *codec: str) -> bytes:
    out = tmp_path / name
    source = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=44100"]
    subprocess.run(["ffmpeg", "-loglevel", "error", *source, *codec, str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize(("name", "codec"), [("a.m4a", ["-c:a", "aac"]), ("a.webm", [])])
def test_ffmpeg_formats_decode(
    tmp_path: Path, loader: MediaLoader, name: str, codec: list[str]
) -> None:
    audio = loader.load(inline(ffmpeg_encode(tmp_path, name, *codec)), "audio")
    assert abs(audio["raw"].shape[0] - 16_000) < 1_200  # encoder padding varies by codec


def test_playlist_cannot_make_ffmpeg_read_files(loader: MediaLoader) -> None:
    playlist = b"#EXTM3U\n#EXTINF:10.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    with pytest.raises(DecodeError):
        loader.load(inline(playlist), "audio")


# --- inputs of the wrong shape, documents, batches -----------------------------------------------


def test_text_and_shape_checks(loader: MediaLoader) -> None:
    assert loader.load("hello", "text") == "hello"
    with pytest.raises(DecodeError, match="text models take strings"):
        loader.load(inline(IMAGE), "text")
    with pytest.raises(DecodeError, match="media reference"):
        loader.load("http://example.com/cat.png", "image")
    with pytest.raises(DecodeError, match="question"):
        loader.load(inline(IMAGE), "document")


def test_document_input(loader: MediaLoader) -> None:
    doc = DocumentInput(image=inline(IMAGE), question="total?", word_boxes=[("12", (0, 0, 9, 9))])
    loaded = loader.load(doc, "document")
    assert loaded["question"] == "total?"
    assert loaded["word_boxes"] == [("12", [0, 0, 9, 9])]
    assert loaded["image"].size == (8, 6)
    # Without word boxes the key is absent, so the pipeline runs OCR.
    plain = loader.load(DocumentInput(image=inline(IMAGE), question="q"), "document")
    assert "word_boxes" not in plain


def test_load_many_isolates_failures_and_fetches_once(server: str, loader: MediaLoader) -> None:
    before = Handler.hits["/image"]
    good = UrlRef(url=f"{server}/image")
    items: list[Any] = [good, UrlRef(url=f"{server}/gone"), good, inline(b"junk"), "text", good]
    results = loader.load_many(items, "image")
    assert [type(r).__name__ for r in results] == [
        "Image", "MediaNotFound", "Image", "DecodeError", "DecodeError", "Image",
    ]  # fmt: skip
    assert all(isinstance(results[i], InputError) for i in (1, 3, 4))
    assert Handler.hits["/image"] - before == 1
