"""Comparing a queue's answer with pipeline()'s: same structure, floats within tolerance."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from pipeq.config.registry import load_registry
from pipeq.worker.pipeline_outputs import to_json
from pipeq.worker.pipelines import load_pipeline


def assert_close(got: Any, want: Any, tol: float = 1e-4, where: str = "output") -> None:
    want = to_json(want)
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), (
            f"{where}: {got!r} != {want!r}"
        )
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (
            f"{where}: keys {got!r} != {want!r}"
        )
        for key in want:
            assert_close(got[key], want[key], tol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (
            f"{where}: {json.dumps(got)[:200]} != {json.dumps(want)[:200]}"
        )
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, tol, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@cache
def reference_pipeline(models_yaml: Path, name: str) -> Any:
    """A plain in-process pipeline() of a registered model: the answer key."""
    spec = load_registry(models_yaml).models[name]
    return load_pipeline(spec)
