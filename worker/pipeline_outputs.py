"""A pipeline's outputs as pipeq handles them: plain JSON, and rows cut from a batch's outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_json(value: Any) -> Any:
    """A pipeline's output as plain JSON types (numpy and torch values included)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same(value: Any) -> Any:
    return value


def batch_rows(output: Any, start: int, stop: int) -> Any:
    """Rows `start:stop` of a batch's outputs, keeping its shape of batch (as
    `PipelineIterator.loader_batch_item` reads one row, for a range of rows)."""
    if isinstance(output, (torch.Tensor, np.ndarray)):
        return output[start:stop] if output.ndim else output
    if isinstance(output, list):
        return output[start:stop]
    if isinstance(output, tuple):
        return tuple(batch_rows(value, start, stop) for value in output)
    if isinstance(output, dict):
        return type(output)(
            {key: batch_rows(value, start, stop) for key, value in output.items() if key != "cache"}
        )
    return output
