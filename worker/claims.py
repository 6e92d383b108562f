"""Claiming a window of jobs: each record marked running and its delivery counted, in two round
trips for the window."""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from pipeq.core.jobs import JobDocument, JobMessage
from pipeq.core.records import JobRecords
from pipeq.worker.capacity import Capacity
from pipeq.worker.job_run import JobRun
from pipeq.worker.metrics import JobMetrics
from pipeq.worker.progress import ProgressTracker

log = logging.getLogger(__name__)

# A claim of one job: (index in the window, record as running, statuses it may come from, count)
_Change = tuple[int, JobDocument, tuple[str, ...], int | None]


def claim_jobs(
    records: JobRecords,
    capacity: Capacity,
    metrics: JobMetrics,
    deliveries: list[tuple[dict[str, Any], Any]],
    worker: str,
) -> list[JobRun | None]:
    """Mark each job (message, delivery) running and count its delivery, one round trip for
    the window's records and one for its claims. None for a message that is not a job, and
    for a job cancelled, already finished (a redelivery), or claimed first by another copy."""
    started = time.time()
    jobs = [_job(message) for message, _ in deliveries]
    valid = [job for job in jobs if job is not None]
    held = dict(zip([j.id for j in valid], records.get_many([j.id for j in valid]), strict=True))
    claims: list[JobDocument | None] = [None] * len(jobs)
    fresh: list[JobDocument] = []
    changes: list[_Change] = []
    backlog: list[JobMessage] = []
    for index, job in enumerate(jobs):
        if job is None:
            continue
        current = held[job.id]
        if current is None:
            # No record (its TTL ran out while queued, or published by hand): keep a fresh one.
            claims[index] = first = _running(job, worker, started, deliveries=1)
            fresh.append(first)
        elif current.status in ("queued", "running"):
            # A `running` record is a dead worker's: a live one's lease keeps its message from
            # coming back. The count is compare-and-set, so of two copies claiming at once one
            # wins and the other is dropped, and a poison job's count climbs once per death.
            count = current.deliveries or 0
            running = _running(job, worker, started, deliveries=count + 1)
            changes.append((index, running, (current.status,), count))
        else:
            _not_running(job, current, backlog)
    if fresh:
        records.put_many(fresh)
    _settle_changes(records, jobs, changes, claims, backlog)
    capacity.left_backlog(backlog)
    runs: list[JobRun | None] = []
    for job, claim, (_, delivery) in zip(jobs, claims, deliveries, strict=True):
        if job is None or claim is None:
            runs.append(None)
            continue
        metrics.on_claimed(job.model, job.lane, started - job.submitted_at)
        runs.append(JobRun(job, claim, started, delivery, ProgressTracker()))
    return runs


def _settle_changes(
    records: JobRecords,
    jobs: list[JobMessage | None],
    changes: list[_Change],
    claims: list[JobDocument | None],
    backlog: list[JobMessage],
) -> None:
    """Write the window's compare-and-set claims; a job claimed from queued leaves the backlog."""
    answers = records.transition_many([change[1:] for change in changes])
    for (index, running, from_statuses, _), (changed, now) in zip(changes, answers, strict=True):
        job = jobs[index]
        assert job is not None
        if changed:
            claims[index] = running
            if from_statuses == ("queued",):
                backlog.append(job)
        elif now is not None:
            _not_running(job, now, backlog)


def _not_running(job: JobMessage, current: JobDocument, backlog: list[JobMessage]) -> None:
    if current.status == "cancelled":
        backlog.append(job)  # its message is dropped: it leaves the backlog now
    log.info("job %s is %s; not running it", job.id, current.status)


def _job(message: dict[str, Any]) -> JobMessage | None:
    try:
        return JobMessage.model_validate(message)
    except ValidationError as exc:
        log.error("dropping a message that is not a pipeq job: %s", exc)
        return None


def _running(job: JobMessage, worker: str, started: float, deliveries: int) -> JobDocument:
    return JobDocument(
        id=job.id,
        model=job.model,
        status="running",
        lane=job.lane,
        worker=worker,
        timings={"submitted_at": job.submitted_at, "started_at": started},
        webhook=job.webhook,
        owner=job.owner,
        deliveries=deliveries,
    )
