"""Whisper of large-v3's shape on one GPU: pipeq against two in-process baselines (bench/audio.py
--gpu runs this; see its docstring for the CPU mode).

    source bench/gpu_setup.sh && python3 -m bench.audio --gpu [--batches 8,16,32,64]

The model has large-v3's architecture (32 encoder and 32 decoder layers, d_model 1280, 20 heads,
128 mel bins, 51,866 ids) and random weights, built offline in fp16 on the GPU. Random weights
never settle on end-of-text, and the generation config suppresses it (and the ids the offline
tokenizer lacks), so every 30 s chunk decodes exactly `--max-new-tokens` tokens on both sides.

- pipeq: one job per file (bulk lane), all submitted at once, to `pipeq worker --gpus 0`; while
  they run, `--interactive` clips of 10 s go in one a second (interactive lane): their latency is
  submit to result stored. GPU busy is sampled over the bulk drain.
- (a) in-process, one call per file, one after another, `batch_size` at its best of `--batches`.
- (b) in-process, the whole list of files in one call, `batch_size` at its best of `--batches`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf
import torch
import yaml
from transformers import (
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from bench.gpu import OUT_DIR, Drain, Sampler
from bench.harness import (
    Record,
    percentiles,
    start_pipeq_worker,
    stop_process,
    versions,
    write_results,
)
from pipeq.cli.tiny_whisper import whisper_config, whisper_generation_config, whisper_tokenizer
from pipeq.config.settings import Settings
from pipeq.producer.client import Client

MODEL = "whisper-large-shape"
LARGE_V3 = {
    "d_model": 1280,
    "encoder_layers": 32,
    "decoder_layers": 32,
    "encoder_attention_heads": 20,
    "decoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120,
    "num_mel_bins": 128,
    "vocab_size": 51866,
}
# A few layers and a narrow model: the same code path, for a CPU smoke run (--small).
SMALL = {**LARGE_V3, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2}
SMALL.update(encoder_attention_heads=2, decoder_attention_heads=2)
SMALL.update(encoder_ffn_dim=128, decoder_ffn_dim=128)


def build_whisper(folder: Path, shape: dict[str, int], device: str) -> Path:
    """Random weights of `shape` in fp16 (fp32 on the CPU), with the offline tokenizer."""
    torch.manual_seed(0)
    tokenizer = whisper_tokenizer()
    ids = tokenizer.get_vocab()
    config = whisper_config(ids, **shape)
    eot = config.eos_token_id
    with torch.device(device):
        model = WhisperForConditionalGeneration(config)
    if device != "cpu":
        model = model.half()
    generation = whisper_generation_config(ids)
    # Equal work on both sides: no end-of-text, and none of the ids the offline tokenizer lacks.
    generation.suppress_tokens = [eot, *range(len(tokenizer), shape["vocab_size"])]
    model.generation_config = generation
    model.save_pretrained(folder)
    extractor = WhisperFeatureExtractor(feature_size=shape["num_mel_bins"])
    WhisperProcessor(extractor, tokenizer).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def call_params(max_new_tokens: int) -> dict[str, Any]:
    return {
        "chunk_length_s": 30,
        "return_timestamps": True,
        "generate_kwargs": {"max_new_tokens": max_new_tokens},
    }


def run_pipeq(
    work: Path,
    model_dir: Path,
    files: list[Path],
    clips: list[Path],
    args: Any,
    broker: str,
    device: str,
) -> tuple[float, list[float], dict[str, Any], list[dict[str, Any]]]:
    """Bulk wall seconds, interactive latencies, sampler summary, bulk outputs."""
    registry = work / "models.yaml"
    entry = {
        "task": "automatic-speech-recognition",
        "model": str(model_dir),
        "device": device,
        "dtype": "float16" if device != "cpu" else "float32",
        "max_batch_size": args.pipeq_batch,
        "max_wait_ms": 20,
        "params": call_params(args.max_new_tokens),
    }
    registry.write_text(yaml.safe_dump({"models": {MODEL: entry}}, sort_keys=False))
    env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_MODELS": str(registry),
        "PIPEQ_LOG_LEVEL": "WARNING",
        "PIPEQ_MEDIA_ROOTS": str(files[0].parent.parent),
    }
    gpus = "cpu" if device == "cpu" else "0"
    worker = start_pipeq_worker(
        env, work / "pipeq.log", "--gpus", gpus, "--procs-per-gpu", str(args.procs)
    )
    try:
        client = Client(Settings(broker_url=broker, models=registry))
        warm = client.wait(client.submit(MODEL, [{"path": str(clips[0])}]), timeout_s=900)
        assert warm.status == "succeeded", warm
        with Sampler([worker.pid]) as sampler:
            started = time.time()
            ids = [client.submit(MODEL, [{"path": str(p)}], priority="bulk") for p in files]
            spy = profile_forward(worker.pid, work, args.profile_s)
            quick = []
            for clip in clips:
                time.sleep(args.interactive_every_s)
                quick.append(client.submit(MODEL, [{"path": str(clip)}]))
            quick_docs = [client.wait(job_id, timeout_s=1800) for job_id in quick]
            docs = [client.wait(job_id, timeout_s=1800) for job_id in ids]
        if spy is not None:
            spy.wait()
            print_profile(OUT_DIR / "prof-whisper-forward.txt")
        failed = [d for d in docs + quick_docs if d.status != "succeeded"]
        assert not failed, failed[0]
        finished = max(d.timings["finished_at"] for d in docs)
        drain = Drain(0.0, [], len(ids), started, finished, {})
        latencies = [d.timings["finished_at"] - d.timings["submitted_at"] for d in quick_docs]
        summary = sampler.extra(drain)
    finally:
        stop_process(worker)
    return finished - started, latencies, summary, [d.outputs[0] for d in docs]


def profile_forward(pid: int, work: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    """py-spy over the forward process (every thread, GIL or not) for `seconds` of the drain,
    as collapsed stacks in $OUT/prof-whisper-forward.txt."""
    if not seconds:
        return None
    forward = [
        child.pid
        for child in psutil.Process(pid).children(recursive=True)
        if "forward" in " ".join(child.cmdline())
    ]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    command = ["py-spy", "record", "-p", str(forward[0]), "-d", str(seconds), "-r", "100"]
    command += ["-f", "raw", "-o", str(OUT_DIR / "prof-whisper-forward.txt")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(path: Path, top: int = 25) -> None:
    """The frames most often on the stack (inclusive), from py-spy's collapsed stacks."""
    if not path.exists():
        print(f"no profile: py-spy wrote no {path}")
        return
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + int(n)
    for frame, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / max(total, 1):5.1f}% {frame[:150]}")


def decoded(path: Path) -> dict[str, Any]:
    samples, rate = sf.read(path, dtype="float32")
    return {"raw": samples, "sampling_rate": rate}


def run_in_process(
    model_dir: Path, files: list[Path], args: Any, device: str
) -> tuple[dict[str, dict[int, float]], list[dict[str, Any]]]:
    """Seconds of (a) per-file calls and (b) one call over the list, per batch size; the
    outputs of (b) at the first batch size."""
    from transformers import pipeline

    dtype = torch.float16 if device != "cpu" else torch.float32
    pipe = pipeline(
        "automatic-speech-recognition", model=str(model_dir), device=device, dtype=dtype
    )
    params = call_params(args.max_new_tokens)
    pipe(decoded(files[0]), batch_size=8, **params)  # warm
    walls: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    outputs: list[dict[str, Any]] = []
    for batch in args.batches:
        started = time.perf_counter()
        for path in files:
            pipe(decoded(path), batch_size=batch, **params)
        walls["a"][batch] = time.perf_counter() - started
        print(f"  (a) batch {batch}: {walls['a'][batch]:.1f} s", flush=True)
        started = time.perf_counter()
        got = pipe([decoded(path) for path in files], batch_size=batch, **params)
        walls["b"][batch] = time.perf_counter() - started
        print(f"  (b) batch {batch}: {walls['b'][batch]:.1f} s", flush=True)
        outputs = outputs or list(got)
    return walls, outputs


def same_text(pipeq: list[dict[str, Any]], local: list[dict[str, Any]]) -> int:
    return sum(a["text"] == b["text"] for a, b in zip(pipeq, local, strict=True))


def gpu_records(
    audio_s: float,
    wall_pipeq: float,
    latencies: list[float],
    summary: dict[str, Any],
    walls: dict[str, dict[int, float]],
    common: dict[str, Any],
    device: str,
) -> list[Record]:
    p50, p99 = percentiles(latencies)
    records = [
        Record(
            "pipeq, one job per file, all at once (bulk lane)",
            audio_s / wall_pipeq,
            jobs=common["files"],
            device=device,
            extra={**common, **summary, "wall_s": round(wall_pipeq, 2)},
        ),
        Record(
            "pipeq, 10 s interactive clips during the bulk drain",
            0.0,
            p50_ms=p50,
            p99_ms=p99,
            jobs=len(latencies),
            device=device,
            extra={"latencies_s": [round(x, 3) for x in latencies]},
        ),
    ]
    names = {
        "a": "in-process pipeline(), one call per file, one after another",
        "b": "in-process pipeline(), all files in one call",
    }
    for key, name in names.items():
        best = min(walls[key], key=lambda b: walls[key][b])
        records.append(
            Record(
                f"{name} (best batch_size)",
                audio_s / walls[key][best],
                batch=best,
                device=device,
                extra={"wall_s_by_batch": {str(b): round(s, 2) for b, s in walls[key].items()}},
            )
        )
    return records


def print_table(records: list[Record]) -> None:
    print("| measurement | audio s/s | batch | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in records:
        p50 = f"{r.p50_ms:.0f}" if r.p50_ms is not None else ""
        p99 = f"{r.p99_ms:.0f}" if r.p99_ms is not None else ""
        speed = f"{r.items_per_s:,.1f}" if r.items_per_s else ""
        print(f"| {r.name} | {speed} | {r.batch or ''} | {p50} | {p99} |")
    pipeq, a, b = records[0].items_per_s, records[2].items_per_s, records[3].items_per_s
    print(f"\npipeq / (a): {pipeq / a:.2f}x; pipeq / (b): {pipeq / b:.2f}x")


def seconds_of(files: list[Path]) -> float:
    return float(sum(sf.info(str(p)).duration for p in files))


def chunk_count(files: list[Path]) -> int:
    # The pipeline's default stride is a sixth of the chunk each side: a chunk every 20 s.
    return int(sum(max(1, np.ceil((sf.info(str(p)).duration - 10) / 20)) for p in files))


def main_gpu(args: Any, synthesize: Any) -> None:
    import tempfile

    import redis
    from transformers.utils import logging

    logging.set_verbosity_error()  # one max_length warning per chunk otherwise
    device = "cpu" if args.small else "cuda"
    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-whisper-"))
    started = time.perf_counter()
    # Kept between calls on a warm machine: building and saving 3 GB takes a while.
    model_dir = Path(tempfile.gettempdir()) / f"pipeq-whisper-{'small' if args.small else 'large'}"
    if not (model_dir / "model.safetensors").exists():
        build_whisper(model_dir, SMALL if args.small else LARGE_V3, device)
    print(f"model ready in {time.perf_counter() - started:.0f} s", flush=True)
    files = synthesize(work / "audio" / "long", args.files, args.min_s, args.max_s)
    clips = synthesize(work / "audio" / "clips", args.interactive + 1, 10, 10, seed=1)
    audio_s = seconds_of(files)
    print(f"{len(files)} files, {audio_s / 60:.1f} min of audio, ~{chunk_count(files)} chunks")
    redis.Redis.from_url(args.redis).flushdb()
    wall, latencies, summary, pipeq_out = 1.0, [0.0], {}, []
    if not args.skip_pipeq:
        wall, latencies, summary, pipeq_out = run_pipeq(
            work, model_dir, files, clips[1:], args, args.redis, device
        )
        print(f"pipeq: {wall:.1f} s, {audio_s / wall:.1f} audio s/s; {summary}", flush=True)
        print(f"interactive latencies (s): {[round(x, 2) for x in latencies]}", flush=True)
    if args.skip_baselines:
        return
    walls, local_out = run_in_process(model_dir, files, args, device)
    common = {
        "files": len(files),
        "audio_s": round(audio_s, 1),
        "chunks_30s": chunk_count(files),
        "max_new_tokens": args.max_new_tokens,
        "pipeq_max_batch_size": args.pipeq_batch,
        "procs_per_gpu": args.procs,
        "transcripts_equal_to_b": same_text(pipeq_out, local_out) if pipeq_out else None,
    }
    records = gpu_records(audio_s, wall, latencies, summary, walls, common, device)
    meta = {
        "versions": versions(),
        "model": "Whisper, large-v3's shape, random weights" if not args.small else "small",
        "items_per_s": "audio seconds per wall second",
        "params": call_params(args.max_new_tokens),
    }
    write_results(args.out, records, meta)
    print_table(records)
    print(f"transcripts equal to (b)'s on {common['transcripts_equal_to_b']} of {len(files)} files")
