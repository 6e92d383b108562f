"""GPU benchmark, one run, side by side (fits one 10-minute device run):

    source bench/gpu_setup.sh && python3 -m bench.gpu [--gpus 1|all] [--smoke]

1. the raw forward ceiling on GPU tensors (ViT-B/16 224 and BERT-base, fp16, random weights);
2. in-process `pipeline(list, batch_size=B)` at its best B;
3. a naive Celery task calling the pipeline once per job (bench/naive.py);
4. pipeq end to end (publish -> fetch -> decode -> batch -> forward -> result stored in Redis):
   ViT on 640x480 JPEG files by path, 1 and 64 images per job; BERT on texts of 10-300 words,
   one per job; plus p50/p99 latency at 10% and 80% of pipeq's peak, GPU utilisation, worker RSS,
   and the GPU-preprocessing parity bound. `--smoke` runs the same code tiny, on the CPU.
Writes bench/results/gpu.json (or $OUT/gpu.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
import torch
from celery import Celery
from PIL import Image

from bench.harness import (
    Record,
    markdown_table,
    naive_closed_loop,
    naive_open_load,
    percentiles,
    start_naive_worker,
    start_pipeq_worker,
    stop_process,
    versions,
    write_results,
)
from pipeq.config.celery import make_celery
from pipeq.config.queues import queue_name
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobRequest
from pipeq.producer.client import Client


@dataclass
class Scale:
    device: str
    dtype: torch.dtype
    images: int
    texts: int
    naive_jobs: int
    vit: dict[str, Any]
    bert: dict[str, Any]


FULL = Scale("cuda", torch.float16, 16384, 4096, 300, {}, {})
SMOKE = Scale(
    "cpu",
    torch.float32,
    64,
    64,
    10,
    {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
)


# ---- data and models -------------------------------------------------------------------------


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """Natural-looking 640x480 JPEGs: scikit-image sample photos, cropped and flipped."""
    try:
        from skimage import data as samples

        bases = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket()]
    except ImportError:  # the smoke run here has no scikit-image
        rng0 = np.random.default_rng(1)
        bases = [rng0.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(4)]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(count, 512)):
        base = Image.fromarray(bases[i % len(bases)])
        w, h = base.size
        x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        image = base.crop((x0, y0, x0 + w * 3 // 4, y0 + h * 3 // 4)).resize((640, 480))
        if i % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = folder / f"{i}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return [paths[i % len(paths)] for i in range(count)]


def make_texts(count: int, words: list[str]) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(10, 300)))) for _ in range(count)]


def build_vit(folder: Path, extra: dict[str, Any]) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(num_labels=1000, **extra)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def build_bert(folder: Path, extra: dict[str, Any]) -> tuple[Path, list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(20000)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), num_labels=3, **extra)
    BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, words


# ---- in-process baselines --------------------------------------------------------------------


def best_of(fn: Any, items: int, reps: int = 3) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return items / best


def vit_ceiling(path: Path, scale: Scale) -> tuple[float, int]:
    from transformers import ViTForImageClassification

    model = (
        ViTForImageClassification.from_pretrained(path, dtype=scale.dtype).to(scale.device).eval()
    )
    results = {}
    with torch.inference_mode():
        for batch in (128, 256):
            x = torch.randn(batch, 3, 224, 224, device=scale.device, dtype=scale.dtype)
            results[batch] = best_of(
                lambda x=x: [model(pixel_values=x).logits for _ in range(8)], 8 * batch
            )
    best = max(results, key=results.__getitem__)
    return results[best], best


def bert_ceiling(path: Path, texts: list[str], scale: Scale) -> tuple[float, int]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = (
        BertForSequenceClassification.from_pretrained(path, dtype=scale.dtype)
        .to(scale.device)
        .eval()
    )
    encoded = tok(texts, truncation=True)["input_ids"]
    order = sorted(range(len(texts)), key=lambda j: len(encoded[j]))
    results = {}
    with torch.inference_mode():
        for batch in (64, 256):
            tensors = []
            for i in range(0, len(order), batch):
                rows = [encoded[j] for j in order[i : i + batch]]
                longest = max(map(len, rows))
                ids = torch.zeros(len(rows), longest, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for k, row in enumerate(rows):
                    ids[k, : len(row)] = torch.tensor(row)
                    mask[k, : len(row)] = 1
                tensors.append((ids.to(scale.device), mask.to(scale.device)))
            results[batch] = best_of(
                lambda t=tensors: [model(input_ids=i, attention_mask=m).logits for i, m in t],
                len(texts),
            )
    best = max(results, key=results.__getitem__)
    return results[best], best


def pipeline_best(
    task: str, path: Path, items: list[Any], scale: Scale, batches: tuple[int, ...], **call: Any
) -> tuple[float, int]:
    from transformers import pipeline

    pipe = pipeline(task, model=str(path), device=scale.device, dtype=scale.dtype)
    results = {
        b: best_of(lambda b=b: pipe(items, batch_size=b, **call), len(items), reps=2)
        for b in batches
    }
    best = max(results, key=results.__getitem__)
    return results[best], best


def gpu_parity(path: Path, images: list[Path], scale: Scale) -> dict[str, float]:
    """GPU decode + fast processor + ranking vs the library's CPU path on the same JPEGs: the
    logits' bound, and the answers' top-1 labels and scores."""
    from pipeq.config.registry import ModelSpec
    from pipeq.worker.adapters import ImageClassification
    from pipeq.worker.gpu_images import GpuImagePipeline
    from pipeq.worker.pipelines import load_pipeline

    spec = ModelSpec(
        name="vit",
        task="image-classification",
        model=str(path),
        dtype="float16",
        device="cuda",
        gpu_preprocess=True,
    )
    gpu = GpuImagePipeline(spec, load_pipeline(spec))
    cpu_spec = spec.model_copy(update={"gpu_preprocess": False})
    cpu = ImageClassification(
        cpu_spec,
        load_pipeline(cpu_spec.model_copy(update={"pipeline_kwargs": {"use_fast": False}})),
    )
    call_g, call_c = gpu.call_params({}), cpu.call_params({})
    sample = images[:64]
    parts_g = [gpu.preprocess(p.read_bytes(), call_g)[0] for p in sample]
    parts_c = [cpu.preprocess(Image.open(p).convert("RGB"), call_c)[0] for p in sample]
    with torch.inference_mode():
        g = gpu.logits(gpu.stage_batch(gpu.collate([gpu.pack(parts_g)]))).float().cpu()
    want = cpu.forward(parts_c, call_c)
    c = torch.cat([o["logits"].float() for o in want])
    # The answers (top 5 ranked on the GPU vs the library's postprocess on the CPU's logits).
    got = [gpu.postprocess([o], call_g) for o in gpu.forward(parts_g, call_g)]
    expected = [cpu.postprocess([o], call_c) for o in want]
    return {
        "max_abs_logit_diff": float((g - c).abs().max()),
        "top1_agreement": float((g.argmax(-1) == c.argmax(-1)).float().mean()),
        "top1_label_agreement": sum(
            a[0]["label"] == b[0]["label"] for a, b in zip(got, expected, strict=True)
        )
        / len(got),
        "max_abs_top1_score_diff": max(
            abs(a[0]["score"] - b[0]["score"]) for a, b in zip(got, expected, strict=True)
        ),
    }


def vit_bytes_to_labels(path: Path, images: list[Path]) -> dict[str, float]:
    """JPEG bytes -> top-5 labels on the GPU, the forward process's own code without fronts or
    queues: in series (each batch of 256 staged, run and waited for: what is reachable one
    stage after another), and through its batcher (batch k+1 staged while batch k runs)."""
    from pipeq.config.registry import ModelSpec
    from pipeq.worker.batcher import WorkItem
    from pipeq.worker.block_stages import BlockStages
    from pipeq.worker.loading import load_staged

    spec = ModelSpec(
        name="vit",
        task="image-classification",
        model=str(path),
        dtype="float16",
        gpu_preprocess=True,
        max_batch_size=256,
        max_wait_ms=2,
    )
    staged, _ = load_staged(spec, Settings())
    call = staged.call_params({})
    files = [p.read_bytes() for p in images[:512]]
    count, block = 8192, 64
    packs = [
        staged.pack([{"jpeg": files[(i + j) % len(files)]} for j in range(block)])
        for i in range(0, count, block)
    ]
    blocks = BlockStages(staged)
    blocks.forward(blocks.stage(packs[:4], call), call)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(0, len(packs), 4):
        outputs = blocks.forward(blocks.stage(packs[i : i + 4], call), call)
        outputs[-1][2].synchronize()
    series = count / (time.perf_counter() - began)
    batcher = blocks.batcher(spec).start()
    rates = []
    for _ in range(2):
        items = [WorkItem(part=pack, group="g", call=call, rows=block) for pack in packs]
        began = time.perf_counter()
        batcher.submit(items)
        for item in items:
            _, _, ready = item.future.result(timeout=300)
        ready.synchronize()
        rates.append(count / (time.perf_counter() - began))
    batcher.stop()
    return {"series": series, "batcher": max(rates)}


# ---- through queues --------------------------------------------------------------------------


class Sampler:
    """GPU utilisation and CPU per process role sampled every 100 ms while a measurement runs,
    the worker's memory (PSS summed over its processes: shared pages counted once) every
    second; `extra` summarises the samples within the drain only."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, float, float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._redis = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # noqa: BLE001 - no NVML on the CPU smoke run
            handles = []
        pss = 0
        for tick in itertools.count():
            if self._stop.wait(0.1):
                return
            util = (
                float(np.mean([pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]))
                if handles
                else -1.0
            )
            cpu = {"front": 0.0, "forward": 0.0, "redis": 0.0}
            summed = 0
            for pid in self.pids:
                try:
                    tree = [psutil.Process(pid)]
                    tree += tree[0].children(recursive=True)
                    for proc in tree:
                        if tick % 10 == 0:
                            summed += proc.memory_full_info().pss
                        role = "forward" if "forward" in " ".join(proc.cmdline()) else "front"
                        cpu[role] += sum(proc.cpu_times()[:2])
                except psutil.NoSuchProcess:
                    pass
            pss = summed if tick % 10 == 0 else pss
            for proc in self._redis:
                with contextlib.suppress(psutil.NoSuchProcess):
                    cpu["redis"] += sum(proc.cpu_times()[:2])
            self.samples.append((time.time(), util, pss / 2**20, cpu))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def extra(self, drain: Drain) -> dict[str, Any]:
        inside = [s for s in self.samples if drain.first <= s[0] <= drain.last] or self.samples
        if not inside:
            return {}
        seconds = max(1e-9, inside[-1][0] - inside[0][0])
        return {
            "gpu_util_mean_pct": float(np.mean([s[1] for s in inside])),
            "worker_pss_max_mib": float(max(s[2] for s in inside)),
            "cpu_cores_busy": {
                role: round((inside[-1][3][role] - inside[0][3][role]) / seconds, 2)
                for role in inside[0][3]
            },
            "drain_s": round(drain.last - drain.first, 2),
            "redis_usec_per_job": drain.redis_usec_per_job,
        }


@dataclass
class Drain:
    items_per_s: float
    latencies: list[float]
    jobs: int
    first: float
    last: float
    redis_usec_per_job: dict[str, float]


METRICS_PORT = 9400
LATENCY_LOAD_S = 8.0
PROCS_METRICS_PORT = 9500
OUT_DIR = Path(os.environ.get("OUT", "bench/results"))


def profiled(
    pid: int, name: str, enabled: bool, seconds: int = 6
) -> subprocess.Popen[bytes] | None:
    """py-spy, sampling whichever thread holds the GIL, while a measurement runs."""
    if not enabled:
        return None
    command = [
        "py-spy",
        "record",
        "-p",
        str(pid),
        "-d",
        str(seconds),
        "-r",
        "200",
        "--gil",
        "--subprocesses",
    ]
    command += ["-f", "raw", "-o", str(OUT_DIR / f"prof-{name}.txt")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _append_profile(spies: list[Any], pid: int, name: str, args: Any) -> None:
    spies.append(profiled(pid, name, args.profile, 4))
    if not args.profile:
        return
    # The forward process's threads, waiting ones too: where a batch's time goes.
    for child in psutil.Process(pid).children(recursive=True):
        if "forward" in " ".join(child.cmdline()):
            command = ["py-spy", "record", "-p", str(child.pid), "-d", "4", "-r", "100", "--idle"]
            command += ["-f", "raw", "-o", str(OUT_DIR / f"idle-{name}.txt")]
            spies.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )


def prefilled_run(
    client: Client,
    control: Celery,
    workers: list[str],
    model: str,
    inputs: list[Any],
    per_job: int,
    params: dict[str, Any],
    on_start: Callable[[], Any] | None = None,
) -> Drain:
    """Fill the queue while the workers are paused, resume them, and time the drain from the
    workers' own clocks: items / (last finished - first started); Redis's time per job by
    command over the drain (INFO commandstats)."""
    queue = queue_name(model, "interactive")
    control.control.cancel_consumer(queue, destination=workers, reply=True)
    requests = [
        JobRequest(model=model, inputs=inputs[i : i + per_job], params=params)
        for i in range(0, len(inputs), per_job)
    ]
    docs = []
    for i in range(0, len(requests), 1000):
        docs += [doc for doc, _ in client.submit_many(requests[i : i + 1000])]
    broker = redis.Redis.from_url(client.settings.broker_url or "")
    before = broker.info("commandstats")
    control.control.add_consumer(queue, destination=workers, reply=True)
    if on_start is not None:
        on_start()  # a profiler, say: from the drain's start
    finished = [client.wait(doc.id, timeout_s=600) for doc in docs]
    after = broker.info("commandstats")
    usec = {
        name.removeprefix("cmdstat_"): (stats["usec"] - before.get(name, {}).get("usec", 0))
        / len(docs)
        for name, stats in after.items()
    }
    top = dict(sorted(usec.items(), key=lambda kv: -kv[1])[:10])
    print("jobs per front:", dict(Counter(d.worker for d in finished)), flush=True)
    bad = [
        d for d in finished if d.status != "succeeded" or any(e is not None for e in d.errors or [])
    ]
    assert not bad, bad[0]
    first = min(d.timings["started_at"] for d in finished)
    last = max(d.timings["finished_at"] for d in finished)
    return Drain(
        len(inputs) / (last - first),
        [d.timings["finished_at"] - d.timings["started_at"] for d in finished],
        len(docs),
        first,
        last,
        {name: round(value, 1) for name, value in top.items()},
    )


def paced_latency(
    client: Client, model: str, inputs: list[Any], rate_per_s: float, params: dict[str, Any]
) -> tuple[float, float]:
    """Open-loop load at `rate_per_s` jobs/s, one input per job, submitted every 10 ms in the
    tick's share (one round trip each, so one client keeps up with thousands a second): p50/p99
    of submit -> stored, as the job's own timings say."""
    started = time.time()
    docs = []
    sent = 0
    while sent < len(inputs):
        due = min(len(inputs), int((time.time() - started) * rate_per_s) + 1)
        if due > sent:
            requests = [
                JobRequest(model=model, inputs=[item], params=params) for item in inputs[sent:due]
            ]
            docs += [doc for doc, _ in client.submit_many(requests)]
            sent = due
        else:
            time.sleep(0.01)
    done = [client.wait(doc.id, timeout_s=300) for doc in docs]
    return percentiles([d.timings["finished_at"] - d.timings["submitted_at"] for d in done])


def registry_yaml(vit: Path, bert: Path, scale: Scale) -> str:
    dtype = "float16" if scale.device == "cuda" else "float32"
    gpu = "true" if scale.device == "cuda" else "false"
    return f"""models:
  vit:
    task: image-classification
    model: {vit}
    dtype: {dtype}
    gpu_preprocess: {gpu}
    max_batch_size: 256
    max_wait_ms: 2
  bert:
    task: text-classification
    model: {bert}
    dtype: {dtype}
    params: {{truncation: true}}
    max_batch_size: 256
    max_wait_ms: 2
"""


def run_baselines(
    scale: Scale,
    paths: dict[str, Path],
    images: list[Path],
    texts: list[str],
    broker: str,
    record: Any,
    meta: dict[str, Any],
    naive: bool,
    models: set[str],
) -> None:
    """Ceilings, in-process pipeline(), GPU-preprocessing parity and the naive Celery task, for
    `models` (vit, bert): each run holds the baselines of the rows it measures."""
    vit, bert, work = paths["vit"], paths["bert"], paths["work"]
    if "vit" in models:
        rate, batch = vit_ceiling(vit, scale)
        record("vit raw forward, GPU tensors (ceiling)", rate, batch)
        rate, batch = pipeline_best(
            "image-classification", vit, [str(p) for p in images[:512]], scale, (64, 128)
        )
        record("vit in-process pipeline(paths)", rate, batch)
    if "bert" in models:
        rate, batch = bert_ceiling(bert, texts[:4096], scale)
        record("bert raw forward, length-sorted batches (ceiling)", rate, batch)
        rate, batch = pipeline_best(
            "text-classification", bert, texts[:4096], scale, (64, 256), truncation=True
        )
        record("bert in-process pipeline(texts)", rate, batch)
    if scale.device == "cuda" and "vit" in models:
        meta["gpu_preprocess_parity"] = gpu_parity(vit, images, scale)
        print("parity", meta["gpu_preprocess_parity"], flush=True)
        reachable = vit_bytes_to_labels(vit, images)
        record("vit JPEG bytes -> labels in series, forward process code", reachable["series"], 256)
        record("vit JPEG bytes -> labels, forward process batcher alone", reachable["batcher"], 256)
        torch.cuda.empty_cache()
    if not naive:
        return
    naive_db = broker.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(naive_db).flushdb()
    for task, path, items, label in (
        ("image-classification", vit, [str(p) for p in images], "vit"),
        ("text-classification", bert, texts, "bert"),
    ):
        env = {
            "NAIVE_BROKER": naive_db,
            "NAIVE_TASK": task,
            "NAIVE_MODEL": str(path),
            "NAIVE_DEVICE": scale.device,
        }
        naive = start_naive_worker(env, work / f"naive-{label}.log")
        try:
            app = Celery("naive", broker=naive_db, backend=naive_db)
            app.conf.update(task_serializer="json", accept_content=["json"])
            naive_closed_loop(app, items[:5])
            rate, latencies = naive_open_load(app, items[: scale.naive_jobs])
            record(f"{label} naive celery task, one per job", rate, 1, percentiles(latencies))
        finally:
            stop_process(naive)


def run_single_process(
    args: Any,
    client: Client,
    control: Celery,
    env: dict[str, str],
    work: Path,
    refs: list[Any],
    one_per_job: list[Any],
    texts: list[str],
    record: Any,
    gpus: str,
    host: str,
) -> None:
    """pipeq with one worker process: ViT 64 and 1 per job, latency at 10% and 80% of peak, BERT."""
    worker = start_pipeq_worker(
        env, work / "pipeq.log", "--gpus", gpus, "--concurrency", "256", "--name", "bench@%h"
    )
    hostname = f"bench@{host}"
    try:
        client.wait(client.submit("vit", refs[:64]), 120)  # warm the larger batch shapes
        spy = profiled(worker.pid, "vit64", args.profile)
        with Sampler([worker.pid]) as sampler:
            drain = prefilled_run(client, control, [hostname], "vit", refs, 64, {})
        record(
            "vit pipeq end to end, 64 images per job",
            drain.items_per_s,
            64,
            percentiles(drain.latencies),
            jobs=drain.jobs,
            **sampler.extra(drain),
        )
        if spy:
            spy.wait()
        with Sampler([worker.pid]) as sampler:
            drain = prefilled_run(client, control, [hostname], "vit", one_per_job, 1, {})
        vit_peak = drain.items_per_s
        record(
            "vit pipeq end to end, 1 image per job, 1 process",
            drain.items_per_s,
            1,
            percentiles(drain.latencies),
            jobs=drain.jobs,
            **sampler.extra(drain),
        )
        for share in (0.1, 0.8):
            jobs_n = max(20, int(vit_peak * share * 4))
            lat2 = paced_latency(client, "vit", refs[:jobs_n], vit_peak * share, {})
            record(
                f"vit pipeq latency at {int(share * 100)}% of 1-per-job peak ({vit_peak * share:.0f} jobs/s)",
                vit_peak * share,
                1,
                lat2,
            )
        spy = profiled(worker.pid, "bert1", args.profile)
        with Sampler([worker.pid]) as sampler:
            drain = prefilled_run(client, control, [hostname], "bert", texts, 1, {})
        record(
            "bert pipeq end to end, 1 text per job, 1 process",
            drain.items_per_s,
            1,
            percentiles(drain.latencies),
            jobs=drain.jobs,
            **sampler.extra(drain),
        )
        if spy:
            spy.wait()
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
            .read()
            .decode()
        )
        (OUT_DIR / "worker-metrics.txt").write_text(metrics)
    finally:
        stop_process(worker)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU: checks the code paths"
    )
    parser.add_argument(
        "--redis", default=os.environ.get("PIPEQ_BROKER_URL", "redis://127.0.0.1:6399/0")
    )
    parser.add_argument(
        "--procs-per-gpu", type=int, default=8, help="for the one-input-per-job runs"
    )
    parser.add_argument(
        "--pipeq-only", action="store_true", help="skip the baselines (profiling runs)"
    )
    parser.add_argument(
        "--front-concurrency",
        type=int,
        default=128,
        help="jobs in flight per front (N-process run)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the worker; dumps land in $OUT"
    )
    parser.add_argument("--texts", type=int, help="texts for the BERT rows (default: the scale's)")
    parser.add_argument(
        "--image-repeat",
        type=int,
        default=1,
        help="the images repeated this many times in each N-process ViT drain",
    )
    parser.add_argument(
        "--text-repeat",
        type=int,
        default=1,
        help="the texts repeated this many times in each N-process BERT drain",
    )
    parser.add_argument(
        "--drains", type=int, default=3, help="drains per N-process row (the median is reported)"
    )
    parser.add_argument(
        "--rows",
        default="vit64,vit1,bert1",
        help="the N-process rows to run (vit64, vit1, bert1), with their models' baselines; vit1 "
        "brings the latency rows",
    )
    parser.add_argument(
        "--procs-only",
        action="store_true",
        help="ceilings, in-process, then only the N-process worker",
    )
    args = parser.parse_args()
    scale = SMOKE if args.smoke else FULL
    rows = set(args.rows.split(","))
    if args.texts:
        scale = dataclasses.replace(scale, texts=args.texts)
    out = OUT_DIR / "gpu.json"
    work = Path(tempfile.mkdtemp(prefix="pipeq-gpu-"))
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    records: list[Record] = []
    began = time.perf_counter()
    meta: dict[str, Any] = {
        "versions": versions(),
        "device": device_name,
        "cpus": os.cpu_count(),
        "settings": {
            "procs_per_gpu": args.procs_per_gpu,
            "front_concurrency": args.front_concurrency,
            "image_repeat": args.image_repeat,
            "text_repeat": args.text_repeat,
            "drains": args.drains,
            "texts": scale.texts,
            "task_events": Settings().task_events,
        },
    }

    def record(
        name: str,
        items_per_s: float,
        batch: int | None = None,
        lat: tuple[float, float] | None = None,
        **extra: Any,
    ) -> None:
        r = Record(
            name,
            items_per_s,
            batch,
            lat[0] if lat else None,
            lat[1] if lat else None,
            device=device_name,
            extra=extra,
        )
        records.append(r)
        print(f"[{time.perf_counter() - began:6.1f} s]", json.dumps(r.__dict__), flush=True)
        write_results(out, records, meta)  # a run cut short still leaves what it measured

    images = make_jpegs(work / "images", scale.images)
    vit = build_vit(work / "vit", scale.vit)
    bert, words = build_bert(work / "bert", scale.bert)
    texts = make_texts(scale.texts, words)
    broker = args.redis
    redis.Redis.from_url(broker).flushdb()
    if not args.pipeq_only:
        run_baselines(
            scale,
            {"vit": vit, "bert": bert, "work": work},
            images,
            texts,
            broker,
            record,
            meta,
            naive=not args.procs_only,
            models={row.rstrip("0123456789") for row in rows},
        )

    (work / "models.yaml").write_text(registry_yaml(vit, bert, scale))
    env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_MODELS": str(work / "models.yaml"),
        "PIPEQ_MEDIA_ROOTS": str(work / "images"),
        "PIPEQ_METRICS_PORT": str(METRICS_PORT),
        "PIPEQ_LOG_LEVEL": "WARNING",
    }
    settings = Settings(broker_url=broker, models=work / "models.yaml")
    client = Client(settings)
    control = make_celery(settings)
    refs = [{"path": str(p)} for p in images]
    one_per_job = refs[: scale.images // 2]
    gpus = "auto" if scale.device == "cuda" else "cpu"
    host = os.uname().nodename

    if not args.procs_only:
        run_single_process(
            args, client, control, env, work, refs, one_per_job, texts, record, gpus, host
        )

    if args.procs_per_gpu > 1:
        names = [f"benchp-{i}@{host}" for i in range(args.procs_per_gpu)]
        group = start_pipeq_worker(
            {**env, "PIPEQ_METRICS_PORT": str(PROCS_METRICS_PORT)},
            work / "pipeq-procs.log",
            "--gpus",
            gpus,
            "--concurrency",
            str(args.front_concurrency),
            "--procs-per-gpu",
            str(args.procs_per_gpu),
            "--name",
            "benchp-{proc}@%h",
            ready_count=len(names),
        )
        try:
            client.wait(client.submit("vit", refs[:64]), 120)
            # The files again and again (page cache warm, as every row here), so that each drain
            # lasts long enough to leave the start's transient behind.
            runs = [
                (model, items, per_job, label)
                for row, model, items, per_job, label in (
                    ("vit64", "vit", refs * args.image_repeat, 64, "64 images"),
                    ("vit1", "vit", refs * args.image_repeat, 1, "1 image"),
                    ("bert1", "bert", texts * args.text_repeat, 1, "1 text"),
                )
                if row in rows
            ]
            peaks = {}
            for model, items, per_job, label in runs:
                drains = []
                for attempt in range(args.drains):
                    spies: list[Any] = []
                    profile = partial(
                        _append_profile, spies, group.pid, f"procs-{model}-{per_job}", args
                    )
                    with Sampler([group.pid]) as sampler:
                        drain = prefilled_run(
                            client,
                            control,
                            names,
                            model,
                            items,
                            per_job,
                            {},
                            profile if attempt == 0 else None,
                        )
                    drains.append((drain, sampler.extra(drain)))
                    for spy in spies:
                        if spy:
                            spy.wait()
                rates = [drain.items_per_s for drain, _ in drains]
                drain, extra = sorted(drains, key=lambda d: d[0].items_per_s)[len(drains) // 2]
                peaks[(model, per_job)] = drain.items_per_s
                name = f"{model} pipeq end to end, {label} per job, {args.procs_per_gpu} processes per GPU"
                record(
                    name,
                    drain.items_per_s,
                    per_job,
                    percentiles(drain.latencies),
                    jobs=drain.jobs,
                    drains_items_per_s=[round(rate, 1) for rate in rates],
                    **extra,
                )
            for share in (0.1, 0.8) if ("vit", 1) in peaks else ():
                rate = peaks[("vit", 1)] * share
                count = int(rate * LATENCY_LOAD_S)
                latency = paced_latency(client, "vit", (refs * 64)[:count], rate, {})
                record(
                    f"vit pipeq latency, submit -> stored, at {int(share * 100)}% of the "
                    f"1-per-job peak ({rate:.0f} jobs/s), {args.procs_per_gpu} processes per GPU",
                    rate,
                    1,
                    latency,
                )
            fronts = [
                urllib.request.urlopen(f"http://127.0.0.1:{PROCS_METRICS_PORT + i}/metrics")
                .read()
                .decode()
                for i in range(len(names))
            ]
            batches = [
                line
                for text in fronts
                for line in text.splitlines()
                if any(key in line for key in ("batch_size", "stage_seconds", "batch_wait"))
            ]
            (OUT_DIR / "procs-batch-sizes.txt").write_text("\n".join(batches))
        finally:
            stop_process(group)

    write_results(out, records, meta)
    print()
    print(markdown_table(records))
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
