"""Loaded pipelines, driven stage by stage: preprocess per input, one forward per batch,
postprocess per input. Answers stay the library's because these are the library's own stages;
batching uses the library's own collate and un-batching (`pad_collate_fn`, `PipelineIterator`).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.pipelines.base import ChunkPipeline, Pipeline, pad_collate_fn
from transformers.pipelines.pt_utils import PipelineIterator

from pipeq.config.errors import ConfigError
from pipeq.config.params import check_params
from pipeq.config.registry import ModelSpec
from pipeq.config.settings import Settings
from pipeq.worker.media import MediaLoader
from pipeq.worker.pipeline_outputs import _same, to_json

ModelInputs = dict[str, Any]

# Padding of keys other than input_ids in a batch of id lists, as `pad_collate_fn` pads them.
_LIST_PADDING = {"p_mask": 1, "special_tokens_mask": 1}


@dataclass(frozen=True)
class CallParams:
    """One job's call params, split the way `Pipeline.__call__` splits them."""

    preprocess: dict[str, Any]
    forward: dict[str, Any]
    postprocess: dict[str, Any]
    given: dict[str, Any]
    key: str  # jobs whose items may share a forward pass have equal keys


def resolve_device(spec: ModelSpec) -> str | None:
    if spec.device_map:
        return None
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


def load_pipeline(spec: ModelSpec, weights: bool = True) -> Pipeline:
    """The model's pipeline. Without `weights`, the model is moved to the meta device once
    loaded: a front's copy, for its tokenizer, processors and config (preprocess and
    postprocess), while the forward process holds the weights. (`device_map="meta"` would skip
    reading the weights, but transformers before 5.2x then moves the empty model and fails.)"""
    model_kwargs = {"max_memory": spec.max_memory} if spec.max_memory and weights else None
    placement: dict[str, Any] = {"device": "meta"}
    if weights:
        placement = {"device": resolve_device(spec), "device_map": spec.device_map}
    try:
        pipe = transformers.pipeline(
            spec.task,
            model=spec.model,
            revision=spec.revision,
            dtype=spec.dtype,
            model_kwargs=model_kwargs,
            **placement,
            **spec.pipeline_kwargs,
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"model {spec.name!r} ({spec.model}) failed to load: {exc}") from exc
    if not weights:
        pipe.device = torch.device("cpu")  # where preprocess makes its tensors
    return pipe


class StagedPipeline:
    """One preloaded pipeline exposed as the stages the batcher calls: the generic stages of
    every task; a task that needs more has its adapter (worker/adapters.py)."""

    # Inputs by path or inline bytes are prepared on the intake thread, not a prefetch thread:
    # only where preparing one is reading it (the GPU image pipeline's JPEGs), not decoding it.
    reads_inline = False
    # Where a text's preprocess is exactly one tokenizer call on it: a window of texts is
    # tokenized in one call (a fast tokenizer encodes a list in parallel, in Rust).
    window_tokenized = False

    def __init__(
        self,
        spec: ModelSpec,
        pipe: Pipeline,
        ocr_timeout_s: float = Settings.model_fields["ocr_timeout_s"].default,
        ocr_concurrency: int | None = None,
    ) -> None:
        self.spec = spec
        self.pipe = pipe
        self.chunked = isinstance(pipe, ChunkPipeline)
        self.ocr_timeout_s = ocr_timeout_s
        self.ocr_concurrency = ocr_concurrency or os.cpu_count() or 1
        processor = (
            pipe.feature_extractor if pipe.feature_extractor is not None else pipe.image_processor
        )
        self._collate = pad_collate_fn(pipe.tokenizer, processor)
        self.tokenizes_windows = self.window_tokenized and bool(
            getattr(pipe.tokenizer, "is_fast", False)
        )
        self._postprocess: Any = pipe.postprocess

    def call_params(self, params: dict[str, Any]) -> CallParams:
        """Merge the model's default params with the job's and split them per stage. Raises
        InvalidParams for job params outside the task's allow-list, else whatever the pipeline
        raises for params it does not take."""
        check_params(self.spec.task, params, self.spec.params)
        given = {**self.spec.params, **params}
        pre, fwd, post = self.pipe._sanitize_parameters(**given)
        key = hashlib.sha1(json.dumps(given, sort_keys=True, default=str).encode()).hexdigest()
        return CallParams(
            preprocess={**self.pipe._preprocess_params, **pre},
            forward={**self.pipe._forward_params, **fwd},
            postprocess={**self.pipe._postprocess_params, **post},
            given=given,
            key=key,
        )

    def load(self, item: Any, media: MediaLoader) -> Any:
        """One job input -> what this pipeline's preprocess takes (fetched and decoded)."""
        return media.load(item, self.spec.modality)

    def preprocess(self, item: Any, call: CallParams) -> list[ModelInputs]:
        """One input -> the model inputs the pipeline would forward (several for chunked tasks)."""
        if self.chunked:
            return list(self.iter_parts(item, call))
        return [self.pipe.preprocess(item, **call.preprocess)]

    def preprocess_texts(self, texts: list[str], call: CallParams) -> list[ModelInputs]:
        """`preprocess` of each text, in one tokenizer call (only where `tokenizes_windows`):
        the same ids as one call per text, since nothing is padded. Each text's inputs are
        int64 arrays, not tensors: they cross to the forward process as raw bytes, and `forward`
        pads a batch of them into one tensor per key (`_pad_lists`)."""
        assert self.pipe.tokenizer is not None  # a window-tokenized task has one
        encoded = self.pipe.tokenizer(texts, **call.preprocess)
        keys = list(encoded.keys())
        return [
            {key: array("q", encoded[key][index]) for key in keys} for index in range(len(texts))
        ]

    def pack(self, parts: list[ModelInputs]) -> Any:
        """What a block of these parts carries to the forward process: window-tokenized texts as
        one int64 array per key with their lengths (padded there in one copy per key), other
        parts as they are."""
        if not isinstance(parts[0].get("input_ids"), array):
            return parts
        joined = {}
        for key in parts[0]:
            ids = array("q")
            for part in parts:
                ids.extend(part[key])
            joined[key] = ids
        return {"lengths": array("q", [len(part["input_ids"]) for part in parts]), "ids": joined}

    @staticmethod
    def pack_rows(pack: Any) -> int:
        """Parts in a pack: a packed one lists each part's length (`pack` here, and the GPU image
        pipeline's)."""
        return len(pack["lengths"]) if isinstance(pack, dict) else len(pack)

    def collate(self, packs: list[Any]) -> Any:
        """One model batch from the packs of several blocks: what `pad_collate_fn` makes of
        their parts (a single part goes as it is, as pipeline() sends it)."""
        if isinstance(packs[0], dict):
            return self._pad_joined(packs)
        parts = [part for pack in packs for part in pack]
        return parts[0] if len(parts) == 1 else self._collate(parts)

    def _pad_joined(self, packs: list[dict[str, Any]]) -> ModelInputs:
        """What `pad_collate_fn` makes of these texts' one-text tensors, built from their joined
        id arrays in one scatter per key: the same values, padding and side. A batch of several
        is padded to a multiple of 8 columns (tensor cores' tile; pads are masked out)."""
        tokenizer = self.pipe.tokenizer
        assert tokenizer is not None  # only window-tokenized texts are joined
        lengths = np.concatenate([np.frombuffer(pack["lengths"], dtype=np.int64) for pack in packs])
        longest = int(lengths.max())
        if len(lengths) > 1:
            longest = -(-longest // 8) * 8
        columns = np.arange(longest)
        if tokenizer.padding_side == "left":
            kept = columns >= (longest - lengths)[:, None]
        else:
            kept = columns < lengths[:, None]
        batch = {}
        for key in packs[0]["ids"]:
            value = tokenizer.pad_token_id if key == "input_ids" else _LIST_PADDING.get(key, 0)
            if value is None and longest * len(lengths) != lengths.sum():
                raise ValueError("a tokenizer without a pad token cannot batch texts")
            padded = np.full((len(lengths), longest), value or 0, dtype=np.int64)
            padded[kept] = np.concatenate(
                [np.frombuffer(pack["ids"][key], dtype=np.int64) for pack in packs]
            )
            batch[key] = torch.from_numpy(padded)
        return batch

    def iter_parts(self, item: Any, call: CallParams) -> Iterator[ModelInputs]:
        """`preprocess`, made as it is consumed: a long input's chunks need not all be held."""
        if not self.chunked:
            return iter(self.preprocess(item, call))
        # A ChunkPipeline's preprocess is a generator of parts (typed as the plain pipeline's).
        return cast(Iterator[ModelInputs], self.pipe.preprocess(item, **call.preprocess))

    def stage_batch(self, batch: Any) -> Any:
        """A collated batch made ready for `forward_batch`, a batch ahead of it (the GPU image
        pipeline decodes and resizes there); as it is here."""
        return batch

    def forward_batch(self, batch: Any, call: CallParams) -> Any:
        """The model's outputs for a staged batch, on the CPU (one forward pass)."""
        return self.pipe.forward(batch, **call.forward)

    def unbatch(
        self, output: Any, parts: list[ModelInputs], call: CallParams, batched: bool
    ) -> list[Any]:
        """Each part's own output, as `pipeline(batch_size=n)` un-batches them; `batched`: the
        output holds rows of a batch (else it is one part's, as `pipeline(input)` makes it)."""
        if batched:
            # PipelineIterator does not un-batch at a batch size of 1; at 2 it un-batches the
            # rows there are (it takes the batch size from the outputs).
            outputs = list(PipelineIterator([output], _same, {}, max(2, len(parts))))
        else:
            outputs = [output]
        return outputs

    def forward(self, parts: list[ModelInputs], call: CallParams) -> list[Any]:
        """One forward pass over `parts` (collated and padded as pipeline(batch_size=n) would)."""
        output = self.forward_batch(self.stage_batch(self.collate([self.pack(parts)])), call)
        return self.unbatch(output, parts, call, batched=len(parts) > 1)

    def group_key(self, part: ModelInputs, call: CallParams) -> tuple[Any, ...]:
        """Parts with equal keys may share a forward pass."""
        return (call.key, tuple(sorted(part)))

    def postprocess(self, outputs: list[Any], call: CallParams) -> Any:
        model_output = outputs if self.chunked else outputs[0]
        return to_json(self._postprocess(model_output, **call.postprocess))

    @staticmethod
    def part_length(part: ModelInputs) -> int:
        """Padding cost of a part: sequence length for text, 0 where shapes are fixed."""
        ids = part.get("input_ids")
        if isinstance(ids, array):
            return len(ids)
        return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0

    def warm_input(self) -> tuple[Any, dict[str, Any]]:
        """A small input of the model's modality, and params it needs to run at all."""
        image = Image.new("RGB", (224, 224), (127, 127, 127))
        if self.spec.modality == "image":
            return image, {}
        if self.spec.modality == "audio":
            return {"raw": np.zeros(16_000, dtype=np.float32), "sampling_rate": 16_000}, {}
        if self.spec.modality == "document":
            words = [("warm", (0, 0, 10, 10))]
            return {"image": image, "question": "what?", "word_boxes": words}, {}
        return "warm up", {}

    def run_one(self, item: Any, params: dict[str, Any]) -> Any:
        """The whole path for one input without batching (warm-up; tests' reference)."""
        call = self.call_params(params)
        parts = self.preprocess(item, call)
        return self.postprocess([self.forward([part], call)[0] for part in parts], call)
