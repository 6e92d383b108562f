"""What one batch of Whisper (large-v3's shape, fp16) costs in-process, by generate option: the
probe behind bench/NOTES.md's session 8 entry, not a pipeq measurement.

    source bench/gpu_setup.sh && python3 -m bench.whisper_probe [--rows 64] [--tokens 64]

One `pipeline()` call over `--rows` clips of 30 s (one chunk each) at `batch_size=--rows`, timed
per variant: timestamps on and off, and the static cache (which makes generate compile the
decoder's step: CUDA graphs), its first call (compiling) and two more.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import pipeline
from transformers.generation import logits_process
from transformers.utils import logging

from bench.audio_gpu import LARGE_V3, SMALL, build_whisper


def batched_timestamp_rules(
    self: Any, input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """`WhisperTimeStampLogitsProcessor.__call__` as transformers 5.24 has it (one host copy of
    the ids per step instead of one per row; the same masks), for transformers 5.17's per-row
    loop to be compared with."""
    scores = scores.clone()
    scores[:, self.no_timestamps_token_id] = -float("inf")
    lasts = []
    for k, seq in enumerate(input_ids.tolist()):
        seq = seq[self.begin_index :]
        last_was = len(seq) >= 1 and seq[-1] >= self.timestamp_begin
        penultimate_was = len(seq) < 2 or seq[-2] >= self.timestamp_begin
        if last_was:
            if penultimate_was:
                scores[k, self.timestamp_begin :] = -float("inf")
            else:
                scores[k, : self.eos_token_id] = -float("inf")
        last = self.timestamp_begin
        stamps = [token for token in seq if token >= self.timestamp_begin]
        if stamps:
            last = stamps[-1] if last_was and not penultimate_was else stamps[-1] + 1
        lasts.append(last)
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    below = torch.tensor(lasts, device=scores.device).unsqueeze(-1)
    scores.masked_fill_((vocab >= self.timestamp_begin) & (vocab < below), -float("inf"))
    if input_ids.shape[1] == self.begin_index:
        scores[:, : self.timestamp_begin] = -float("inf")
        if self.max_initial_timestamp_index is not None:
            scores[:, self.timestamp_begin + self.max_initial_timestamp_index + 1 :] = -float("inf")
    logprobs = torch.nn.functional.log_softmax(scores.float(), dim=-1)
    stamp = logprobs[:, self.timestamp_begin :].logsumexp(dim=-1)
    text = logprobs[:, : self.timestamp_begin].max(dim=-1).values
    scores[:, : self.timestamp_begin].masked_fill_((stamp > text).unsqueeze(-1), -float("inf"))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--static", action="store_true", help="also the static cache (compiles)")
    parser.add_argument("--small", action="store_true", help="a small model on the CPU (smoke)")
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    logging.set_verbosity_error()
    folder = Path(tempfile.gettempdir()) / f"pipeq-whisper-{'small' if args.small else 'large'}"
    if not (folder / "model.safetensors").exists():
        build_whisper(folder, SMALL if args.small else LARGE_V3, device)
    dtype = torch.float32 if args.small else torch.float16
    pipe = pipeline("automatic-speech-recognition", model=str(folder), device=device, dtype=dtype)
    print("attention:", pipe.model.config._attn_implementation, flush=True)
    rng = np.random.default_rng(0)
    clips = [
        {"raw": 0.1 * rng.standard_normal(16_000 * 30).astype(np.float32), "sampling_rate": 16_000}
        for _ in range(args.rows)
    ]
    stamps = {"return_timestamps": True}
    variants = [
        ("timestamps (warm-up)", stamps, {}, args.rows),
        ("timestamps, 16 rows", stamps, {}, 16),
        ("timestamps", stamps, {}, args.rows),
        ("no timestamps", {}, {}, args.rows),
        (
            "timestamps, static cache (1st: compiles)",
            stamps,
            {"cache_implementation": "static"},
            args.rows,
        ),
        ("timestamps, static cache", stamps, {"cache_implementation": "static"}, args.rows),
    ]
    library = logits_process.WhisperTimeStampLogitsProcessor.__call__
    runs = [(False, *v) for v in variants[:4]]
    runs += [(True, "batched timestamp rules", stamps, {}, args.rows)]
    runs += [(True, "batched timestamp rules, 16 rows", stamps, {}, 16)]
    runs += [(True, *v) for v in variants[4:]] if args.static else []
    for batched, name, params, generate, rows in runs:
        logits_process.WhisperTimeStampLogitsProcessor.__call__ = (
            batched_timestamp_rules if batched else library
        )
        if not args.small:
            torch.cuda.synchronize()
        began = time.perf_counter()
        pipe(
            [dict(clip) for clip in clips[:rows]],  # the pipeline pops each dict's keys
            batch_size=rows,
            generate_kwargs={"max_new_tokens": args.tokens, **generate},
            **params,
        )
        if not args.small:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        print(f"{name}: {seconds:.2f} s, {seconds / args.tokens * 1000:.1f} ms a step", flush=True)


if __name__ == "__main__":
    main()
