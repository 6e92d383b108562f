"""A JPEG's size from its frame header, read without decoding (the pixel cap is checked before
any decode), and a header-only open of other images."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from pipeq.config.errors import DecodeError, MediaTooLarge

# Start-of-frame markers (baseline, extended, progressive, lossless; not DHT, JPG, DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# Markers without a length: TEM, RST0-7, SOI.
_BARE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's width and height from its frame header, None for anything else: the markers
    before it walked by their lengths (Pillow's header parse, per image, was a sixth of a front's
    time at 64 images per job)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _BARE:
            at += 2
        elif marker in _SOF:
            if at + 9 > end:
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return (width, height) if width and height else None
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _header(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image format Pillow recognises") from exc
    except Image.DecompressionBombError as exc:
        raise MediaTooLarge("image has too many pixels (PIPEQ_MAX_IMAGE_PIXELS)") from exc
