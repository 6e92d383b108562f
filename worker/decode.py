"""Bytes -> the image and audio objects `transformers.pipeline()` takes, refusing hostile input.

Images: Pillow, with `Image.MAX_IMAGE_PIXELS` as the decompression-bomb limit (Pillow's own
check only warns between one and two times the limit). Audio: soundfile for what libsndfile reads
(WAV, FLAC, OGG, MP3), else an `ffmpeg` subprocess restricted to local input and audio demuxers,
so a playlist cannot make it open URLs or other files.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from fractions import Fraction
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageOps
from scipy.signal import resample_poly

from config.errors import DecodeError, InputError, MediaTooLarge

SAMPLING_RATE = 16_000
# Demuxers ffmpeg may pick; hls, concat and friends are left out because they open other inputs.
FFMPEG_FORMATS = "mov,mp4,m4a,matroska,webm,ogg,mp3,aac,wav,flac,w64,aiff,caf"
FFMPEG_TIMEOUT_S = 60.0
# A rate like 44 099 Hz would make resample_poly build a filter of millions of taps; a ratio with
# a denominator up to 1000 is exact for every common rate (44.1 kHz -> 160/441) and off by under
# one part in a million for the rest.
_MAX_RESAMPLE_DENOMINATOR = 1000


def decode_image(data: bytes) -> Image.Image:
    """An RGB image, upright per its EXIF orientation."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            _refuse_too_many_pixels(probe.size)
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"image has too many pixels: {exc}") from exc
    except InputError:
        raise
    # Pillow's plugins raise OSError, SyntaxError, struct.error, IndexError... on hostile bytes;
    # to the caller they all mean the same thing.
    except Exception as exc:
        raise DecodeError(f"not an image Pillow can read: {exc}") from exc


def decode_audio(data: bytes, *, max_samples: int) -> dict[str, Any]:
    """`{"raw": float32 mono samples at 16 kHz, "sampling_rate": 16000}`."""
    try:
        samples, rate = _read_soundfile(data, max_samples)
    except soundfile.SoundFileError:
        samples, rate = _read_ffmpeg(data, max_samples), SAMPLING_RATE
    if samples.size == 0:
        raise DecodeError("the audio holds no samples")
    return {"raw": _resample(samples, rate), "sampling_rate": SAMPLING_RATE}


def _refuse_too_many_pixels(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        raise MediaTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the {limit} pixel limit"
        )


def _read_soundfile(data: bytes, max_samples: int) -> tuple[np.ndarray, int]:
    with soundfile.SoundFile(io.BytesIO(data)) as audio:
        rate = int(audio.samplerate)
        _refuse_too_long(audio.frames / rate, max_samples)
        samples = audio.read(dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32), rate


def _read_ffmpeg(data: bytes, max_samples: int) -> np.ndarray:
    # One second past the cap is enough to tell 'longer than allowed' from 'exactly at it'.
    max_seconds = max_samples / SAMPLING_RATE + 1
    # A file, not a pipe: MP4/M4A keep their index at the end and need a seekable input.
    with tempfile.NamedTemporaryFile(prefix="pipeq-audio-") as source:
        source.write(data)
        source.flush()
        stdout = _run_ffmpeg(_ffmpeg_command(source.name, max_seconds), source.name)
    samples = np.frombuffer(stdout, dtype="<f4")
    _refuse_too_long(samples.size / SAMPLING_RATE, max_samples)
    return samples


def _ffmpeg_command(path: str, max_seconds: float) -> list[str]:
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
        "-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS,
        "-i", path,
        "-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLING_RATE), "-t", f"{max_seconds:.3f}",
        "-f", "f32le", "pipe:1",
    ]  # fmt: skip


def _run_ffmpeg(command: list[str], path: str) -> bytes:
    try:
        done = subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise DecodeError(
            "this audio is not WAV, FLAC, OGG or MP3, and the worker has no ffmpeg to decode it; "
            "send one of those formats (or install ffmpeg on the worker)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise DecodeError(f"ffmpeg took longer than {FFMPEG_TIMEOUT_S} s to decode") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").replace(path, "input").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise DecodeError(f"not audio that soundfile or ffmpeg can decode: {reason}")
    return done.stdout


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
