"""Document QA with OCR over the host's cores: pipeq against the in-process pipeline, one run.

    source bench/gpu_setup.sh && python3 -m bench.docqa [--pages 200] [--procs 14] [--gpu]

Renders `--pages` invoice-like PNG pages (no word boxes: Tesseract reads them) and asks one
question of each, with a LayoutLM of LayoutLM-base's shape (12 layers, hidden 768; random weights
and the offline WordPiece vocabulary of cli/tiny_models.py):

- pipeq: one job per page, all submitted at once, to `pipeq worker` with `--procs` fronts, which
  run Tesseract for the jobs they take (OCR spreads over the cores); the model is in the one
  forward process (GPU 0 with --gpu, else the CPU).
- in-process: `pipeline("document-question-answering")` on the same pages one after another.

Answers are compared page by page (answer text and span exactly, score within 1e-3). Writes
docqa.json to $OUT (or bench/results) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from transformers import LayoutLMConfig, LayoutLMForQuestionAnswering, pipeline

from bench.gpu import Drain, Sampler
from bench.harness import Record, start_pipeq_worker, stop_process, versions, write_results
from pipeq.cli.tiny_models import _wordpiece_tokenizer
from pipeq.config.settings import Settings
from pipeq.producer.client import Client

MODEL = "layoutlm-base-shape"
QUESTIONS = (
    "What is the invoice number?",
    "What is the total amount?",
    "What is the date?",
    "Who is the customer?",
)
COMPANIES = ("ACME Corporation", "Globex Ltd", "Initech GmbH", "Umbrella SA", "Soylent Inc")


def build_layoutlm(folder: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = _wordpiece_tokenizer()
    config = LayoutLMConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_2d_position_embeddings=1024,
    )
    LayoutLMForQuestionAnswering(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def render_pages(folder: Path, count: int) -> list[Path]:
    """Invoice-like pages: a header, parties, dates, a few item lines and a total."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    font = ImageFont.load_default(size=26)
    paths = []
    for i in range(count):
        items = [
            f"{rng.choice(['Widget', 'Bolt', 'Cable', 'Panel', 'Valve'])} x{rng.randint(1, 9)}"
            f"   ${rng.randint(5, 900)}.{rng.randint(0, 99):02d}"
            for _ in range(rng.randint(3, 6))
        ]
        lines = [
            rng.choice(COMPANIES),
            f"Invoice number: {rng.randint(1000, 99999)}",
            f"Date: 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"Customer: {rng.choice(COMPANIES)}",
            *items,
            f"Total amount: ${rng.randint(100, 9999)}.{rng.randint(0, 99):02d}",
        ]
        image = Image.new("RGB", (850, 1100), "white")
        draw = ImageDraw.Draw(image)
        for n, line in enumerate(lines):
            draw.text((60, 60 + 70 * n), line, fill="black", font=font)
        path = folder / f"page{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def run_pipeq(
    work: Path, model_dir: Path, pages: list[Path], args: argparse.Namespace
) -> tuple[float, list[Any], dict[str, Any]]:
    registry = work / "models.yaml"
    entry = {
        "task": "document-question-answering",
        "model": str(model_dir),
        "device": "cuda" if args.gpu else "cpu",
        "max_batch_size": 64,
        "max_wait_ms": 5,
    }
    registry.write_text(yaml.safe_dump({"models": {MODEL: entry}}, sort_keys=False))
    env = {
        "PIPEQ_BROKER_URL": args.redis,
        "PIPEQ_MODELS": str(registry),
        "PIPEQ_LOG_LEVEL": "WARNING",
        "PIPEQ_MEDIA_ROOTS": str(pages[0].parent),
    }
    gpus = "0" if args.gpu else "cpu"
    command = ("--gpus", gpus, "--procs-per-gpu", str(args.procs))
    worker = start_pipeq_worker(env, work / "pipeq.log", *command)
    try:
        client = Client(Settings(broker_url=args.redis, models=registry))
        warm = [{"image": {"path": str(pages[0])}, "question": QUESTIONS[0]}]
        assert client.wait(client.submit(MODEL, warm), timeout_s=300).status == "succeeded"
        with Sampler([worker.pid]) as sampler:
            started = time.time()
            ids = [
                client.submit(
                    MODEL,
                    [{"image": {"path": str(p)}, "question": QUESTIONS[i % 4]}],
                    priority="bulk",
                )
                for i, p in enumerate(pages)
            ]
            docs = [client.wait(job_id, timeout_s=900) for job_id in ids]
        failed = [d for d in docs if d.status != "succeeded"]
        assert not failed, failed[0]
        finished = max(d.timings["finished_at"] for d in docs)
        summary = sampler.extra(Drain(0.0, [], len(docs), started, finished, {}))
    finally:
        stop_process(worker)
    return finished - started, [d.outputs[0] for d in docs], summary


def run_in_process(model_dir: Path, pages: list[Path], gpu: bool) -> tuple[float, list[Any]]:
    pipe = pipeline("document-question-answering", model=str(model_dir), device=0 if gpu else -1)
    pipe(image=Image.open(pages[0]).convert("RGB"), question=QUESTIONS[0])  # warm
    started = time.perf_counter()
    answers = [
        pipe(image=Image.open(p).convert("RGB"), question=QUESTIONS[i % 4])
        for i, p in enumerate(pages)
    ]
    return time.perf_counter() - started, answers


def same_answer(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    return len(got) == len(want) and all(
        (g["answer"], g["start"], g["end"]) == (w["answer"], w["start"], w["end"])
        and abs(g["score"] - w["score"]) < 1e-3
        for g, w in zip(got, want, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--procs", type=int, default=14)
    parser.add_argument("--gpu", action="store_true", help="the model on GPU 0 (both sides)")
    parser.add_argument(
        "--redis", default=os.environ.get("PIPEQ_BROKER_URL", "redis://127.0.0.1:6379/5")
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-docqa-"))
    model_dir = build_layoutlm(work / "model")
    pages = render_pages(work / "pages", args.pages)
    redis.Redis.from_url(args.redis).flushdb()
    wall_pipeq, pipeq_answers, summary = run_pipeq(work, model_dir, pages, args)
    print(f"pipeq: {wall_pipeq:.1f} s, {len(pages) / wall_pipeq:.2f} docs/s; {summary}", flush=True)
    wall_local, local_answers = run_in_process(model_dir, pages, args.gpu)
    print(f"in-process: {wall_local:.1f} s, {len(pages) / wall_local:.2f} docs/s", flush=True)
    equal = sum(same_answer(g, w) for g, w in zip(pipeq_answers, local_answers, strict=True))
    device = "cuda" if args.gpu else "cpu"
    common = {"pages": len(pages), "answers_equal": equal, "cores": os.cpu_count()}
    records = [
        Record(
            f"pipeq, {args.procs} fronts, one job per page, all at once",
            len(pages) / wall_pipeq,
            jobs=len(pages),
            device=device,
            extra={**common, **summary, "wall_s": round(wall_pipeq, 2), "procs": args.procs},
        ),
        Record(
            "in-process pipeline(), pages one after another",
            len(pages) / wall_local,
            jobs=len(pages),
            device=device,
            extra={**common, "wall_s": round(wall_local, 2)},
        ),
    ]
    write_results(
        args.out / "docqa.json", records, {"versions": versions(), "items_per_s": "pages/s"}
    )
    print("\n| measurement | pages/s | total s |\n|---|---:|---:|")
    for record, wall in zip(records, (wall_pipeq, wall_local), strict=True):
        print(f"| {record.name} | {record.items_per_s:.2f} | {wall:.1f} |")
    print(f"\nspeed-up: {wall_local / wall_pipeq:.2f}x; answers equal on {equal} of {len(pages)}")


if __name__ == "__main__":
    main()
