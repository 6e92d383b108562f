"""The image-classification postprocess equals the library's on the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import pipeline

from worker.fast_postprocess import ImageClassificationPostprocess


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
