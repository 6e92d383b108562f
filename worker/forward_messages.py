"""What fronts and the forward process send each other: blocks of parts, submissions, answers and
batch reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from pipeq.config.errors import ErrorInfo
from pipeq.worker.pipelines import CallParams


@dataclass(frozen=True)
class Block:
    """Parts of one group a front asks to forward together (`StagedPipeline.pack`)."""

    block_id: int
    call_key: str
    group: Hashable
    length: int  # its longest part's
    lane_rank: int  # its most urgent part's
    expires_at: float | None  # its last part's deadline: expired rows are the front's to fail
    rows: int
    pack: Any

    def to_wire(self) -> list[Any]:
        return [
            self.block_id,
            self.call_key,
            self.group,
            self.length,
            self.lane_rank,
            self.expires_at,
            self.rows,
            self.pack,
        ]


@dataclass(frozen=True)
class Submission:
    model: str
    blocks: list[Block]
    # Call params by key, sent once per connection: blocks refer to them by key.
    calls: dict[str, CallParams] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "blocks": [block.to_wire() for block in self.blocks],
            "calls": {key: dataclasses.asdict(call) for key, call in self.calls.items()},
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Submission:
        return cls(
            wire["model"],
            [Block(*block) for block in wire["blocks"]],
            {key: CallParams(**call) for key, call in wire["calls"].items()},
        )


@dataclass(frozen=True)
class BatchReport:
    size: int
    forward_s: float
    waited_s: list[float]
    oom_splits: int = 0
    gpu_memory: tuple[int, int] | None = None


@dataclass(frozen=True)
class Answer:
    """One block's rows of a batch's outputs, or its error; `split`: send it again in halves."""

    block_id: int
    output: Any = None
    batched: bool = False  # `output` holds rows of a batch (of any size), not a lone part's
    error: ErrorInfo | None = None
    split: bool = False
    started_at: float = 0.0  # wall clock when its batch began: rows whose deadline was earlier
    batch: BatchReport | None = None
    ready: Any = None  # the CUDA event after which `output` is filled in (not sent)

    def to_wire(self) -> list[Any]:
        error = None if self.error is None else self.error.model_dump()
        batch = None if self.batch is None else dataclasses.asdict(self.batch)
        return [self.block_id, self.output, self.batched, error, self.split, self.started_at, batch]

    @classmethod
    def from_wire(cls, wire: list[Any]) -> Answer:
        block_id, output, batched, error, split, started_at, batch = wire
        return cls(
            block_id,
            output,
            batched,
            None if error is None else ErrorInfo.model_validate(error),
            split,
            started_at,
            None if batch is None else BatchReport(**batch),
        )
