"""The GPU image pipeline reads a JPEG's size from its frame header (worker/gpu_images.py):
the same size Pillow reads, for the JPEG kinds a user sends, and None for anything else."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeq.worker.jpeg_header import _jpeg_size


def _jpeg(mode: str, size: tuple[int, int], **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return exif.tobytes()


@pytest.mark.parametrize(
    "data",
    [
        _jpeg("RGB", (640, 480)),
        _jpeg("RGB", (33, 1001), progressive=True),
        _jpeg("L", (7, 5)),
        _jpeg("CMYK", (300, 200)),
        _jpeg("RGB", (120, 80), exif=_rotated_exif()),  # an EXIF block before the frame
        _jpeg("RGB", (64, 64), quality=10, subsampling=2),
    ],
)
def test_size_as_pillow_reads_it(data: bytes) -> None:
    assert _jpeg_size(data) == Image.open(io.BytesIO(data)).size


def test_anything_else_has_no_jpeg_size() -> None:
    png = io.BytesIO()
    Image.new("RGB", (10, 10)).save(png, "PNG")
    whole = _jpeg("RGB", (50, 40))
    for data in (png.getvalue(), b"", b"\xff\xd8", b"\xff\xd8\xff", whole[:20], b"GIF89a..."):
        assert _jpeg_size(data) is None
