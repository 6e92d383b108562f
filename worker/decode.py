"""Bytes -> the image and audio objects `transformers.pipeline()` takes, refusing hostile input.

Images: Pillow, refused above PIPEQ_MAX_IMAGE_PIXELS from the header, before any pixel is
decoded; a JPEG above it is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales that fits
(`Image.draft`), so memory stays bounded; images within the cap are decoded at full size, exactly
as `pipeline()` would. Audio: soundfile for what libsndfile reads (WAV, FLAC, OGG, MP3), its
sample rate, channels and samples checked from the header and decoded in blocks mixed down to
mono as they come; else an `ffmpeg` subprocess restricted to local input and audio demuxers (so a
playlist cannot make it open URLs or other files) whose 16 kHz mono output is read incrementally
under the cap.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageOps
from scipy.signal import resample_poly

from pipeq.config.errors import DecodeError, InputError, MediaTooLarge
from pipeq.worker.ffmpeg import SAMPLING_RATE, read_ffmpeg

# A rate like 44 099 Hz would make resample_poly build a filter of millions of taps; a ratio with
# a denominator up to 1000 is exact for every common rate (44.1 kHz -> 160/441) and off by under
# one part in a million for the rest.
_MAX_RESAMPLE_DENOMINATOR = 1000
# The scales libjpeg decodes at directly, without ever holding the full-size pixels.
_JPEG_DRAFT_SCALES = (2, 4, 8)
_AUDIO_BLOCK_FRAMES = 1 << 16


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """An RGB image, upright per its EXIF orientation, of at most `max_pixels` pixels."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            scale = _draft_scale(probe, max_pixels)
            probe.verify()
        image = Image.open(io.BytesIO(data))
        if scale > 1:
            width, height = image.size
            image.draft(image.mode, (width // scale, height // scale))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"image has too many pixels: {exc}") from exc
    except (InputError, MemoryError):  # MemoryError: the worker's memory bound, not the bytes
        raise
    # Pillow's plugins raise OSError, SyntaxError, struct.error, IndexError... on hostile bytes;
    # to the caller they all mean the same thing.
    except Exception as exc:
        raise DecodeError(f"not an image Pillow can read: {exc}") from exc


def decode_audio(
    data: bytes, *, max_samples: int, max_rate: int, max_channels: int
) -> dict[str, Any]:
    """`{"raw": float32 mono samples at 16 kHz, "sampling_rate": 16000}`: at most `max_samples`
    of them, from a source of at most `max_rate` Hz and `max_channels` channels."""
    try:
        samples, rate = _read_soundfile(data, max_samples, max_rate, max_channels)
    except soundfile.SoundFileError:
        samples, rate = read_ffmpeg(data, max_samples), SAMPLING_RATE
    if samples.size == 0:
        raise DecodeError("the audio holds no samples")
    return {"raw": _resample(samples, rate), "sampling_rate": SAMPLING_RATE}


def _draft_scale(image: Image.Image, max_pixels: int) -> int:
    """1 for an image within `max_pixels`; for a larger JPEG, the least DCT scale that fits."""
    width, height = image.size
    if width * height <= max_pixels:
        return 1
    if image.format == "JPEG":
        for scale in _JPEG_DRAFT_SCALES:
            if -(-width // scale) * -(-height // scale) <= max_pixels:
                return scale
    raise MediaTooLarge(
        f"image is {width}x{height} = {width * height} pixels, over the {max_pixels} pixel "
        "limit (PIPEQ_MAX_IMAGE_PIXELS)"
    )


def _read_soundfile(
    data: bytes, max_samples: int, max_rate: int, max_channels: int
) -> tuple[np.ndarray, int]:
    with soundfile.SoundFile(io.BytesIO(data)) as audio:
        rate, channels = int(audio.samplerate), int(audio.channels)
        _refuse_header(rate, channels, int(audio.frames), max_samples, max_rate, max_channels)
        # Block by block, mixed down as it comes: the peak is the mono source, never all channels.
        # The mean of each row is the same arithmetic as the mean of the whole array's rows.
        mono, frames = [], 0
        for block in audio.blocks(_AUDIO_BLOCK_FRAMES, dtype="float32", always_2d=True):
            frames += len(block)
            _refuse_too_long(frames / rate, max_samples)  # a header may understate its frames
            mono.append(block.mean(axis=1, dtype=np.float32))
    return (np.concatenate(mono) if mono else np.zeros(0, np.float32)), rate


def _refuse_header(
    rate: int, channels: int, frames: int, max_samples: int, max_rate: int, max_channels: int
) -> None:
    if rate > max_rate:
        raise MediaTooLarge(f"audio sample rate {rate} Hz is over PIPEQ_MAX_AUDIO_SAMPLE_RATE")
    if channels > max_channels:
        raise MediaTooLarge(f"audio has {channels} channels, over PIPEQ_MAX_AUDIO_CHANNELS")
    _refuse_too_long(frames / rate, max_samples)
    # As many samples as the longest allowed audio holds in mono at the highest allowed rate:
    # bounds the decoding work of many channels at a high rate, which the length check does not.
    budget = max_samples * max_rate // SAMPLING_RATE
    if frames * channels > budget:
        raise MediaTooLarge(
            f"audio holds {frames} frames x {channels} channels = {frames * channels} samples, "
            f"over the {budget} that PIPEQ_MAX_MEDIA_BYTES allows to decode"
        )


def _refuse_too_long(seconds: float, max_samples: int) -> None:
    if seconds * SAMPLING_RATE > max_samples:
        raise MediaTooLarge(
            f"audio is {seconds:.1f} s long; PIPEQ_MAX_MEDIA_BYTES allows "
            f"{max_samples / SAMPLING_RATE:.1f} s of 16 kHz float32 samples"
        )


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLING_RATE:
        return samples
    ratio = Fraction(SAMPLING_RATE, rate).limit_denominator(_MAX_RESAMPLE_DENOMINATOR)
    resampled = resample_poly(samples, ratio.numerator, ratio.denominator)
    return np.ascontiguousarray(resampled, dtype=np.float32)
