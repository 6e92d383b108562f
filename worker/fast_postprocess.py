"""`ImageClassificationPipeline.postprocess`, same answers, without its per-label config lookups.

The library builds one dict per label, reading `model.config.id2label` through the config's
`__getattribute__` each time (1,000 times per ImageNet image), then sorts them all. On an H200
that was 75% of a worker's Python time (py-spy, bench/NOTES.md). This version resolves the
activation and labels once per model and builds dicts for the top k only. Order and values are
the library's: scores are the same float32 arrays, sorted descending with ties in label order
(Python's stable sort, as the library's `list.sort(reverse=True)`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.pipelines.base import Pipeline
from transformers.pipelines.image_classification import ClassificationFunction, sigmoid, softmax


class ImageClassificationPostprocess:
    def __init__(self, pipe: Pipeline) -> None:
        config = pipe.model.config
        self._config = config
        self._labels = [config.id2label[i] for i in range(config.num_labels)]
        self._default_function = self._resolve_default(config)

    @staticmethod
    def _resolve_default(config: Any) -> ClassificationFunction:
        # The library's rule, evaluated once instead of per image.
        if config.problem_type == "regression":
            return ClassificationFunction.NONE
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return ClassificationFunction.SIGMOID
        if config.problem_type == "single_label_classification" or config.num_labels > 1:
            return ClassificationFunction.SOFTMAX
        if hasattr(config, "function_to_apply"):
            return ClassificationFunction(config.function_to_apply)
        return ClassificationFunction.NONE

    def __call__(
        self, model_outputs: Any, function_to_apply: Any = None, top_k: int | None = 5
    ) -> list[dict[str, Any]]:
        function = ClassificationFunction(function_to_apply or self._default_function)
        logits = model_outputs["logits"][0]
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.to(torch.float32)
        outputs = logits.numpy()
        if function == ClassificationFunction.SIGMOID:
            scores = sigmoid(outputs)
        elif function == ClassificationFunction.SOFTMAX:
            scores = softmax(outputs)
        else:
            scores = outputs
        values = scores.tolist()
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
        if top_k is not None:
            order = order[: min(top_k, len(self._labels))]
        return [{"label": self._labels[i], "score": values[i]} for i in order]
