"""Parts travel to the forward process in blocks: blocks merged into one batch, cut back per block
and un-batched by the front, answer as `pipeline()` does on each input alone; a block that fails
is split until the one part that fails is alone, and only that part fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import pytest
from transformers import pipeline

from pipeq.config.errors import ModelError
from pipeq.config.registry import ModelSpec
from pipeq.worker.batcher import WorkItem, take_batch
from pipeq.worker.block_stages import BlockStages
from pipeq.worker.feeding import work_item
from pipeq.worker.forward_client import ForwardClient
from pipeq.worker.forward_server import ForwardModel, ForwardServer, _Reports
from pipeq.worker.forward_wire import decode, encode
from pipeq.worker.loading import adapter_for
from pipeq.worker.pipelines import StagedPipeline

TEXTS = ["fine", "a long and winding review of a film " * 3, "", "bad bad", "ok then"]


def _staged(model_dir: Path, name: str, task: str) -> StagedPipeline:
    path = str(model_dir / "models" / name)
    spec = ModelSpec(name=name, task=task, model=path, max_batch_size=8, max_wait_ms=20)
    return adapter_for(spec)(spec, pipeline(task, model=path, device="cpu"))


def _close(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _close(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _close(a, b)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    else:
        assert got == want


@pytest.mark.parametrize(
    ("name", "task", "inputs", "params"),
    [
        ("tiny-sentiment", "text-classification", TEXTS, {"top_k": 2}),
        ("tiny-features", "feature-extraction", TEXTS, {}),
        ("tiny-zeroshot", "zero-shot-classification", TEXTS[:2], {"candidate_labels": ["a", "b"]}),
    ],
)
def test_merged_blocks_answer_as_each_input_alone(
    model_dir: Path, name: str, task: str, inputs: list[str], params: dict[str, Any]
) -> None:
    staged = _staged(model_dir, name, task)
    call = staged.call_params(params)
    if staged.tokenizes_windows:
        per_input = [[part] for part in staged.preprocess_texts(inputs, call)]
    else:
        per_input = [staged.preprocess(text, call) for text in inputs]
    parts = [part for each in per_input for part in each]
    # Blocks of 1, 2 and the rest, as two fronts might send them, run as one batch.
    cuts = [parts[:1], parts[1:3], parts[3:]]
    packs = [decode(encode(staged.pack(block))) for block in cuts]
    blocks = BlockStages(staged)
    answers = blocks.forward(blocks.stage(packs, call), call)
    outputs = []
    for block, (output, batched, ready) in zip(cuts, answers, strict=True):
        assert batched and ready is None  # nothing to wait for on the CPU
        outputs += staged.unbatch(decode(encode(output)), block, call, batched)
    for text, each in zip(inputs, per_input, strict=True):
        mine, outputs = outputs[: len(each)], outputs[len(each) :]
        _close(staged.postprocess(mine, call), staged.run_one(text, params))


def test_take_batch_counts_rows() -> None:
    def block(rows: int, length: int) -> WorkItem:
        return WorkItem(part=rows, group="g", call=None, length=length, rows=rows)

    pending = [block(5, 10), block(4, 11), block(3, 40), block(1, 12)]
    assert [item.part for item in take_batch(pending, limit=8)] == [5, 1]
    assert [item.part for item in take_batch(pending, limit=8)] == [4, 3]


@pytest.fixture()
def forward_socket(model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, StagedPipeline]]:
    """A forward process's server for tiny-sentiment (batches of at most 8) on a unix socket, in
    this process's threads."""
    staged = _staged(model_dir, "tiny-sentiment", "text-classification")
    reports = _Reports()
    batcher = BlockStages(staged).batcher(staged.spec, reports).start()
    socket = str(tmp_path / "forward.sock")
    listener = Listener(socket, family="AF_UNIX")
    stop = threading.Event()
    server = ForwardServer({"tiny-sentiment": ForwardModel(staged, batcher, reports)})
    thread = threading.Thread(target=server.serve, args=(listener, stop), daemon=True)
    thread.start()
    yield socket, staged
    stop.set()
    listener.close()
    batcher.stop()


def test_a_part_that_fails_in_forward_fails_alone(
    model_dir: Path, forward_socket: tuple[str, StagedPipeline]
) -> None:
    socket, staged = forward_socket
    fronts = [
        ForwardClient(staged, partial(Client, socket, family="AF_UNIX"), max_batch_size=8).start()
        for _ in range(2)
    ]
    call = staged.call_params({})
    # 600 words: more positions than the model has (512), so its forward pass raises.
    too_long = "word " * 600
    texts = [[*TEXTS, too_long, "after", "last one"], ["front two", "says", "hello"]]
    futures: list[tuple[str, Future[Any]]] = []
    for front, batch in zip(fronts, texts, strict=True):
        items = [
            work_item(staged, call, 1, None, part) for part in staged.preprocess_texts(batch, call)
        ]
        futures += [(text, item.future) for text, item in zip(batch, items, strict=True)]
        front.submit(items)
    for text, future in futures:
        if text is too_long:
            with pytest.raises(ModelError):
                future.result(timeout=60)
            continue
        want = staged.run_one(text, {})
        got = staged.postprocess([future.result(timeout=60)], call)
        assert got[0]["label"] == want[0]["label"]
        assert got[0]["score"] == pytest.approx(want[0]["score"], rel=1e-4)
    for front in fronts:
        front.stop()
