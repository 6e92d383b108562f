"""The image- and text-classification postprocesses equal the library's on the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import pipeline

from pipeq.worker.fast_postprocess import (
    ImageClassificationPostprocess,
    TextClassificationPostprocess,
)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "params", [{}, {"top_k": 1}, {"top_k": 1000}, {"function_to_apply": "sigmoid", "top_k": 3}]
)
def test_batch_ranked_like_the_library(vit, dtype: torch.dtype, params: dict) -> None:  # type: ignore[no-untyped-def]
    """The GPU image path ranks a whole batch at once (`rank_batch`), each row answered by
    `from_ranked`: the library's answer for that row's logits alone."""
    fast = ImageClassificationPostprocess(vit)
    _, _, post = vit._sanitize_parameters(**params)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, vit.model.config.num_labels, generator=generator).to(dtype)
    logits[:, 1] = logits[:, 3]  # ties, broken by label order
    ranked = fast.rank_batch(logits, **post)
    for row in range(len(logits)):
        got = fast.from_ranked({key: value[row] for key, value in ranked.items()})
        want = vit.postprocess({"logits": logits[row : row + 1]}, **post)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)


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
