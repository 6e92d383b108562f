"""Loading a model's staged pipeline: the adapter of its task, its weights or only its front
half, warmed on a small input."""

from __future__ import annotations

import logging
import time

from pipeq.config.errors import ConfigError
from pipeq.config.registry import ModelSpec
from pipeq.config.settings import Settings
from pipeq.worker.adapters import (
    DocumentQuestionAnswering,
    FeatureExtraction,
    ImageClassification,
    TextClassification,
    ZeroShotClassification,
)
from pipeq.worker.gpu_images import GpuImagePipeline
from pipeq.worker.pipelines import StagedPipeline, load_pipeline

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[StagedPipeline]] = {
    "text-classification": TextClassification,
    "feature-extraction": FeatureExtraction,
    "zero-shot-classification": ZeroShotClassification,
    "image-classification": ImageClassification,
    "document-question-answering": DocumentQuestionAnswering,
}


def adapter_for(spec: ModelSpec) -> type[StagedPipeline]:
    """The staged pipeline class of `spec`'s task (the generic one where a task needs nothing
    more); raises ConfigError for `gpu_preprocess` on a task without a GPU path."""
    if not spec.gpu_preprocess:
        return ADAPTERS.get(spec.task, StagedPipeline)
    if spec.task != "image-classification":
        raise ConfigError(
            f"{spec.name}: gpu_preprocess is implemented for image-classification only"
        )
    return GpuImagePipeline


def load_front(spec: ModelSpec, settings: Settings) -> tuple[StagedPipeline, float]:
    """A front's half of one model (preprocess, postprocess; no weights) and its load time."""
    started = time.perf_counter()
    pipe = load_pipeline(spec, weights=False)
    staged = adapter_for(spec)(
        spec,
        pipe,
        ocr_timeout_s=settings.ocr_timeout_s,
        ocr_concurrency=settings.ocr_concurrency,
    )
    return staged, time.perf_counter() - started


def load_staged(spec: ModelSpec, settings: Settings) -> tuple[StagedPipeline, float]:
    """Load and warm one model; returns it and its load time in seconds."""
    started = time.perf_counter()
    pipe = load_pipeline(spec)
    staged = adapter_for(spec)(
        spec,
        pipe,
        ocr_timeout_s=settings.ocr_timeout_s,
        ocr_concurrency=settings.ocr_concurrency,
    )
    staged.run_one(*staged.warm_input())
    elapsed = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1f s", spec.name, spec.task, staged.pipe.device, elapsed)
    return staged, elapsed
