"""`pipeq backfill`: a manifest of inputs through the bulk lane, resumable, with backpressure.

    manifest -> items (id, input) -> chunks of `chunk` -> bulk jobs, ids hashed from the body
    -> Client.submit_many in groups, never more than `max_in_flight` inputs queued or running
    -> finished jobs polled from their records -> JSONL shards (part-*, failed-*) -> summary.json

Resuming: the ids already in the output are skipped. Chunks are cut from the manifest before
that filter, so an unfinished chunk hashes to the same job id again: a job that finished after
the crash is read from its record instead of being run again, and one still queued is published
once more (its first message may have died with the producer; a copy that finds the job finished
does nothing). A job's record is deleted once its results are durably written, so the result
store holds only what is in flight.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import (
    Progress,
    TaskID,
)

from pipeq.config.errors import ErrorInfo, JobNotFound, Overloaded, UnknownModel
from pipeq.core.jobs import JobDocument, JobRequest
from pipeq.producer.backfill_report import Summary, progress_bar
from pipeq.producer.chunks import cut_chunks, failure, job_request, refuse_unfit
from pipeq.producer.client import Client
from pipeq.producer.manifest import (
    BadLine,
    Item,
    ManifestFormat,
    count_entries,
    read_manifest,
    s3_client,
)
from pipeq.producer.shards import (
    SHARD_LINES,
    Shards,
    Store,
    open_store,
    shard_index,
    shard_totals,
    written_ids,
)

# Inputs per Client.submit_many call: 0.1-0.2 s of publishing at the rate bench/publish.py
# measures (100k-150k inputs/s), so finished jobs are still collected several times a second.
log = logging.getLogger(__name__)

GROUP_INPUTS = 20_000
# Without a terminal, a progress line this often (seconds).
LOG_EVERY_S = 5.0


# --- jobs --------------------------------------------------------------------------------------


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Job:
    request: JobRequest
    items: list[Item]


class _Run:
    """The in-flight jobs of one backfill, its output shards and its counts."""

    def __init__(self, client: Client, store: Store, summary: Summary, max_in_flight: int) -> None:
        self.client, self.store, self.summary = client, store, summary
        self.max_in_flight = max_in_flight
        names = store.names()
        self.parts = Shards(store, "part", SHARD_LINES, names)
        self.failures = Shards(store, "failed", SHARD_LINES, names)
        self.in_flight: dict[str, _Job] = {}
        self.in_flight_inputs = 0
        self.unreleased: list[str] = []  # written jobs whose records wait for a durable store
        self.stopping = False
        self.progress: Progress | None = None
        self.task = TaskID(0)
        self._last_poll = 0.0
        self.logged_at = 0.0

    def submit(self, jobs: list[_Job]) -> None:
        """Publish `jobs`, each group only once there is room for it under `max_in_flight`."""
        while jobs and not self.stopping:
            room, count = self.max_in_flight - self.in_flight_inputs, 0
            while count < len(jobs) and len(jobs[count].items) <= room:
                room -= len(jobs[count].items)
                count += 1
            if count:
                self._submit_group(jobs[:count])
                jobs = jobs[count:]
            else:
                self.collect(wait=True)

    def _submit_group(self, group: list[_Job]) -> None:
        while True:
            try:
                answers = self.client.submit_many([job.request for job in group])
                break
            except Overloaded as exc:
                # Nothing of the group was queued: write out what finishes meanwhile, then retry.
                retry_at = time.monotonic() + exc.retry_after_s
                while time.monotonic() < retry_at:
                    if self.stopping:
                        return  # not published; --resume submits it
                    self.collect(wait=False)
                    time.sleep(min(0.5, max(0.0, retry_at - time.monotonic())))
        stale = []
        for job, (doc, created) in zip(group, answers, strict=True):
            if doc.id in self.in_flight:  # the same chunk twice in the manifest
                continue
            self.in_flight[doc.id] = job
            self.in_flight_inputs += len(job.items)
            self.summary.jobs += 1
            if created:
                self.summary.published += len(job.items)
                continue
            self.summary.reused += len(job.items)
            if doc.status == "queued":
                stale.append(job.request.to_message())
        if stale:
            self.client.publish(stale)
        self.summary.peak_in_flight = max(self.summary.peak_in_flight, self.in_flight_inputs)

    def collect(self, wait: bool) -> None:
        """Write out the jobs that have finished; with `wait`, poll until one has."""
        while self.in_flight:
            now = time.monotonic()
            pause_s = self._last_poll + self.client.settings.wait_poll_interval_s - now
            if pause_s > 0:
                if not wait:
                    return
                time.sleep(pause_s)
            if self.poll_all() or not wait or self.stopping:
                return

    def poll_all(self) -> int:
        """Read every in-flight job's record once; write out the finished ones."""
        self._last_poll = time.monotonic()
        return sum(self._poll(job_id) for job_id in list(self.in_flight))

    def _poll(self, job_id: str) -> bool:
        try:
            doc = self.client.get(job_id)
        except JobNotFound:
            # Its record expired or was removed while queued: submit it again.
            job = self._forget(job_id)
            self._submit_group([job])
            return False
        if not doc.done:
            return False
        self._write(self._forget(job_id), doc)
        return True

    def _forget(self, job_id: str) -> _Job:
        job = self.in_flight.pop(job_id)
        self.in_flight_inputs -= len(job.items)
        return job

    def _write(self, job: _Job, doc: JobDocument) -> None:
        outputs = doc.outputs or [None] * len(job.items)
        errors = doc.errors or [None] * len(job.items)
        done, failed = [], []
        for item, output, error in zip(job.items, outputs, errors, strict=True):
            if doc.status == "succeeded" and error is None:
                done.append(json.dumps({"id": item.id, "output": output}) + "\n")
            else:
                info = error or ErrorInfo(
                    type=doc.status.title(), message=f"the job was {doc.status}"
                )
                failed.append(failure(item, info.model_dump()))
        self.parts.write(done)
        self.failures.write(failed)
        self._count(len(done), len(failed))
        self.unreleased.append(doc.id)
        self.release()

    def release(self) -> None:
        """Delete the records of jobs whose results are durably written."""
        if self.store.durable:
            for job_id in self.unreleased:
                self.client.records.delete(job_id)
            self.unreleased.clear()

    def fail_line(self, bad: BadLine) -> None:
        error = {"type": "ManifestError", "message": f"line {bad.line}: {bad.message}"}
        self.failures.write([json.dumps({"id": bad.id, "line": bad.line, "error": error}) + "\n"])
        self.summary.bad_lines += 1
        self._count(0, 1)

    def skip(self, count: int) -> None:
        self.summary.skipped += count
        if self.progress is not None and count:
            self.progress.advance(self.task, count)

    def _count(self, done: int, failed: int) -> None:
        self.summary.succeeded += done
        self.summary.failed += failed
        if self.progress is not None:
            self.progress.update(self.task, advance=done + failed, failed=self.summary.failed)

    def close(self) -> None:
        self.parts.close()
        self.failures.close()
        self.release()


@contextmanager
def _stop_on_signals(run: _Run) -> Iterator[None]:
    """SIGINT/SIGTERM: stop publishing and write what has finished (a second SIGINT aborts).
    Jobs left in flight are picked up by `--resume`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _: Any) -> None:
        if run.stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def backfill(
    client: Client,
    manifest: str,
    model: str,
    params: dict[str, Any] | None = None,
    out: str | None = None,
    chunk: int = 100,
    max_in_flight: int = 10_000,
    resume: bool = False,
    *,
    column: str | None = None,
    manifest_format: ManifestFormat | None = None,
    show_progress: bool = True,
    s3: Any | None = None,
) -> Summary:
    """Run every input of `manifest` through `model` on the bulk lane into `out` (a directory or
    `s3://bucket/prefix`); see the module docstring. Returns this run's counts."""
    if not 1 <= chunk <= max_in_flight:
        raise ValueError(
            f"--chunk ({chunk}) must be between 1 and --max-in-flight ({max_in_flight})"
        )
    spec = client.registry.get(model)
    if spec is None:
        raise UnknownModel(
            f"unknown model {model!r}; this service has {', '.join(client.registry.models)}"
        )
    if not manifest.startswith("s3://") and not Path(manifest).is_file():
        raise FileNotFoundError(f"no manifest at {manifest}; nothing was started")
    if s3 is None and (manifest.startswith("s3://") or (out or "").startswith("s3://")):
        s3 = s3_client(client.settings.s3_endpoint_url)
    out = out or default_out(manifest)
    store = open_store(out, s3)
    done = _resume_point(store, resume, out)
    earlier = shard_totals(store)
    summary = Summary(model=model, manifest=manifest, out=out)
    run = _Run(client, store, summary, max_in_flight)
    started = time.monotonic()
    entries = refuse_unfit(
        read_manifest(manifest, manifest_format, column, s3), spec, client.settings.max_text_chars
    )
    with progress_bar(show_progress) as bar, _stop_on_signals(run):
        run.progress = bar
        run.task = bar.add_task("backfill", total=count_entries(manifest), rate=0.0, failed=0)
        try:
            _feed(run, entries, model, params or {}, chunk, done, started)
            while run.in_flight and not run.stopping:
                run.collect(wait=True)
                _show_rate(run, started)
            run.poll_all()
        finally:
            run.close()
    summary.elapsed_s = round(time.monotonic() - started, 3)
    summary.inputs_per_s = round(
        (summary.succeeded + summary.failed) / max(summary.elapsed_s, 1e-9), 1
    )
    summary.complete = not run.in_flight and not run.stopping
    summary.total_succeeded = earlier["succeeded"] + summary.succeeded
    summary.total_failed = earlier["failed"] + summary.failed
    store.put("summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _feed(
    run: _Run,
    entries: Iterable[Item | BadLine],
    model: str,
    params: dict[str, Any],
    chunk: int,
    done: set[str],
    started: float,
) -> None:
    pending: list[_Job] = []
    pending_inputs = 0
    for entry in cut_chunks(entries, chunk):
        if run.stopping:
            return
        if isinstance(entry, BadLine):
            run.summary.inputs += 1
            if entry.id in done:
                run.skip(1)
            else:
                run.fail_line(entry)
            continue
        run.summary.inputs += len(entry)
        todo = [item for item in entry if item.id not in done]
        run.skip(len(entry) - len(todo))
        if todo:
            pending.append(_Job(job_request(model, params, todo), todo))
            pending_inputs += len(todo)
        if pending_inputs >= min(GROUP_INPUTS, run.max_in_flight):
            run.submit(pending)
            pending, pending_inputs = [], 0
            _show_rate(run, started)
        run.collect(wait=False)
    run.submit(pending)


def _resume_point(store: Store, resume: bool, out: str) -> set[str]:
    names = store.names()
    shards = [n for n in names if shard_index(n, "part") >= 0 or shard_index(n, "failed") >= 0]
    if shards and not resume:
        raise FileExistsError(
            f"{out} already holds results; pass --resume, or choose another --out"
        )
    return written_ids(store, shards)


def default_out(manifest: str) -> str:
    """`<manifest name>-results` in the working directory."""
    name = Path(manifest.rstrip("/")).stem or "backfill"
    return f"{name}-results"


def _show_rate(run: _Run, started: float) -> None:
    if run.progress is None:
        return
    summary = run.summary
    rate = (summary.succeeded + summary.failed) / max(time.monotonic() - started, 1e-9)
    run.progress.update(run.task, rate=rate)
    # No terminal (a cron job, a pod's log): the bar would stay silent, so a line now and then.
    if run.progress.disable or run.progress.console.is_terminal:
        return
    now = time.monotonic()
    if now - run.logged_at < LOG_EVERY_S:
        return
    run.logged_at = now
    total = run.progress.tasks[0].total or 0
    done = summary.succeeded + summary.failed + summary.skipped
    eta = f"{(total - done) / rate:.0f} s" if rate > 0 and total >= done else "unknown"
    log.info(
        "backfill: %d of %d done, %d failed, %.0f inputs/s, ETA %s",
        done,
        total,
        summary.failed,
        rate,
        eta,
    )
