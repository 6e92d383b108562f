"""A manifest cut into bulk jobs: chunks of inputs, the job request of each, and the lines refused
before sending."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from pipeq.config.registry import ModelSpec
from pipeq.core.input_kinds import kind_error
from pipeq.core.inputs import text_chars
from pipeq.core.jobs import JobRequest
from pipeq.producer.manifest import (
    INPUT,
    BadLine,
    Item,
)


def cut_chunks(items: Iterable[Item | BadLine], chunk: int) -> Iterator[list[Item] | BadLine]:
    """Consecutive good items, `chunk` at a time; bad lines pass through where they occur."""
    batch: list[Item] = []
    for entry in items:
        if isinstance(entry, BadLine):
            yield entry
            continue
        batch.append(entry)
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def job_request(model: str, params: dict[str, Any], items: list[Item]) -> JobRequest:
    """A bulk job whose id is a hash of its body and its inputs' ids: the same chunk of the same
    manifest is the same job, in this run and in any resumed one."""
    body = JobRequest(model=model, inputs=[i.input for i in items], params=params, priority="bulk")
    digest = hashlib.sha256(body.fingerprint().encode())
    for item in items:
        digest.update(b"\0" + item.id.encode())
    return body.model_copy(update={"id": "bf-" + digest.hexdigest()[:40]})


def failure(item: Item, error: dict[str, Any]) -> str:
    raw = INPUT.dump_python(item.input, mode="json")
    return json.dumps({"id": item.id, "input": raw, "error": error}) + "\n"


def refuse_unfit(
    entries: Iterable[Item | BadLine], spec: ModelSpec, limit: int
) -> Iterator[Item | BadLine]:
    """Inputs the submit would refuse, as bad lines with its message: sent, one would refuse its
    whole chunk (InvalidInput, PayloadTooLarge); as a bad line it fails alone."""
    for entry in entries:
        if not isinstance(entry, Item):
            yield entry
        elif why := kind_error(entry.input, spec.name, spec.task, spec.modality):
            yield BadLine(entry.id, entry.line, f"the input {why}")
        elif (chars := text_chars(entry.input)) > limit:
            yield BadLine(
                entry.id, entry.line, f"{chars} characters of text, over PIPEQ_MAX_TEXT_CHARS"
            )
        else:
            yield entry
