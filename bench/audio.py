"""Long audio on the CPU, one run, side by side: pipeq vs the in-process pipeline (tiny Whisper).
With --gpu, Whisper of large-v3's shape on a GPU against two in-process baselines
(bench/audio_gpu.py says how).

    python -m bench.audio [--files 20] [--min-s 120] [--max-s 600] [--batch 16]
                          [--redis redis://127.0.0.1:6379/5]

Synthesizes `--files` FLAC files (16 kHz float32 noise plus tones, lengths spread evenly over
[min-s, max-s]) and transcribes them with the tiny Whisper of cli/tiny_models.py two ways:

- pipeq: one job per file, all submitted at once, to one `pipeq worker --gpus cpu` whose registry
  gives tiny-whisper `max_batch_size: B` and `params: {chunk_length_s: 30}`; the worker batches the
  30 s chunks of all jobs together. Mean batch fill is read from the worker's Prometheus metrics
  (`pipeq_batch_size_sum / pipeq_batch_size_count`).
- in-process: `pipeline("automatic-speech-recognition", model=...)` called on the same files one
  after another with `chunk_length_s=30, batch_size=B` (files decoded with soundfile, inside the
  timed part).

The Redis DB given by --redis is flushed first. Writes bench/results/audio.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import redis
import soundfile as sf
import torch
import yaml

from bench.audio_gpu import main_gpu
from bench.gpu import OUT_DIR
from bench.harness import (
    Record,
    batch_histogram,
    start_pipeq_worker,
    stop_process,
    versions,
    write_results,
)
from pipeq.cli.tiny_models import build_tiny_models
from pipeq.config.settings import Settings
from pipeq.producer.client import Client

RATE = 16_000
MODEL = "tiny-whisper"
METRICS_PORT = 9393


def synthesize(folder: Path, count: int, min_s: float, max_s: float, seed: int = 0) -> list[Path]:
    """`count` FLAC files of noise plus a few tones, lengths evenly spread over [min_s, max_s]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.linspace(min_s, max_s, count) if count > 1 else np.array([min_s])
    rng.shuffle(lengths)
    paths = []
    for i, seconds in enumerate(lengths):
        n = int(seconds * RATE)
        t = np.arange(n, dtype=np.float32) / RATE
        signal = 0.05 * rng.standard_normal(n).astype(np.float32)
        for freq in rng.uniform(200, 2000, size=3):
            signal += 0.1 * np.sin(2 * np.pi * freq * t).astype(np.float32)
        path = folder / f"clip{i:02d}_{int(seconds)}s.flac"
        sf.write(path, signal, RATE)
        paths.append(path)
    return paths


def batch_mean(metrics_url: str, model: str) -> tuple[float, float]:
    """(sum, count) of the worker's `pipeq_batch_size` histogram for `model`."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for part in ("sum", "count"):
        match = re.search(rf'pipeq_batch_size_{part}\{{model="{re.escape(model)}"\}} (\S+)', text)
        values[part] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def run_pipeq(
    work: Path, model_dir: Path, files: list[Path], warm_file: Path, batch: int, broker: str
) -> tuple[float, float, float, dict[str, float], list[str]]:
    """Wall seconds from first submit to last result stored, batches, items, histogram, texts."""
    registry = work / "models.yaml"
    entry = {
        "task": "automatic-speech-recognition",
        "model": str(model_dir),
        "device": "cpu",
        "max_batch_size": batch,
        "max_wait_ms": 5,
        "params": {"chunk_length_s": 30},
    }
    registry.write_text(yaml.safe_dump({"models": {MODEL: entry}}, sort_keys=False))
    env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_MODELS": str(registry),
        "PIPEQ_METRICS_PORT": str(METRICS_PORT),
        "PIPEQ_LOG_LEVEL": "WARNING",
        "PIPEQ_MEDIA_ROOTS": str(files[0].parent),
    }
    metrics_url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    worker = start_pipeq_worker(env, work / "pipeq.log", "--gpus", "cpu", "--concurrency", "32")
    try:
        client = Client(Settings(broker_url=broker, models=registry))
        warm = client.wait(client.submit(MODEL, [{"path": str(warm_file)}]), timeout_s=600)
        assert warm.status == "succeeded", warm
        sum0, count0 = batch_mean(metrics_url, MODEL)
        started = time.time()
        ids = [client.submit(MODEL, [{"path": str(path)}]) for path in files]
        docs = [client.wait(job_id, timeout_s=1800) for job_id in ids]
        failed = [d for d in docs if d.status != "succeeded"]
        assert not failed, failed[0]
        wall = max(d.timings["finished_at"] for d in docs) - started
        sum1, count1 = batch_mean(metrics_url, MODEL)
        histogram = batch_histogram(metrics_url, MODEL)
    finally:
        stop_process(worker)
    return wall, count1 - count0, sum1 - sum0, histogram, [d.outputs[0]["text"] for d in docs]


def run_in_process(
    model_dir: Path, files: list[Path], warm_file: Path, batch: int
) -> tuple[float, list[str]]:
    from transformers import pipeline

    pipe = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")

    def one(path: Path) -> str:
        samples, rate = sf.read(path, dtype="float32")
        out = pipe({"raw": samples, "sampling_rate": rate}, chunk_length_s=30, batch_size=batch)
        return str(out["text"])

    one(warm_file)  # warm, like pipeq's warm-up job
    started = time.perf_counter()
    texts = [one(path) for path in files]
    return time.perf_counter() - started, texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--min-s", type=float, default=120)
    parser.add_argument("--max-s", type=float, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--out", type=Path, default=None)
    gpu = parser.add_argument_group("GPU mode (bench/audio_gpu.py)")
    gpu.add_argument("--gpu", action="store_true", help="Whisper of large-v3's shape on GPU 0")
    gpu.add_argument("--small", action="store_true", help="the GPU mode's code, a small model, CPU")
    gpu.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=[8, 16, 32, 64]
    )
    gpu.add_argument("--pipeq-batch", type=int, default=128)
    gpu.add_argument("--max-new-tokens", type=int, default=64)
    gpu.add_argument("--interactive", type=int, default=20)
    gpu.add_argument("--interactive-every-s", type=float, default=1.0)
    gpu.add_argument("--procs", type=int, default=4)
    gpu.add_argument("--profile-s", type=int, default=0, help="py-spy the forward process")
    gpu.add_argument("--skip-baselines", action="store_true", help="pipeq only")
    gpu.add_argument("--skip-pipeq", action="store_true", help="the in-process baselines only")
    args = parser.parse_args()
    if args.gpu or args.small:
        args.out = args.out or OUT_DIR / "audio-gpu.json"
        main_gpu(args, synthesize)
        return
    args.out = args.out or Path("bench/results/audio.json")

    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-audio-"))
    model_dir = build_tiny_models(work / "models")[MODEL]
    files = synthesize(work / "audio", args.files, args.min_s, args.max_s)
    warm_file = synthesize(work / "audio" / "warm", 1, 30, 30, seed=1)[0]
    audio_s = sum(sf.info(str(p)).duration for p in files)
    chunks = sum(int(np.ceil(sf.info(str(p)).duration / 30)) for p in files)
    print(
        f"{len(files)} files, {args.min_s:.0f}-{args.max_s:.0f} s each, "
        f"{audio_s / 60:.1f} min of audio in total, ~{chunks} chunks of 30 s; B = {args.batch}",
        flush=True,
    )
    redis.Redis.from_url(args.redis).flushdb()

    wall_pipeq, batches, items, histogram, pipeq_texts = run_pipeq(
        work, model_dir, files, warm_file, args.batch, args.redis
    )
    fill = items / batches if batches else 0.0
    print(f"pipeq: {wall_pipeq:.1f} s, {audio_s / wall_pipeq:.1f} audio s/s, fill {fill:.2f}")
    wall_local, local_texts = run_in_process(model_dir, files, warm_file, args.batch)
    same = sum(a == b for a, b in zip(pipeq_texts, local_texts, strict=True))
    words = sum(len(t.split()) for t in local_texts)
    print(f"transcripts equal on {same} of {len(files)} files ({words} words in-process)")
    print(f"in-process: {wall_local:.1f} s, {audio_s / wall_local:.1f} audio s/s", flush=True)

    common = {
        "files": len(files),
        "audio_s": round(audio_s, 1),
        "chunks_30s": chunks,
        "transcripts_equal": same,
        "words_in_process": words,
        "words_pipeq": sum(len(t.split()) for t in pipeq_texts),
    }
    records = [
        Record(
            f"pipeq, {len(files)} jobs at once",
            audio_s / wall_pipeq,
            batch=args.batch,
            jobs=len(files),
            device="cpu",
            extra={
                **common,
                "wall_s": round(wall_pipeq, 2),
                "batches": batches,
                "batch_items": items,
                "mean_batch_fill": round(fill, 2),
            },
        ),
        Record(
            "in-process pipeline(), files one after another",
            audio_s / wall_local,
            batch=args.batch,
            jobs=len(files),
            device="cpu",
            extra={**common, "wall_s": round(wall_local, 2)},
        ),
    ]
    meta = {
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "items_per_s": "audio seconds per wall second",
        "durations_s": [args.min_s, args.max_s],
        "batch_size_histogram_cumulative": histogram,
    }
    write_results(args.out, records, meta)
    print()
    print("| measurement | total s | audio s/s | batch B | mean batch fill |")
    print("|---|---:|---:|---:|---:|")
    for record, wall, cell in (
        (records[0], wall_pipeq, f"{fill:.2f}"),
        (records[1], wall_local, ""),
    ):
        print(f"| {record.name} | {wall:.1f} | {audio_s / wall:.1f} | {args.batch} | {cell} |")
    print(f"\nspeed-up: {wall_local / wall_pipeq:.2f}x; histogram (le -> count): {histogram}")


if __name__ == "__main__":
    main()
