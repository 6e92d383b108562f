"""The batcher as a plain object: a fake forward function, no Celery, no Redis, no model."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from pipeq.config.errors import ModelError
from pipeq.worker.batcher import Batcher, WorkItem, take_batch


def _items(
    values: list[int], *, group: str = "g", rank: int = 0, start: float = 0.0
) -> list[WorkItem]:
    return [
        WorkItem(part=v, group=group, call=None, length=v, lane_rank=rank, enqueued_at=start + i)
        for i, v in enumerate(values)
    ]


class RecordingForward:
    """Doubles each part; raises for poison parts and OOM above a batch size; records batches."""

    def __init__(self, oom_above: int | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.oom_above = oom_above
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, parts: list[Any], _call: Any) -> list[Any]:
        self.gate.wait()
        if self.oom_above is not None and len(parts) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "poison" in parts:
            raise ValueError("cannot forward poison")
        self.batches.append(list(parts))
        return [p * 2 for p in parts]


def test_take_batch_prefers_interactive_then_similar_lengths() -> None:
    pending = _items([5, 100, 7, 90], rank=1) + _items([50, 6], rank=0, start=10)
    batch = take_batch(pending, limit=3)
    # Anchor: the oldest interactive item (50); then the other interactive one; then the bulk
    # item closest in length to the anchor.
    assert [item.part for item in batch] == [50, 6, 90]
    assert sorted(item.part for item in pending) == [5, 7, 100]


def test_take_batch_keeps_groups_apart() -> None:
    pending = _items([1, 2], group="a") + _items([3, 4], group="b", start=5)
    assert [item.part for item in take_batch(pending, limit=8)] == [1, 2]
    assert [item.part for item in take_batch(pending, limit=8)] == [3, 4]
    assert pending == []


def _run(batcher: Batcher, items: list[WorkItem]) -> list[Any]:
    batcher.submit(items)
    results = []
    for item in items:
        try:
            results.append(item.future.result(timeout=10))
        except ModelError as exc:
            results.append(exc)
    return results


def test_every_item_gets_its_own_output() -> None:
    forward = RecordingForward()
    batcher = Batcher("m", forward, max_batch_size=4, max_wait_ms=50).start()
    items = [WorkItem(part=i, group=i % 3, call=None) for i in range(40)]
    assert _run(batcher, items) == [i * 2 for i in range(40)]
    batcher.stop()
    assert all(len(batch) <= 4 for batch in forward.batches)
    assert max(len(batch) for batch in forward.batches) > 1


def test_poison_input_fails_alone() -> None:
    forward = RecordingForward()
    batcher = Batcher("m", forward, max_batch_size=8, max_wait_ms=50)
    forward.gate.clear()
    batcher.start()
    items = [WorkItem(part=p, group="g", call=None) for p in [1, 2, "poison", 4, 5]]
    batcher.submit(items)
    forward.gate.set()
    results = []
    for item in items:
        try:
            results.append(item.future.result(timeout=10))
        except ModelError as exc:
            results.append(str(exc))
    batcher.stop()
    assert results[:2] == [2, 4] and results[3:] == [8, 10]
    # The exception's class reaches the caller, its text (a library's, a file's) only the log.
    assert results[2] == "the model could not run this input (ValueError)"


def test_out_of_memory_splits_and_lowers_the_limit() -> None:
    forward = RecordingForward(oom_above=2)
    batcher = Batcher("m", forward, max_batch_size=8, max_wait_ms=0, oom_cooldown_s=60)
    items = [WorkItem(part=i, group="g", call=None) for i in range(8)]
    batcher.run_batch(items)  # the batch as the loop would have taken it
    assert [item.future.result(timeout=1) for item in items] == [i * 2 for i in range(8)]
    assert all(len(batch) <= 2 for batch in forward.batches)
    assert sorted(p for batch in forward.batches for p in batch) == list(range(8))
    assert batcher.limit == 2


def test_single_input_out_of_memory_fails_only_that_input() -> None:
    forward = RecordingForward(oom_above=0)
    batcher = Batcher("m", forward, max_batch_size=4, max_wait_ms=0)
    items = [WorkItem(part=1, group="g", call=None)]
    batcher.run_batch(items)
    with pytest.raises(ModelError, match="out of memory"):
        items[0].future.result(timeout=1)


def test_interactive_item_overtakes_a_bulk_backlog() -> None:
    forward = RecordingForward()
    batcher = Batcher("m", forward, max_batch_size=4, max_wait_ms=0)
    forward.gate.clear()
    batcher.start()
    first = [WorkItem(part=i, group="g", call=None, lane_rank=1) for i in range(4)]
    batcher.submit(first)  # the batch "on the GPU" while the backlog builds
    backlog = [WorkItem(part=100 + i, group="g", call=None, lane_rank=1) for i in range(20)]
    batcher.submit(backlog)
    urgent = WorkItem(part=999, group="g", call=None, lane_rank=0)
    batcher.submit([urgent])
    forward.gate.set()
    urgent.future.result(timeout=10)
    batcher.stop()
    batches_until_urgent = next(i for i, b in enumerate(forward.batches) if 999 in b)
    # At most the batch already running when it arrived, then its own.
    assert batches_until_urgent <= 1


def test_a_batch_short_of_full_waits_for_room_on_the_gpu() -> None:
    """While the GPU has more than one batch to finish (`has_room` false), a batch short of full
    grows instead of being taken; a full one is taken at once; with room, the rest goes."""
    forward = RecordingForward()
    room = threading.Event()
    batcher = Batcher("m", forward, max_batch_size=4, max_wait_ms=0, has_room=room.is_set).start()
    try:
        first = _items([1, 2])
        batcher.submit(first)
        second = _items([3, 4, 5])
        batcher.submit(second)  # five rows waiting: a full batch of four goes, room or not
        for item in first + second[:2]:
            assert item.future.result(timeout=10) == item.part * 2
        assert forward.batches == [[1, 2, 3, 4]]
        assert not second[2].future.done()
        room.set()
        assert second[2].future.result(timeout=10) == 10
        assert forward.batches == [[1, 2, 3, 4], [5]]
    finally:
        room.set()
        batcher.stop()
