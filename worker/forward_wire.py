"""Messages between a worker's front processes and its forward process, over a local socket.

Both ends are processes of one `pipeq worker` (never a job's sender), so the envelope is a
pickle; tensor and array data travel beside it as out-of-band buffers (pickle protocol 5) in the
same message, so JPEG bytes, token ids and logits are copied into the socket and out, never
pickled element by element.
"""

from __future__ import annotations

import io
import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

_HEAD = struct.Struct("!IQ")  # buffer count, envelope size


def _tensor(buffer: Any, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    # bytearray: a writable copy, which torch.frombuffer wants (a bytes view would warn).
    flat = torch.frombuffer(bytearray(buffer), dtype=torch.uint8) if len(buffer) else None
    target = getattr(torch, dtype)
    if flat is None:
        return torch.empty(shape, dtype=target)
    return flat.view(target).reshape(shape)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            dtype = str(tensor.dtype).removeprefix("torch.")
            return _tensor, (pickle.PickleBuffer(raw), dtype, tuple(tensor.shape))
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return _array, (
                pickle.PickleBuffer(np.ascontiguousarray(obj).reshape(-1)),
                obj.dtype.str,
                obj.shape,
            )
        return NotImplemented


def _array(buffer: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(bytearray(buffer), dtype=np.dtype(dtype)).reshape(shape)


def send(conn: Connection, message: Any) -> None:
    """`message` as one write: envelope and buffers in one blob, so a thread that must win the GIL
    back after each system call (behind a hundred job threads) makes one call, not one a tensor."""
    buffers: list[pickle.PickleBuffer] = []
    envelope = io.BytesIO()
    _Pickler(envelope, protocol=5, buffer_callback=buffers.append).dump(message)
    raws = [buffer.raw() for buffer in buffers]
    sizes = struct.pack(f"!{len(raws)}Q", *(raw.nbytes for raw in raws))
    head = _HEAD.pack(len(raws), envelope.getbuffer().nbytes) + sizes
    conn.send_bytes(b"".join([head, envelope.getbuffer(), *raws]))


def receive(conn: Connection) -> Any:
    view = memoryview(conn.recv_bytes())
    count, envelope_size = _HEAD.unpack_from(view)
    sizes = struct.unpack_from(f"!{count}Q", view, _HEAD.size)
    offset = _HEAD.size + 8 * count
    envelope = view[offset : offset + envelope_size]
    offset += envelope_size
    buffers = []
    for size in sizes:
        buffers.append(view[offset : offset + size])
        offset += size
    return pickle.loads(envelope, buffers=buffers)
