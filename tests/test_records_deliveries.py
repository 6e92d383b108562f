"""The delivery count is compare-and-set in both record stores: of two claims that read the same
count, one wins; a write guarded by an older count (a worker whose job was claimed again) is
refused; and the count starts at 0 for a record written before it existed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipeq.core.jobs import JobDocument
from pipeq.core.records import JobRecords, RedisRecords
from pipeq.core.sqlite_records import SqliteRecords
from tests.conftest import REDIS


@pytest.fixture(params=["redis", "sqlite"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> JobRecords:
    if request.param == "redis":
        return RedisRecords(f"{REDIS}/13", ttl_s=60)
    return SqliteRecords(tmp_path / "records.sqlite", ttl_s=60)


def _claim(records: JobRecords, queued: JobDocument, held: int, status: str) -> bool:
    running = queued.model_copy(update={"status": "running", "deliveries": held + 1})
    return records.transition(running, (status,), deliveries=held)[0]


def test_claims_count_once_each(records: JobRecords) -> None:
    queued = JobDocument(id=uuid.uuid4().hex, model="tiny-sentiment", status="queued")
    assert records.create_many([(queued, "fp", "{}")]) == [None]

    assert _claim(records, queued, 0, "queued")
    assert not _claim(records, queued, 0, "running"), "a second claim of the same count won"
    assert _claim(records, queued, 1, "running")
    doc = records.get(queued.id)
    assert doc is not None and doc.status == "running" and doc.deliveries == 2

    stale = doc.model_copy(update={"deliveries": 1})
    assert not records.transition(stale, ("running",), deliveries=1)[0]
    assert records.transition(doc, ("running",))[0], "an unguarded transition must still apply"
