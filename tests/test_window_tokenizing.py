"""A window's texts tokenized in one call and padded from id lists answer as `pipeline()` does on
each text alone, and their batch is the tensors `pad_collate_fn` makes."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from pipeq.config.registry import ModelSpec
from pipeq.worker.forward_wire import WireError, decode, encode
from pipeq.worker.loading import adapter_for

TEXTS = [
    "short",
    "a somewhat longer text about a film that was fine",
    "",
    "the delivery was late again and the box was wet " * 6,
    "ünïcödé and emoji 🙂 text",
]


@pytest.mark.parametrize(
    ("name", "task", "params"),
    [
        ("tiny-sentiment", "text-classification", {}),
        ("tiny-sentiment", "text-classification", {"top_k": 2}),
        ("tiny-features", "feature-extraction", {}),
    ],
)
def test_window_answers_equal_pipeline_per_text(
    model_dir: Path, name: str, task: str, params: dict
) -> None:
    path = str(model_dir / "models" / name)
    pipe = pipeline(task, model=path, device="cpu")
    spec = ModelSpec(name=name, task=task, model=path)
    staged = adapter_for(spec)(spec, pipe)
    assert staged.tokenizes_windows
    call = staged.call_params(params)
    parts = staged.preprocess_texts(TEXTS, call)
    # The batch from packed id arrays is the library's collate of the one-text tensors, padded
    # on to a multiple of 8 columns; a block's pack crosses the wire as raw bytes.
    one_by_one = [staged.preprocess(text, call)[0] for text in TEXTS]
    packs = [decode(encode(staged.pack(parts[:2]))), decode(encode(staged.pack(parts[2:])))]
    listed, collated = staged.collate(packs), staged._collate(one_by_one)
    assert listed.keys() == collated.keys()
    width = collated["input_ids"].shape[1]
    assert listed["input_ids"].shape[1] == -(-width // 8) * 8
    pad = staged.pipe.tokenizer.pad_token_id
    for key in listed:
        assert torch.equal(listed[key][:, :width], collated[key]), key
        assert (listed[key][:, width:] == (pad if key == "input_ids" else 0)).all(), key
    # One forward pass over the two blocks, un-batched per text.
    outputs = staged.unbatch(staged.forward_batch(listed, call), parts, call, batched=True)
    for text, output in zip(TEXTS, outputs, strict=True):
        got = staged.postprocess([output], call)
        want = staged.run_one(text, params)
        torch.testing.assert_close(
            torch.tensor(_numbers(got)), torch.tensor(_numbers(want)), atol=1e-5, rtol=1e-4
        )
        assert _labels(got) == _labels(want)


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [v for key in sorted(value) for v in _numbers(value[key])]
    if isinstance(value, list):
        return [v for item in value for v in _numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) else []


def _labels(value: object) -> list[str]:
    if isinstance(value, dict):
        return [v for key in sorted(value) for v in _labels(value[key])]
    if isinstance(value, list):
        return [v for item in value for v in _labels(item)]
    return [value] if isinstance(value, str) else []


def test_id_arrays_cross_as_raw_bytes_and_come_back_equal() -> None:
    ids = {"input_ids": array("q", [101, 2023, 102]), "attention_mask": array("q", [1, 1, 1])}
    assert decode(encode(ids)) == ids
    header = b'{"tree": {"$q": 0}, "sizes": [5]}'
    with pytest.raises(WireError):  # five bytes are no whole number of int64s
        decode(len(header).to_bytes(4, "big") + header + b"12345")
