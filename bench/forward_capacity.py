"""The forward process's own capacity for ViT on JPEG bytes, without fronts or queues.

    source bench/gpu_setup.sh && python3 -m bench.forward_capacity

Blocks of 64 JPEGs (as fronts pack them) go straight into the forward process's batcher
(`forward_blocks` of the GPU image pipeline, which launches batch k+1 before batch k is done),
and the same batches in series, each waited for, with its stages timed. Prints JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu import build_vit, make_jpegs
from config.registry import ModelSpec
from config.settings import Settings
from worker.batcher import Batcher, WorkItem
from worker.forward_server import forward_blocks
from worker.pipelines import load_staged

IMAGES = 8192
BLOCK = 64


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pipeq-capacity-"))
    paths = make_jpegs(work / "images", 512)
    vit = build_vit(work / "vit", {})
    spec = ModelSpec(
        name="vit",
        task="image-classification",
        model=str(vit),
        dtype="float16",
        gpu_preprocess=True,
        max_batch_size=256,
        max_wait_ms=2,
    )
    staged, _ = load_staged(spec, Settings())
    call = staged.call_params({})
    jpegs = [p.read_bytes() for p in paths]
    packs = [
        staged.pack([{"jpeg": jpegs[(i + j) % len(jpegs)]} for j in range(BLOCK)])
        for i in range(0, IMAGES, BLOCK)
    ]
    out: dict[str, float] = {}
    stage, forward = forward_blocks(staged)
    for _ in range(3):
        forward(stage(packs[:4], call), call)
    torch.cuda.synchronize()

    # In series: stage by stage, synchronised, batches of 256.
    stages = {"collate": 0.0, "decode+process+model": 0.0, "rank": 0.0}
    began = time.perf_counter()
    for i in range(0, len(packs), 4):
        t0 = time.perf_counter()
        batch = staged.collate(packs[i : i + 4])
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = staged.logits(staged.stage_batch(batch))
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            staged._postprocess.rank_batch(logits, **call.postprocess)
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        stages["collate"] += t1 - t0
        stages["decode+process+model"] += t2 - t1
        stages["rank"] += t3 - t2
    out["series_img_s"] = IMAGES / (time.perf_counter() - began)
    out.update({f"series_ms_per_batch_{k}": v * 1000 / (len(packs) / 4) for k, v in stages.items()})

    # The research probe's way, for scale: decode, one resize of the stacked batch, normalize.
    from torchvision.io import ImageReadMode, decode_jpeg

    processor = staged.pipe.image_processor
    mean = torch.tensor(processor.image_mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device="cuda").view(1, 3, 1, 1)
    began = time.perf_counter()
    for i in range(0, len(packs), 4):
        batch = staged.collate(packs[i : i + 4])
        with torch.inference_mode():
            images = decode_jpeg(
                [part["jpeg"] for part in batch], mode=ImageReadMode.RGB, device="cuda"
            )
            x = torch.nn.functional.interpolate(
                torch.stack(images).float(), size=(224, 224), mode="bilinear", antialias=True
            )
            x = ((x / 255.0 - mean) / std).half()
            logits = staged.pipe.model(pixel_values=x).logits
            staged._postprocess.rank_batch(logits, **call.postprocess)["labels"].cpu()
    out["probe_style_series_img_s"] = IMAGES / (time.perf_counter() - began)

    batcher = Batcher("vit", forward, stage=stage, max_batch_size=256, max_wait_ms=2).start()
    for _ in range(2):
        items = [WorkItem(part=p, group="g", call=call, rows=BLOCK) for p in packs]
        began = time.perf_counter()
        batcher.submit(items)
        for item in items:
            _, _, ready = item.future.result(timeout=300)
        ready.synchronize()
        out["batcher_img_s"] = IMAGES / (time.perf_counter() - began)
    batcher.stop()
    print(json.dumps({k: round(v, 1) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
