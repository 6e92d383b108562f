"""The forward process's two stages over blocks of parts: staging (collate, and on the GPU image
path the decode, on a side stream) a batch ahead of the forward pass that launches it."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from pipeq.config.registry import ModelSpec
from pipeq.worker.batcher import Batcher, BatchHooks
from pipeq.worker.pipeline_outputs import batch_rows
from pipeq.worker.pipelines import CallParams, StagedPipeline

# Batches a model's forward thread launches ahead of the GPU: it never waits for batch k before
# launching k+1, and waits for batch k before launching k+2. The sender thread waits for each
# batch's outputs before sending them. (Two batcher threads, each staging, running and waiting
# for its own batches, ran 6% slower than one: bench/NOTES.md, session 6.)
BATCHES_AHEAD = 2


class BlockStages:
    """The batcher's stages for a list of blocks' packs. `stage`: one batch, collated and staged
    (on a side stream of the GPU: batch k+1's JPEG decode and resize run beside batch k's forward
    pass). `forward`: its outputs cut per block, each with whether it is rows of a batch (a lone
    part's output has no batch to un-batch) and the CUDA event after which it is filled in (None
    on the CPU). `has_room`: whether the GPU runs at most one batch, so that a batch short of full
    is worth staging now (else it waits and grows while the GPU is busy)."""

    def __init__(self, staged: StagedPipeline) -> None:
        self._staged = staged
        # A model placed over several GPUs (device_map) keeps the default streams of each.
        self._on_gpu = staged.pipe.device.type == "cuda" and not staged.spec.device_map
        self._side = torch.cuda.Stream(staged.pipe.device) if self._on_gpu else None
        self._launched: deque[torch.cuda.Event] = deque()

    def stage(self, packs: list[Any], call: CallParams) -> tuple[list[int], Any, Any]:
        rows = [self._staged.pack_rows(pack) for pack in packs]
        batch = self._staged.collate(packs)
        if self._side is None:
            return rows, self._staged.stage_batch(batch), None
        with torch.cuda.stream(self._side):
            batch = self._staged.stage_batch(batch)
            staged_at = torch.cuda.Event()
            staged_at.record()
        return rows, batch, staged_at

    def forward(self, staged_batch: tuple[list[int], Any, Any], call: CallParams) -> list[Any]:
        rows, batch, staged_at = staged_batch
        ready = None
        if staged_at is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(staged_at)
            _used_on(batch, stream)
        output = self._staged.forward_batch(batch, call)
        if self._on_gpu:
            ready = torch.cuda.Event()
            ready.record()
            self._launched.append(ready)
            if len(self._launched) > BATCHES_AHEAD:
                self._launched.popleft().synchronize()
        batched = sum(rows) > 1
        if len(rows) == 1:
            return [(output, batched, ready)]
        outputs, start = [], 0
        for count in rows:
            outputs.append((batch_rows(output, start, start + count), batched, ready))
            start += count
        return outputs

    def has_room(self) -> bool:
        return sum(not event.query() for event in list(self._launched)) <= 1

    def batcher(self, spec: ModelSpec, hooks: BatchHooks | None = None) -> Batcher:
        """The model's batcher over these stages."""
        return Batcher(
            spec.name,
            self.forward,
            stage=self.stage,
            has_room=self.has_room,
            max_batch_size=spec.max_batch_size,
            max_wait_ms=spec.max_wait_ms,
            hooks=hooks,
        )


def _used_on(value: Any, stream: torch.cuda.Stream) -> None:
    """Tell the allocator that the staged batch's GPU tensors, made on the side stream, are read
    on `stream`: their memory is not reused before this stream is done with them."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, dict):
        for each in value.values():
            _used_on(each, stream)
    elif isinstance(value, list | tuple):
        for each in value:
            _used_on(each, stream)
