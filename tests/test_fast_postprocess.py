"""The image- and text-classification postprocesses equal the library's on the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import pipeline

from worker.fast_postprocess import ImageClassificationPostprocess, TextClassificationPostprocess


@pytest.fixture(scope="module")
def vit(model_dir: Path):  # type: ignore[no-untyped-def]
    return pipeline(
        "image-classification", model=str(model_dir / "models" / "tiny-vit"), device="cpu"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"top_k": 1},
        {"top_k": 3},
        {"top_k": 1000},
        {"function_to_apply": "sigmoid"},
        {"function_to_apply": "none", "top_k": 5},
    ],
)
def test_same_answer_as_the_library(vit, dtype: torch.dtype, params: dict) -> None:  # type: ignore[no-untyped-def]
    fast = ImageClassificationPostprocess(vit)
    _, _, post = vit._sanitize_parameters(**params)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, vit.model.config.num_labels, generator=generator).to(dtype)
        # Ties, which both must break by label order.
        logits[0, 1] = logits[0, 3]
        assert fast({"logits": logits}, **post) == vit.postprocess({"logits": logits}, **post)


@pytest.fixture(scope="module")
def sentiment(model_dir: Path):  # type: ignore[no-untyped-def]
    return pipeline(
        "text-classification", model=str(model_dir / "models" / "tiny-sentiment"), device="cpu"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"top_k": 1},
        {"top_k": 2},
        {"top_k": None},
        {"function_to_apply": "sigmoid"},
        {"function_to_apply": "none", "top_k": 5},
    ],
)
def test_text_same_answer_as_the_library(sentiment, dtype: torch.dtype, params: dict) -> None:  # type: ignore[no-untyped-def]
    fast = TextClassificationPostprocess(sentiment)
    _, _, post = sentiment._sanitize_parameters(**params)
    generator = torch.Generator().manual_seed(0)
    labels = sentiment.model.config.num_labels
    for _ in range(20):
        logits = torch.randn(1, labels, generator=generator).to(dtype)
        logits[0, 0] = logits[0, labels - 1]  # a tie, broken by label order
        expected = sentiment.postprocess({"logits": logits}, **post)
        assert fast({"logits": logits}, **post) == expected
