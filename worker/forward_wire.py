"""Messages between a worker's front processes and its forward process, over a local socket.

A message is one write: a JSON header, then the raw bytes of every tensor, array and byte string
it holds, back to back. The header is the message's tree with each of those replaced by a
reference to its buffer (dtype, shape, index), so JPEG bytes, token ids and logits are copied into
the socket and out, never encoded element by element, and nothing received is unpickled: a
message can only ever decode to data (JSON values, tuples, tensors, arrays, bytes, and the
library's own output mappings, by the name of a class already loaded).

Encoded forms (objects with one `$` key; a dict whose keys are not all plain strings goes as
`$items`): `{"$t": [i, dtype, shape]}` tensor, `{"$a": [i, dtype, shape]}` numpy array,
`{"$b": i}` bytes, `{"$q": i}` an `array('q')` (token ids), `{"$s": [dtype, value]}` numpy
scalar, `{"$tuple": [...]}`,
`{"$items": [class or null, [[key, value], ...]]}`.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from transformers import BatchEncoding
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils.generic import ModelOutput

_HEAD = struct.Struct("!I")  # header size


class WireError(TypeError):
    """A value the wire does not carry (a programming error in pipeq, not a job's input)."""


def _mapping_classes() -> dict[str, type]:
    """Mapping types a message may name: transformers' model outputs, tokenizer and processor
    batches, and their subclasses, among the classes already imported. Nothing is imported
    because a message names it."""
    found: dict[str, type] = {}
    pending: list[type] = [ModelOutput, BatchEncoding, BatchFeature]
    while pending:
        cls = pending.pop()
        found[_class_name(cls)] = cls
        pending.extend(cls.__subclasses__())
    return found


_classes: dict[str, type] = {}


def _class_named(name: str) -> type:
    global _classes
    if name not in _classes:
        _classes = _mapping_classes()
    if name not in _classes:
        raise WireError(f"no mapping class {name!r} is loaded here")
    return _classes[name]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Encoder:
    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def _buffer(self, raw: Any) -> int:
        self.buffers.append(memoryview(raw).cast("B"))
        return len(self.buffers) - 1

    def encode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v) for v in value]}
        if isinstance(value, Mapping):
            return self._mapping(value)
        return self._data(value)

    def _mapping(self, value: Mapping[Any, Any]) -> Any:
        if type(value) is dict and all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: self.encode(v) for k, v in value.items()}
        cls = None if type(value) is dict else _class_name(type(value))
        if cls is not None and _class_named(cls) is not type(value):
            raise WireError(f"cannot send a {type(value).__name__}")
        return {
            "$items": [
                cls,
                [[self.encode(k), self.encode(v)] for k, v in value.items()],
            ]
        }

    def _data(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            dtype = str(tensor.dtype).removeprefix("torch.")
            return {"$t": [self._buffer(raw), dtype, list(tensor.shape)]}
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            return {"$a": [self._buffer(raw), value.dtype.str, list(value.shape)]}
        if isinstance(value, np.generic):
            return {"$s": [value.dtype.str, value.item()]}
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {"$b": self._buffer(value)}
        if isinstance(value, array) and value.typecode == "q":
            return {"$q": self._buffer(value)}
        raise WireError(f"cannot send a {type(value).__name__}")


def _tensor(body: Any, buffers: list[memoryview]) -> torch.Tensor:
    index, dtype, shape = body
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype):
        raise WireError(f"{dtype!r} is not a torch dtype")
    raw = buffers[index]
    if not len(raw):
        return torch.empty(shape, dtype=target)
    # bytearray: a writable copy, which torch.frombuffer wants (a bytes view would warn).
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(target).reshape(shape)


def _array(body: Any, buffers: list[memoryview]) -> np.ndarray:
    index, dtype, shape = body
    kind = np.dtype(dtype)
    if kind.hasobject:
        raise WireError("an array of Python objects cannot be received")
    return np.frombuffer(bytearray(buffers[index]), dtype=kind).reshape(shape)


def _items(body: Any, buffers: list[memoryview]) -> Any:
    cls, items = body
    pairs = {_decode(k, buffers): _decode(v, buffers) for k, v in items}
    return pairs if cls is None else _class_named(cls)(pairs)


def _int64s(raw: memoryview) -> array[int]:
    ids = array("q")
    if len(raw) % ids.itemsize:
        raise WireError("an int64 array's bytes are not a whole number of items")
    ids.frombytes(raw)
    return ids


_TAGS = {
    "$t": _tensor,
    "$a": _array,
    "$b": lambda body, buffers: bytes(buffers[body]),
    "$q": lambda body, buffers: _int64s(buffers[body]),
    "$s": lambda body, _: np.dtype(body[0]).type(body[1]),
    "$tuple": lambda body, buffers: tuple(_decode(v, buffers) for v in body),
    "$items": _items,
}


def _decode(node: Any, buffers: list[memoryview]) -> Any:
    if isinstance(node, list):
        return [_decode(v, buffers) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, body),) = node.items()
        if tag in _TAGS:
            return _TAGS[tag](body, buffers)
    return {k: _decode(v, buffers) for k, v in node.items()}


def encode(message: Any) -> bytes:
    encoder = _Encoder()
    tree = encoder.encode(message)
    header = json.dumps({"tree": tree, "sizes": [b.nbytes for b in encoder.buffers]}).encode()
    return b"".join([_HEAD.pack(len(header)), header, *encoder.buffers])


def decode(data: bytes | memoryview) -> Any:
    view = memoryview(data)
    (size,) = _HEAD.unpack_from(view)
    header = json.loads(bytes(view[_HEAD.size : _HEAD.size + size]))
    offset = _HEAD.size + size
    buffers = []
    for nbytes in header["sizes"]:
        buffers.append(view[offset : offset + nbytes])
        offset += nbytes
    return _decode(header["tree"], buffers)


def send(conn: Connection, message: Any) -> None:
    """`message` as one write, so a thread that must win the GIL back after each system call
    (behind a hundred job threads) makes one call, not one a tensor."""
    conn.send_bytes(encode(message))


def receive(conn: Connection) -> Any:
    return decode(conn.recv_bytes())
