"""Classification postprocess (images, texts), same answers, without per-label config lookups.

The library reads `model.config` through the config's `__getattribute__` several times per input
(the activation's rule) and, for images, once per label (1,000 times per ImageNet image) before
sorting them all. On an H200 that was 75% of a worker's Python time (py-spy, bench/NOTES.md).
These versions resolve the activation and labels once per model and build dicts for the top k
only. Order and values are the library's: scores are the same float32 arrays, sorted descending
with ties in label order (Python's stable sort, as the library's `list.sort(reverse=True)`).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from transformers.pipelines.base import Pipeline
from transformers.pipelines.image_classification import ClassificationFunction, sigmoid, softmax


class _Classification:
    def __init__(self, pipe: Pipeline) -> None:
        config = pipe.model.config
        # A loaded config's id2label has int keys, one per label.
        id2label = cast(dict[int, str], config.id2label)
        self._labels = [id2label[i] for i in range(len(id2label))]
        self._default_function = self._resolve_default(config)

    @staticmethod
    def _resolve_default(config: Any) -> ClassificationFunction:
        # The library's rule, evaluated once instead of per input.
        if config.problem_type == "regression":
            return ClassificationFunction.NONE
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return ClassificationFunction.SIGMOID
        if config.problem_type == "single_label_classification" or config.num_labels > 1:
            return ClassificationFunction.SOFTMAX
        if hasattr(config, "function_to_apply"):
            return ClassificationFunction(config.function_to_apply)
        return ClassificationFunction.NONE

    def _scores(self, model_outputs: Any, function_to_apply: Any) -> np.ndarray:
        function = ClassificationFunction(function_to_apply or self._default_function)
        logits = model_outputs["logits"][0]
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.to(torch.float32)
        outputs: np.ndarray = logits.numpy()
        if function == ClassificationFunction.SIGMOID:
            return sigmoid(outputs)  # type: ignore[no-any-return]
        if function == ClassificationFunction.SOFTMAX:
            return softmax(outputs)  # type: ignore[no-any-return]
        return outputs

    def _ranked(self, scores: np.ndarray, top_k: int | None) -> list[dict[str, Any]]:
        # A stable sort of the negated scores: descending, ties in label order, as the library's
        # stable `sort(reverse=True)` of the same values.
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[: min(top_k, len(self._labels))]
        values = scores[order].tolist()
        return [
            {"label": self._labels[i], "score": value}
            for i, value in zip(order.tolist(), values, strict=True)
        ]


class ImageClassificationPostprocess(_Classification):
    def __call__(
        self, model_outputs: Any, function_to_apply: Any = None, top_k: int | None = 5
    ) -> list[dict[str, Any]]:
        return self._ranked(self._scores(model_outputs, function_to_apply), top_k)

    def rank_batch(
        self, logits: torch.Tensor, function_to_apply: Any = None, top_k: int | None = 5
    ) -> dict[str, torch.Tensor]:
        """`__call__`'s scores and order for a batch of logits, on the logits' device: each
        row's top k scores and label indices (`from_ranked` makes them the answer). One sort of
        the batch on a GPU, and k values per image to copy back, not every label's."""
        function = ClassificationFunction(function_to_apply or self._default_function)
        scores = logits.float()
        if function == ClassificationFunction.SIGMOID:
            scores = scores.sigmoid()
        elif function == ClassificationFunction.SOFTMAX:
            scores = scores.softmax(-1)
        # Stable and descending: ties in label order, as `_ranked`.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        if top_k is not None:
            order = order[:, : min(top_k, len(self._labels))]
        return {"scores": scores.gather(-1, order), "labels": order}

    def from_ranked(self, ranked: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One row of `rank_batch` as `__call__` answers."""
        labels = ranked["labels"].reshape(-1).tolist()
        scores = ranked["scores"].reshape(-1).tolist()
        return [
            {"label": self._labels[i], "score": score}
            for i, score in zip(labels, scores, strict=True)
        ]


class TextClassificationPostprocess(_Classification):
    def __call__(
        self,
        model_outputs: Any,
        function_to_apply: Any = None,
        top_k: int | None = 1,
        _legacy: bool = True,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        scores = self._scores(model_outputs, function_to_apply)
        if not _legacy:
            return self._ranked(scores, top_k)
        values = scores.tolist()
        if top_k == 1:
            best = max(range(len(values)), key=values.__getitem__)
            return {"label": self._labels[best], "score": values[best]}
        return [
            {"label": label, "score": score}
            for label, score in zip(self._labels, values, strict=True)
        ]
