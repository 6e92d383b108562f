"""One `device_map: auto` model placed over two GPUs by one engine (nvidia-h200-x2):

    source bench/gpu_setup.sh && python3 -m bench.device_map

BERT-base (random weights, fp16) whose `max_memory` leaves GPU 0 room for part of it only, served
by `pipeq worker --gpus 0+1`: where its layers went, and its answers for 512 texts, one per job,
against `pipeline()` on one GPU. Writes device-map.json to $OUT (or bench/results).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import redis
import torch
from transformers import pipeline

from bench.gpu import build_bert, make_texts
from bench.harness import start_pipeq_worker, stop_process
from pipeq.config.registry import ModelSpec
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client
from pipeq.worker.pipelines import load_pipeline

TEXTS = 512
# BERT-base in fp16 is ~220 MB: GPU 0 takes what fits in this, GPU 1 the rest.
MAX_MEMORY = {0: "120MiB", 1: "20GiB"}


def main() -> None:
    out = Path(os.environ.get("OUT", "bench/results"))
    work = Path(tempfile.mkdtemp(prefix="pipeq-device-map-"))
    bert, words = build_bert(work / "bert", {})
    texts = make_texts(TEXTS, words)
    spec = ModelSpec(
        name="bert-split",
        task="text-classification",
        model=str(bert),
        dtype="float16",
        device_map="auto",
        max_memory=MAX_MEMORY,
        params={"truncation": True, "top_k": None},
        max_batch_size=64,
    )
    placed = load_pipeline(spec).model.hf_device_map
    placement = dict(Counter(str(device) for device in placed.values()))
    print("placement (modules per device):", placement, flush=True)
    torch.cuda.empty_cache()
    (work / "models.yaml").write_text(
        f"""models:
  {spec.name}:
    task: text-classification
    model: {bert}
    dtype: float16
    device_map: auto
    max_memory: {{0: {MAX_MEMORY[0]}, 1: {MAX_MEMORY[1]}}}
    params: {{truncation: true, top_k: null}}
    max_batch_size: 64
"""
    )
    broker = os.environ.get("PIPEQ_BROKER_URL", "redis://127.0.0.1:6399/0")
    redis.Redis.from_url(broker).flushdb()
    env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_MODELS": str(work / "models.yaml"),
        "PIPEQ_METRICS_PORT": "9600",
        "PIPEQ_LOG_LEVEL": "WARNING",
    }
    worker = start_pipeq_worker(
        env,
        work / "worker.log",
        "--gpus",
        "0+1",
        "--procs-per-gpu",
        "2",
        "--name",
        "split-{proc}@%h",
        ready_count=2,
    )
    try:
        client = Client(Settings(broker_url=broker, models=work / "models.yaml"))
        requests = [JobRequest(model=spec.name, inputs=[text], params={}) for text in texts]
        docs = [doc for doc, _ in client.submit_many(requests)]
        got = [client.wait(doc.id, timeout_s=300) for doc in docs]
    finally:
        stop_process(worker)
    reference = pipeline("text-classification", model=str(bert), device=0, dtype=torch.float16)
    want = [reference(text, truncation=True, top_k=None) for text in texts]
    diffs, same_order = [], 0
    for doc, expected in zip(got, want, strict=True):
        assert doc.status == "succeeded", doc
        answer = doc.outputs[0]
        same_order += [a["label"] for a in answer] == [e["label"] for e in expected]
        scores = {e["label"]: e["score"] for e in expected}
        diffs += [abs(a["score"] - scores[a["label"]]) for a in answer]
    result = {
        "placement": placement,
        "max_memory": {str(k): v for k, v in MAX_MEMORY.items()},
        "texts": TEXTS,
        "label_order_agreement": same_order / TEXTS,
        "max_abs_score_diff": max(diffs),
    }
    print(json.dumps(result), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device-map.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
