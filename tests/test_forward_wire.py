"""The front <-> forward process wire: a JSON header and raw buffers, decoded back to equal values,
and nothing in a message can name code to run."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from transformers import BatchEncoding
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from pipeq.worker.forward_wire import WireError, decode, encode


def _header(data: bytes) -> dict:
    (size,) = struct.unpack_from("!I", data)
    return json.loads(data[4 : 4 + size])


def _same(left: object, right: object) -> None:
    assert type(left) is type(right), (type(left), type(right))
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor)
        assert left.dtype == right.dtype and left.shape == right.shape
        assert torch.equal(left, right)
    elif isinstance(left, np.ndarray):
        assert isinstance(right, np.ndarray)
        assert left.dtype == right.dtype
        np.testing.assert_array_equal(left, right)
    elif isinstance(left, dict) or hasattr(left, "keys"):
        assert list(left.keys()) == list(right.keys())  # type: ignore[union-attr]
        for key in left.keys():  # type: ignore[union-attr]
            _same(left[key], right[key])  # type: ignore[index]
    elif isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            _same(a, b)
    else:
        assert left == right


VALUES = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    torch.tensor([[True, False]]),
    torch.ones(2, 3, dtype=torch.bfloat16),
    torch.zeros(0, 5, dtype=torch.int64),
    torch.arange(10)[::2],  # not contiguous
    np.arange(6, dtype=np.int16).reshape(2, 3),
    np.float32(1.5),
    b"\xff\xd8 jpeg bytes",
    ("key", ("input_ids", "attention_mask"), 7),
    {1: "an int key", (2, 3): "a tuple key"},
    {"$t": "a key that looks like a tag"},
    [None, True, 3, 2.5, "text", float("inf")],
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_values_come_back_equal(value: object) -> None:
    _same(value, decode(encode(value)))


def test_the_librarys_mappings_keep_their_class() -> None:
    output = SequenceClassifierOutput(logits=torch.randn(1, 3))
    encoding = BatchEncoding({"input_ids": torch.tensor([[101, 7, 102]])})
    nested = {"outputs": [output, BaseModelOutput(last_hidden_state=torch.randn(1, 2, 4))]}
    for value in (output, encoding, nested):
        back = decode(encode(value))
        _same(value, back)
    back = decode(encode(output))
    assert isinstance(back, SequenceClassifierOutput)
    assert torch.equal(back[0], output.logits)  # indexing as the pipelines' postprocess does


def test_buffers_travel_raw_beside_a_json_header() -> None:
    logits = torch.randn(64, 1000)
    data = encode({"logits": logits})
    header = _header(data)
    assert header["sizes"] == [logits.numel() * 4]
    assert len(data) < logits.numel() * 4 + 200


@pytest.mark.parametrize(
    "tree",
    [
        {"$items": ["os.system", [["x", 1]]]},
        {"$items": ["builtins.dict", []]},
        {"$t": [0, "load", [1]]},
        {"$a": [0, "|O", [1]]},
    ],
)
def test_a_message_cannot_name_code(tree: object) -> None:
    header = json.dumps({"tree": tree, "sizes": [4]}).encode()
    with pytest.raises(WireError):
        decode(struct.pack("!I", len(header)) + header + b"\0\0\0\0")


def test_unknown_types_are_refused_at_the_sender() -> None:
    with pytest.raises(WireError):
        encode({"a": object()})
