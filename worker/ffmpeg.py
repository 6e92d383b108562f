"""Decoding audio through ffmpeg (formats libsndfile lacks): one subprocess per input, fed through
a pipe, bounded in samples and time, killed when it runs over."""

from __future__ import annotations

import subprocess
import tempfile
import threading
from typing import Any

import numpy as np

from pipeq.config.errors import DecodeError, MediaTooLarge

# The rate every audio model here takes; ffmpeg resamples to it.
SAMPLING_RATE = 16_000

# Demuxers ffmpeg may pick; hls, concat and friends are left out because they open other inputs.
FFMPEG_FORMATS = "mov,mp4,m4a,matroska,webm,ogg,mp3,aac,wav,flac,w64,aiff,caf"


FFMPEG_TIMEOUT_S = 60.0


_PIPE_CHUNK_BYTES = 1 << 16


_STDERR_TAIL_BYTES = 4096


def read_ffmpeg(data: bytes, max_samples: int) -> np.ndarray:
    # One second past the cap is enough to tell 'longer than allowed' from 'exactly at it'.
    max_seconds = max_samples / SAMPLING_RATE + 1
    # A file, not a pipe: MP4/M4A keep their index at the end and need a seekable input.
    with tempfile.NamedTemporaryFile(prefix="pipeq-audio-") as source:
        source.write(data)
        source.flush()
        stdout = _run_ffmpeg(_ffmpeg_command(source.name, max_seconds), source.name, max_samples)
    return np.frombuffer(stdout, dtype="<f4")


def _ffmpeg_command(path: str, max_seconds: float) -> list[str]:
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
        "-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS,
        "-i", path,
        "-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLING_RATE), "-t", f"{max_seconds:.3f}",
        "-f", "f32le", "pipe:1",
    ]  # fmt: skip


def _run_ffmpeg(command: list[str], path: str, max_samples: int) -> bytearray:
    """ffmpeg's stdout, read as it comes and cut off (ffmpeg killed) past `max_samples`."""
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError as exc:
        raise DecodeError(
            "this audio is not WAV, FLAC, OGG or MP3, and the worker has no ffmpeg to decode it; "
            "send one of those formats (or install ffmpeg on the worker)"
        ) from exc
    timed_out = threading.Event()
    timer = threading.Timer(FFMPEG_TIMEOUT_S, _kill, (proc, timed_out))
    stderr = bytearray()
    drain = threading.Thread(target=_keep_tail, args=(proc.stderr, stderr), daemon=True)
    with proc:
        timer.start()
        drain.start()
        try:
            stdout = _read_pipe(proc.stdout, max_samples)
        except MediaTooLarge:
            proc.kill()
            raise
        finally:
            timer.cancel()
            returncode = proc.wait()
            drain.join()
    if timed_out.is_set():
        raise DecodeError(f"ffmpeg took longer than {FFMPEG_TIMEOUT_S} s to decode")
    if returncode != 0:
        lines = stderr.decode(errors="replace").replace(path, "input").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {returncode}"
        raise DecodeError(f"not audio that soundfile or ffmpeg can decode: {reason}")
    return stdout


def _read_pipe(pipe: Any, max_samples: int) -> bytearray:
    output = bytearray()
    while chunk := pipe.read1(_PIPE_CHUNK_BYTES):
        output += chunk
        if len(output) > 4 * max_samples:  # float32
            raise MediaTooLarge(
                f"audio is longer than the {max_samples / SAMPLING_RATE:.1f} s of 16 kHz float32 "
                "samples PIPEQ_MAX_MEDIA_BYTES allows"
            )
    return output


def _kill(proc: subprocess.Popen[bytes], killed: threading.Event) -> None:
    killed.set()
    proc.kill()


def _keep_tail(pipe: Any, tail: bytearray) -> None:
    """Drain `pipe` (so ffmpeg never blocks on it), keeping only its last lines."""
    while chunk := pipe.read1(_PIPE_CHUNK_BYTES):
        tail += chunk
        del tail[:-_STDERR_TAIL_BYTES]
