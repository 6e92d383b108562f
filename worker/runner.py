"""Running one job: claim its record, prepare its inputs ahead, batch, store, return (then ack).

A job's inputs are prepared (fetched, decoded, preprocessed) on the shared prefetch pool while the
model's batcher runs earlier batches; each model holds at most `max_prepared` prepared inputs,
which bounds memory however many jobs are in flight. Postprocessing runs on the job's own thread,
off the model's thread, which also writes the job's progress (parts forwarded / prepared) to its
record every `PROGRESS_INTERVAL_S` while it waits.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import ValidationError

from config.errors import ErrorInfo, Expired, InputError, ModelError, PipeqError
from config.settings import Settings
from producer.jobs import Input, JobDocument, JobMessage, JobProgress
from producer.ledger import QueueLedger
from producer.records import JobRecords
from producer.stores import ResultStores
from worker.batcher import LANE_RANK, Batcher, WorkItem
from worker.media import MediaLoader
from worker.metrics import CACHE, EXPIRED, INPUTS, JOBS, QUEUE_WAIT, STAGE_SECONDS, BatchMetrics
from worker.pipelines import CallParams, StagedPipeline
from worker.progress import ProgressTracker
from worker.result_cache import MISS, ResultCache, cache_key

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model, its batcher, and the bound on its prepared-but-not-forwarded inputs."""

    staged: StagedPipeline
    batcher: Batcher
    permits: threading.Semaphore
    hooks: BatchMetrics | None = None


@dataclass
class _Prepared:
    """One input handed to the batcher (its parts' futures), or served from the cache."""

    futures: list[Future[Any]]
    cache_key: str | None = None
    cached: Any = MISS


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        records: JobRecords,
        models: dict[str, ServedModel],
        media: MediaLoader,
        prefetch_threads: int,
        ledger: QueueLedger | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.cache = cache
        self.records = records
        self.results = ResultStores(settings, records)
        self.models = models
        self.media = media
        self._prefetch = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="prefetch")

    def close(self) -> None:
        self._prefetch.shutdown(wait=True, cancel_futures=True)

    def run(self, message: dict[str, Any], worker: str) -> JobDocument | None:
        """Run one job to a stored result and return its record as stored (outputs not inline
        when they went to S3). Returns None when there was nothing to do."""
        try:
            job = JobMessage.model_validate(message)
        except ValidationError as exc:
            log.error("dropping a message that is not a pipeq job: %s", exc)
            return None
        started = time.time()
        claimed = self._claim(job, worker, started)
        if claimed is None:
            return None
        QUEUE_WAIT.labels(job.model, job.lane).observe(max(0.0, started - job.submitted_at))
        progress = ProgressTracker(partial(self._publish_progress, claimed))
        outputs, errors, cached = self._execute(job, progress)
        finished = time.time()
        failed_all = all(error is not None for error in errors)
        doc = claimed.model_copy(
            update={
                "status": _final_status(errors) if failed_all else "succeeded",
                "outputs": outputs,
                "errors": errors,
                "cached": True if cached and cached == len(outputs) else None,
                "progress": progress.snapshot(),
                "timings": {
                    **claimed.timings,
                    "started_at": started,
                    "finished_at": finished,
                    "queued_s": started - job.submitted_at,
                    "run_s": finished - started,
                },
            }
        )
        stored = time.perf_counter()
        record = self.results.save(doc, job.store)
        STAGE_SECONDS.labels(job.model, "store").observe(time.perf_counter() - stored)
        _count(job, record, errors)
        return record

    def _claim(self, job: JobMessage, worker: str, started: float) -> JobDocument | None:
        """Mark the job running, unless it was cancelled or already finished (a redelivery)."""
        running = JobDocument(
            id=job.id,
            model=job.model,
            status="running",
            lane=job.lane,
            worker=worker,
            timings={"submitted_at": job.submitted_at, "started_at": started},
            webhook=job.webhook,
        )
        changed, current = self.records.transition(running, ("queued",))
        if changed or (current is not None and current.status == "cancelled"):
            # It leaves the backlog once: claimed from queued, or dropped cancelled.
            if self.ledger is not None:
                self.ledger.take(job.model, job.lane, len(job.inputs))
        if not changed and current is not None and current.status == "running":
            changed, current = self.records.transition(running, ("running",))
        if changed:
            return running
        if current is None:
            # No record (its TTL ran out while queued, or published by hand): keep a fresh one.
            self.records.put(running)
            return running
        log.info("job %s is %s; not running it", job.id, current.status)
        return None

    def _publish_progress(self, running: JobDocument, progress: JobProgress) -> None:
        try:
            self.records.transition(running.model_copy(update={"progress": progress}), ("running",))
        except Exception as exc:  # noqa: BLE001 - a missed progress write never fails the job
            log.warning("progress write for job %s failed: %r", running.id, exc)

    def _execute(
        self, job: JobMessage, progress: ProgressTracker
    ) -> tuple[list[Any], list[ErrorInfo | None], int]:
        """Outputs and errors per input, and how many outputs came from the cache."""
        count = len(job.inputs)
        served = self.models.get(job.model)
        if served is None:
            return *_fail_all(count, ModelError(f"this worker does not serve {job.model!r}")), 0
        expires_at = None if job.deadline_s is None else job.submitted_at + job.deadline_s
        if expires_at is not None and time.time() > expires_at:
            EXPIRED.labels(job.model, "queue").inc(count)
            return *_fail_all(count, Expired(f"not started within deadline_s={job.deadline_s}")), 0
        try:
            call = served.staged.call_params(job.params)
        except Exception as exc:  # noqa: BLE001 - the pipeline's own complaint about the params
            return *_fail_all(count, ModelError(f"invalid params {job.params}: {exc}")), 0
        rank = LANE_RANK[job.lane]
        prepared = []
        # Identical inputs of one job are fetched, run and postprocessed once.
        first: dict[str, Future[_Prepared]] = {}
        for item in job.inputs:
            key = item if isinstance(item, str) else item.model_dump_json()
            if key not in first:
                served.permits.acquire()
                first[key] = self._prefetch.submit(
                    self._prepare, served, item, call, rank, expires_at, progress
                )
            prepared.append(first[key])
        outputs: list[Any] = []
        errors: list[ErrorInfo | None] = []
        answered: dict[int, tuple[Any, ErrorInfo | None]] = {}
        cached = 0
        for future in prepared:
            if id(future) in answered:
                output, error = answered[id(future)]
                outputs.append(output)
                errors.append(error)
                continue
            try:
                ready = future.result()
                if ready.cached is not MISS:
                    outputs.append(ready.cached)
                    errors.append(None)
                    cached += 1
                    continue
                model_outputs = progress.wait(ready.futures)
                began = time.perf_counter()
                output = served.staged.postprocess(model_outputs, call)
                outputs.append(output)
                STAGE_SECONDS.labels(job.model, "postprocess").observe(time.perf_counter() - began)
                errors.append(None)
                self._remember(served, ready.cache_key, output)
            except PipeqError as exc:
                outputs.append(None)
                errors.append(exc.to_info())
            except Exception as exc:  # noqa: BLE001 - postprocess of one input must not sink the job
                log.exception("postprocess failed in job %s", job.id)
                outputs.append(None)
                errors.append(ModelError(f"{type(exc).__name__}: {exc}").to_info())
            answered[id(future)] = (outputs[-1], errors[-1])
        return outputs, errors, cached

    def _remember(self, served: ServedModel, key: str | None, output: Any) -> None:
        ttl_s = served.staged.spec.cache_ttl_s
        if key is None or ttl_s is None or self.cache is None:
            return
        try:
            self.cache.put(key, output, ttl_s)
        except Exception as exc:  # noqa: BLE001 - a cache write never fails the input
            log.warning("result cache write failed: %r", exc)

    def _prepare(
        self,
        served: ServedModel,
        item: Input,
        call: CallParams,
        rank: int,
        expires_at: float | None,
        progress: ProgressTracker,
    ) -> _Prepared:
        """Fetch, decode and preprocess one input, and hand its parts to the batcher (or find
        its output in the cache)."""
        spec = served.staged.spec
        name = spec.name
        key = None
        try:
            if expires_at is not None and time.time() > expires_at:
                EXPIRED.labels(name, "prefetch").inc()
                raise Expired("deadline passed before this input was fetched")
            began = time.perf_counter()
            loaded = served.staged.load(item, self.media)
            fetched = time.perf_counter()
            STAGE_SECONDS.labels(name, "fetch").observe(fetched - began)
            if spec.cache_ttl_s is not None and self.cache is not None:
                key = cache_key(spec, call.key, loaded)
                hit = self.cache.get(key)
                CACHE.labels(name, "miss" if hit is MISS else "hit").inc()
                if hit is not MISS:
                    served.permits.release()
                    return _Prepared([], key, hit)
            try:
                parts = served.staged.preprocess(loaded, call)
                STAGE_SECONDS.labels(name, "preprocess").observe(time.perf_counter() - fetched)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - the pipeline rejects this input
                raise ModelError(f"preprocess failed: {type(exc).__name__}: {exc}") from exc
            if not parts:
                raise ModelError("the pipeline produced nothing to run for this input")
        except BaseException:
            served.permits.release()
            raise
        items = [
            WorkItem(
                part=part,
                group=served.staged.group_key(part, call),
                call=call,
                length=served.staged.part_length(part),
                lane_rank=rank,
                expires_at=expires_at,
            )
            for part in parts
        ]
        _release_when_done(items, served.permits)
        progress.track([work.future for work in items])
        served.batcher.submit(items)
        return _Prepared([work.future for work in items], key)


def _release_when_done(items: list[WorkItem], permits: threading.Semaphore) -> None:
    remaining = [len(items)]
    lock = threading.Lock()

    def done(_: Future[Any]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            permits.release()

    for item in items:
        item.future.add_done_callback(done)


def _count(job: JobMessage, doc: JobDocument, errors: list[ErrorInfo | None]) -> None:
    JOBS.labels(job.model, doc.status).inc()
    for error in errors:
        INPUTS.labels(job.model, "ok" if error is None else error.type).inc()


def _fail_all(count: int, error: PipeqError) -> tuple[list[Any], list[ErrorInfo | None]]:
    return [None] * count, [error.to_info()] * count


def _final_status(errors: list[ErrorInfo | None]) -> str:
    return "expired" if all(e is not None and e.type == "Expired" for e in errors) else "failed"
