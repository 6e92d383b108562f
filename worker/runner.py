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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import ValidationError

from config.errors import (
    ErrorInfo,
    Expired,
    InputError,
    InvalidParams,
    ModelError,
    OutOfMemory,
    PipeqError,
    PoisonJob,
)
from config.settings import Settings
from producer.jobs import Input, JobDocument, JobMessage, JobProgress
from producer.ledger import QueueLedger
from producer.records import JobRecords
from producer.stores import ResultStores
from worker.batcher import LANE_RANK, PartSink, WorkItem
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
    batcher: PartSink
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
        deliveries = claimed.deliveries or 0
        if deliveries > self.settings.max_deliveries:
            outputs, errors, cached = *_fail_all(len(job.inputs), _poisoned(job, deliveries)), 0
        else:
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
        """Mark the job running and count the delivery, unless it was cancelled or already
        finished (a redelivery), or another copy claimed it first."""
        running = JobDocument(
            id=job.id,
            model=job.model,
            status="running",
            lane=job.lane,
            worker=worker,
            timings={"submitted_at": job.submitted_at, "started_at": started},
            webhook=job.webhook,
            owner=job.owner,
        )
        current = self.records.get(job.id)
        if current is None:
            # No record (its TTL ran out while queued, or published by hand): keep a fresh one.
            running = running.model_copy(update={"deliveries": 1})
            self.records.put(running)
            return running
        if current.status in ("queued", "running"):
            # A `running` record is a dead worker's: a live one's lease keeps its message from
            # coming back. The count is compare-and-set, so of two copies claiming at once one
            # wins and the other is dropped, and a poison job's count climbs once per death.
            held = current.deliveries or 0
            running = running.model_copy(update={"deliveries": held + 1})
            changed, now = self.records.transition(running, (current.status,), deliveries=held)
            if changed:
                if current.status == "queued":
                    self._leave_backlog(job)
                return running
            if now is None:
                return None
            current = now
        if current.status == "cancelled":
            self._leave_backlog(job)
        log.info("job %s is %s; not running it", job.id, current.status)
        return None

    def _leave_backlog(self, job: JobMessage) -> None:
        # Once per job: when claimed from queued, or when its message is dropped as cancelled.
        if self.ledger is not None:
            self.ledger.take(job.model, job.lane, len(job.inputs))

    def _publish_progress(self, running: JobDocument, progress: JobProgress) -> None:
        try:
            # Guarded by the count: a worker whose job was claimed again writes no more.
            self.records.transition(
                running.model_copy(update={"progress": progress}),
                ("running",),
                deliveries=running.deliveries,
            )
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
        except InvalidParams as exc:
            # At submit the same check answered 422; this message was published another way.
            log.warning("job %s: %s", job.id, exc)
            return *_fail_all(count, exc), 0
        except Exception as exc:  # noqa: BLE001 - the pipeline's own complaint about the params
            log.warning("job %s: the pipeline refused its params: %r", job.id, exc)
            refused = InvalidParams(f"the pipeline refused these params ({type(exc).__name__})")
            return *_fail_all(count, refused), 0
        rank = LANE_RANK[job.lane]
        prepared = []
        # Identical inputs of one job are fetched, run and postprocessed once.
        first: dict[str, Future[_Prepared]] = {}
        for item in job.inputs:
            key = item if isinstance(item, str) else item.model_dump_json()
            if key not in first:
                served.permits.acquire()
                prepare = partial(
                    self._prepare, job.id, served, item, call, rank, expires_at, progress
                )
                # A text needs no fetch: preparing it on the job's own thread saves a hand-off
                # to the prefetch pool and back (each one a wait for the GIL in a busy front).
                first[key] = (
                    _done(prepare) if isinstance(item, str) else self._prefetch.submit(prepare)
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
                failed = ModelError(
                    f"the pipeline could not postprocess this input ({type(exc).__name__})"
                )
                errors.append(failed.to_info())
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
        job_id: str,
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
        fed: list[WorkItem] = []
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
            make = partial(_work_item, served.staged, call, rank, expires_at)
            try:
                parts = served.staged.iter_parts(loaded, call)
                waited_s = _feed(served, parts, make, progress, fed)
                made_s = time.perf_counter() - fetched - waited_s
                STAGE_SECONDS.labels(name, "preprocess").observe(made_s)
            except (InputError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - the pipeline rejects this input
                # Library and subprocess (Tesseract) text stays in the log: it can quote files.
                log.warning("job %s: %s could not preprocess an input: %r", job_id, name, exc)
                raise ModelError(
                    f"the pipeline could not preprocess this input ({type(exc).__name__})"
                ) from exc
            if not fed:
                raise ModelError("the pipeline produced nothing to run for this input")
        except MemoryError as exc:
            # The worker's RLIMIT_DATA (worker/memory.py) failed this input's allocation; what it
            # had allocated is freed with it, and the job's other inputs go on.
            _release_when_done(fed, served.permits)
            log.warning("input of model %s ran out of memory while being prepared", name)
            raise OutOfMemory(
                "preparing this input needed more memory than the worker may use"
            ) from exc
        except BaseException:
            _release_when_done(fed, served.permits)
            raise
        _release_when_done(fed, served.permits)
        return _Prepared([work.future for work in fed], key)


def _work_item(
    staged: StagedPipeline, call: CallParams, rank: int, expires_at: float | None, part: Any
) -> WorkItem:
    return WorkItem(
        part=part,
        group=staged.group_key(part, call),
        call=call,
        length=staged.part_length(part),
        lane_rank=rank,
        expires_at=expires_at,
    )


def _feed(
    served: ServedModel,
    parts: Iterator[Any],
    make: Callable[[Any], WorkItem],
    progress: ProgressTracker,
    fed: list[WorkItem],
) -> float:
    """Hand `parts` to the batcher as they are made, appending them to `fed`; returns the
    seconds spent waiting for forward passes. At most two batches of one input's parts wait for
    a forward pass at a time, so a long input's chunks are never all held at once (a 16 s clip
    cut into 0.05 s chunks once made ~480 of them, 2.5 GB, before the first forward). The wait
    holds a prefetch thread, as making the chunks did before."""
    limit = served.batcher.max_batch_size
    window = threading.Semaphore(2 * limit)
    ready: list[WorkItem] = []

    def flush() -> None:
        if ready:
            progress.track([work.future for work in ready])
            served.batcher.submit(list(ready))
            fed.extend(ready)
            ready.clear()

    waited_s = 0.0
    for part in parts:
        if not window.acquire(blocking=False):
            flush()  # the parts held here must reach the batcher before this waits on them
            began = time.perf_counter()
            window.acquire()
            waited_s += time.perf_counter() - began
        work = make(part)
        work.future.add_done_callback(lambda _: window.release())
        ready.append(work)
        if len(ready) >= limit:
            flush()
    flush()
    return waited_s


def _release_when_done(items: list[WorkItem], permits: threading.Semaphore) -> None:
    """Release the input's permit once all its parts are done (at once when it has none)."""
    if not items:
        permits.release()
        return
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


def _done(call: Callable[[], _Prepared]) -> Future[_Prepared]:
    """`call()` run now, as a finished future (its exception kept, as the pool's would be)."""
    future: Future[_Prepared] = Future()
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001 - re-raised by future.result() in _execute
        future.set_exception(exc)
    return future


def _count(job: JobMessage, doc: JobDocument, errors: list[ErrorInfo | None]) -> None:
    JOBS.labels(job.model, doc.status).inc()
    for error in errors:
        INPUTS.labels(job.model, "ok" if error is None else error.type).inc()


def _fail_all(count: int, error: PipeqError) -> tuple[list[Any], list[ErrorInfo | None]]:
    return [None] * count, [error.to_info()] * count


def _poisoned(job: JobMessage, deliveries: int) -> PoisonJob:
    # Each earlier delivery ended with its worker dead (OOM kill, segfault, SIGKILL) before the
    # ack; running it again would take down the next worker the same way.
    runs = deliveries - 1
    log.error("job %s: its worker died on each of its %d deliveries; failing it", job.id, runs)
    return PoisonJob(f"the job was delivered {runs} times and its worker died each time")


def _final_status(errors: list[ErrorInfo | None]) -> str:
    return "expired" if all(e is not None and e.type == "Expired" for e in errors) else "failed"
