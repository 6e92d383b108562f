"""One small adapter per task: what a task's pipeline needs beyond the generic stages of
`StagedPipeline`, so that no stage asks which task it serves. `loading.adapter_for` picks one."""

from __future__ import annotations

import threading
from typing import Any

import pytesseract
import torch
from PIL import Image
from transformers.pipelines.base import Pipeline
from transformers.pipelines.document_question_answering import ModelType, normalize_box

from pipeq.config.errors import OcrTimeout
from pipeq.config.registry import ModelSpec
from pipeq.worker.fast_postprocess import (
    ImageClassificationPostprocess,
    TextClassificationPostprocess,
)
from pipeq.worker.pipelines import CallParams, ModelInputs, StagedPipeline


class TextClassification(StagedPipeline):
    window_tokenized = True

    def __init__(self, spec: ModelSpec, pipe: Pipeline, **kwargs: Any) -> None:
        super().__init__(spec, pipe, **kwargs)
        self._postprocess = TextClassificationPostprocess(pipe)

    def postprocess(self, outputs: list[Any], call: CallParams) -> Any:
        result = super().postprocess(outputs, call)
        # TextClassificationPipeline.__call__ wraps one string's answer in a list unless top_k
        # is given; match pipeline(input) exactly.
        return result if "top_k" in call.given else [result]


class FeatureExtraction(StagedPipeline):
    """One vector per token: batching pads, so each output is cut back to its own input's
    length (pipeline(input) never sees padding). `pooling` (mean over the input's tokens, or
    its first, CLS, token) and `normalize` (to unit length) make one vector per input, as
    sentence-transformers and TEI give; the pipeline never sees those two params."""

    window_tokenized = True

    def postprocess(self, outputs: list[Any], call: CallParams) -> Any:
        pooling = call.given.get("pooling") or "none"
        if pooling == "none" and not call.given.get("normalize"):
            return super().postprocess(outputs, call)
        tokens = self._postprocess(outputs[0], return_tensors=True).float()  # [1, T, H]
        vectors = (
            tokens.mean(dim=1)
            if pooling == "mean"
            else tokens[:, 0]
            if pooling == "cls"
            else tokens
        )
        if call.given.get("normalize"):
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return vectors.tolist() if pooling == "none" else vectors[0].tolist()

    def unbatch(
        self, output: Any, parts: list[ModelInputs], call: CallParams, batched: bool
    ) -> list[Any]:
        outputs = super().unbatch(output, parts, call, batched)
        left = self.pipe.tokenizer is not None and self.pipe.tokenizer.padding_side == "left"
        for part, each in zip(parts, outputs, strict=True):
            length = self.part_length(part)
            for key, value in each.items():
                if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[1] > length:
                    each[key] = value[:, -length:] if left else value[:, :length]
        return outputs


class ZeroShotClassification(StagedPipeline):
    def warm_input(self) -> tuple[Any, dict[str, Any]]:
        return "warm up", {"candidate_labels": ["a", "b"]}


class ImageClassification(StagedPipeline):
    def __init__(self, spec: ModelSpec, pipe: Pipeline, **kwargs: Any) -> None:
        super().__init__(spec, pipe, **kwargs)
        self._postprocess = ImageClassificationPostprocess(pipe)


class DocumentQuestionAnswering(StagedPipeline):
    """Tesseract under a timeout, and batches of equal lengths only: the library cannot
    un-batch across inputs of different lengths (select_starts_ends fails on their shapes)."""

    def __init__(self, spec: ModelSpec, pipe: Pipeline, **kwargs: Any) -> None:
        super().__init__(spec, pipe, **kwargs)
        # Where the pipeline would run Tesseract itself (no timeout there), pipeq runs it; a
        # processor with its own OCR (LayoutLMv2/v3 apply_ocr) or an OCR-free model keeps its own.
        self._runs_ocr = getattr(
            pipe, "model_type", None
        ) != ModelType.VisionEncoderDecoder and not getattr(
            pipe.image_processor, "apply_ocr", False
        )
        # The OCR timeout counts Tesseract's own run, not the wait for a free slot.
        self._ocr_slots = threading.BoundedSemaphore(self.ocr_concurrency)

    def iter_parts(self, item: Any, call: CallParams) -> Any:
        if self._runs_ocr and "word_boxes" not in item:
            item = {**item, "word_boxes": self._ocr(item["image"], call)}
        return super().iter_parts(item, call)

    def group_key(self, part: ModelInputs, call: CallParams) -> tuple[Any, ...]:
        return (*super().group_key(part, call), self.part_length(part))

    def _ocr(self, image: Image.Image, call: CallParams) -> list[tuple[str, list[int]]]:
        """Words and boxes as the library's `apply_tesseract` makes them (same call, same
        filtering and normalisation), under a timeout. Language and config are the operator's
        (models.yaml params), never a job's."""
        try:
            with self._ocr_slots:
                data = pytesseract.image_to_data(
                    image,
                    lang=call.preprocess.get("lang"),
                    output_type="dict",
                    config=call.preprocess.get("tesseract_config", ""),
                    timeout=self.ocr_timeout_s,
                )
        except RuntimeError as exc:
            # pytesseract kills the process and raises a bare RuntimeError on timeout.
            if type(exc) is RuntimeError and "timeout" in str(exc):
                raise OcrTimeout(
                    f"OCR did not finish within PIPEQ_OCR_TIMEOUT_S ({self.ocr_timeout_s:g} s); "
                    "send word_boxes with this document"
                ) from exc
            raise
        width, height = image.size
        return [
            (word, normalize_box([x, y, x + w, y + h], width, height))
            for word, x, y, w, h in zip(
                data["text"], data["left"], data["top"], data["width"], data["height"], strict=True
            )
            if word.strip()
        ]
