"""Running jobs: claim their records, prepare their inputs ahead, batch, postprocess, store.

The engine (worker/engine.py) hands the runner windows of jobs: `claim` takes a window's records
in two round trips, `start` prepares each input and hands its parts to the model's batcher (a
text on the calling thread, parts of a window sent in one message; media on the prefetch pool),
and a `JobRun` says when every input of its job is answered. `finish` postprocesses a run into
its job document and `store` writes a window of them in one round trip. No thread waits on a
job: a job in flight costs its futures, not a thread.

Each model holds at most `max_prepared` prepared media inputs (its permits), which bounds memory
however many jobs are in flight.
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

from pipeq.config.errors import (
    ErrorInfo,
    Expired,
    InputError,
    InvalidParams,
    ModelError,
    OutOfMemory,
    PipeqError,
    PoisonJob,
)
from pipeq.config.settings import Settings
from pipeq.core.jobs import DataRef, Input, JobDocument, JobMessage, PathRef
from pipeq.core.ledger import QueueLedger
from pipeq.core.records import JobRecords
from pipeq.core.stores import ResultStores
from pipeq.worker.batcher import LANE_RANK, PartSink, WorkItem
from pipeq.worker.forward_client import BLOCK_ROWS
from pipeq.worker.media import MediaLoader
from pipeq.worker.metrics import (
    CACHE,
    EXPIRED,
    INPUTS,
    JOBS,
    QUEUE_WAIT,
    STAGE_SECONDS,
    BatchMetrics,
)
from pipeq.worker.pipelines import CallParams, StagedPipeline
from pipeq.worker.progress import ProgressTracker
from pipeq.worker.result_cache import MISS, ResultCache, cache_key

log = logging.getLogger(__name__)

Submit = Callable[[list[WorkItem]], None]
_LOCAL_REFS = (PathRef, DataRef)


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


@dataclass
class _Text:
    """A text input waiting for its window's tokenizer call."""

    item: str
    call: CallParams
    expires_at: float | None
    progress: ProgressTracker
    make: Callable[[Any], WorkItem]
    prepare: Callable[..., _Prepared]  # the one-text way, if the window's call fails
    prepared: Future[_Prepared]


class _Window:
    """What `JobRunner.start` gathers over a window: texts to tokenize together, and parts held
    to go to each model's batcher in one submission."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = models
        self.texts: dict[tuple[str, str], list[_Text]] = {}
        self._held: dict[str, list[WorkItem]] = {}

    @staticmethod
    def tokenizes(served: ServedModel) -> bool:
        # A cached model looks each text up first, one by one (worker/result_cache.py).
        return served.staged.tokenizes_windows and served.staged.spec.cache_ttl_s is None

    def hold(self, model: str, items: list[WorkItem]) -> None:
        self._held.setdefault(model, []).extend(items)

    def send_blocks(self, model: str) -> None:
        """Send the model's held parts once they fill a block: the forward process starts on a
        window's first images while the rest are read."""
        items = self._held.get(model)
        if items and len(items) >= BLOCK_ROWS:
            self._models[model].batcher.submit(items)
            self._held[model] = []

    def send_held(self) -> None:
        for model, items in self._held.items():
            if items:
                self._models[model].batcher.submit(items)
        self._held.clear()


class JobRun:
    """One claimed job on its way: each input's preparation, and a callback once every input is
    answered. Callbacks arrive on the threads that resolve the futures (the forward client's
    reader, the prefetch pool): each is a locked decrement, and the last hands the run on."""

    def __init__(
        self,
        job: JobMessage,
        claimed: JobDocument,
        started: float,
        delivery: Any,
        progress: ProgressTracker,
    ) -> None:
        self.job = job
        self.claimed = claimed
        self.started = started
        self.delivery = delivery
        self.progress = progress
        self.prepared: list[Future[_Prepared]] = []
        self.failed: PipeqError | None = None
        self._pending = 1  # held until `seal`, so the run cannot be ready while it is started
        self._lock = threading.Lock()
        self._on_ready: Callable[[JobRun], None] | None = None

    def watch(self, prepared: Future[_Prepared]) -> None:
        with self._lock:
            self._pending += 1
        prepared.add_done_callback(self._prepared)

    def seal(self, on_ready: Callable[[JobRun], None]) -> None:
        """Every input is watched: call `on_ready(self)` once all are answered."""
        self._on_ready = on_ready
        self._settle()

    def _prepared(self, future: Future[_Prepared]) -> None:
        parts = [] if future.exception() is not None else future.result().futures
        if not parts:
            self._settle()
            return
        left = [len(parts)]

        def part_done(_: Future[Any]) -> None:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._settle()

        for part in parts:
            part.add_done_callback(part_done)

    def _settle(self) -> None:
        with self._lock:
            self._pending -= 1
            ready = self._pending == 0
        if ready and self._on_ready is not None:
            self._on_ready(self)


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

    def claim(
        self, deliveries: list[tuple[dict[str, Any], Any]], worker: str
    ) -> list[JobRun | None]:
        """Mark each job (message, delivery) running and count its delivery, one round trip for
        the window's records and one for its claims. None for a message that is not a job, and
        for a job cancelled, already finished (a redelivery), or claimed first by another copy."""
        started = time.time()
        jobs = [_job(message) for message, _ in deliveries]
        valid = [job for job in jobs if job is not None]
        held = dict(
            zip([j.id for j in valid], self.records.get_many([j.id for j in valid]), strict=True)
        )
        claims: list[JobDocument | None] = [None] * len(jobs)
        fresh: list[JobDocument] = []
        changes: list[tuple[int, JobDocument, tuple[str, ...], int | None]] = []
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
                self._not_running(job, current, backlog)
        if fresh:
            self.records.put_many(fresh)
        answers = self.records.transition_many([change[1:] for change in changes])
        for (index, running, from_statuses, _), (changed, now) in zip(
            changes, answers, strict=True
        ):
            job = jobs[index]
            assert job is not None
            if changed:
                claims[index] = running
                if from_statuses == ("queued",):
                    backlog.append(job)
            elif now is not None:
                self._not_running(job, now, backlog)
        self._leave_backlog(backlog)
        runs: list[JobRun | None] = []
        for job, claim, (_, delivery) in zip(jobs, claims, deliveries, strict=True):
            if job is None or claim is None:
                runs.append(None)
                continue
            QUEUE_WAIT.labels(job.model, job.lane).observe(max(0.0, started - job.submitted_at))
            runs.append(JobRun(job, claim, started, delivery, ProgressTracker()))
        return runs

    @staticmethod
    def _not_running(job: JobMessage, current: JobDocument, backlog: list[JobMessage]) -> None:
        if current.status == "cancelled":
            backlog.append(job)  # its message is dropped: it leaves the backlog now
        log.info("job %s is %s; not running it", job.id, current.status)

    def _leave_backlog(self, jobs: list[JobMessage]) -> None:
        # Once per job: when claimed from queued, or when its message is dropped as cancelled.
        if self.ledger is not None and jobs:
            self.ledger.take_many([(job.model, job.lane, len(job.inputs)) for job in jobs])

    def publish_progress(self, runs: list[JobRun]) -> None:
        """Write the progress of those `runs` whose counts changed, in one round trip."""
        changes: list[tuple[JobDocument, tuple[str, ...], int | None]] = []
        for run in runs:
            progress = run.progress.changed()
            if progress is not None:
                # Guarded by the count: a worker whose job was claimed again writes no more.
                doc = run.claimed.model_copy(update={"progress": progress})
                changes.append((doc, ("running",), run.claimed.deliveries))
        if changes:
            self.records.transition_many(changes)

    def start(self, runs: list[JobRun], on_ready: Callable[[JobRun], None]) -> None:
        """Prepare every input of `runs` and hand its parts to the batchers; `on_ready(run)` is
        called once a run's inputs are all answered (perhaps at once, on this thread)."""
        window = _Window(self.models)
        for run in runs:
            try:
                self._start(run, window)
            except Exception as exc:  # noqa: BLE001 - pipeq's bug fails this job, not the window
                log.exception("job %s could not be started", run.job.id)
                run.failed = ModelError(f"the job could not be started ({type(exc).__name__})")
        for (model, _), texts in window.texts.items():
            self._prepare_texts(self.models[model], texts, window)
        window.send_held()
        for run in runs:
            run.seal(on_ready)

    def _prepare_texts(self, served: ServedModel, texts: list[_Text], window: _Window) -> None:
        """The window's texts of one model and call, tokenized in one call."""
        name = served.staged.spec.name
        began = time.perf_counter()
        ready: list[_Text] = []
        for text in texts:
            try:
                if text.expires_at is not None and time.time() > text.expires_at:
                    EXPIRED.labels(name, "prefetch").inc()
                    raise Expired("deadline passed before this input was fetched")
                served.staged.load(text.item, self.media)
                ready.append(text)
            except PipeqError as exc:
                text.prepared.set_exception(exc)
        parts: list[Any] | None = None
        if ready:
            try:
                parts = served.staged.preprocess_texts([t.item for t in ready], ready[0].call)
            except Exception:  # noqa: BLE001 - a text the tokenizer refuses: each alone, as usual
                parts = None
        each_s = (time.perf_counter() - began) / max(1, len(texts))
        for index, text in enumerate(ready):
            if parts is None:
                _complete(text.prepared, partial(text.prepare, None, partial(window.hold, name)))
                continue
            STAGE_SECONDS.labels(name, "preprocess").observe(each_s)
            work = text.make(parts[index])
            text.progress.track([work.future])
            window.hold(name, [work])
            text.prepared.set_result(_Prepared([work.future]))

    def _start(self, run: JobRun, window: _Window) -> None:
        job = run.job
        deliveries = run.claimed.deliveries or 0
        if deliveries > self.settings.max_deliveries:
            run.failed = _poisoned(job, deliveries)
            return
        served = self.models.get(job.model)
        if served is None:
            run.failed = ModelError(f"this worker does not serve {job.model!r}")
            return
        expires_at = None if job.deadline_s is None else job.submitted_at + job.deadline_s
        if expires_at is not None and time.time() > expires_at:
            EXPIRED.labels(job.model, "queue").inc(len(job.inputs))
            run.failed = Expired(f"not started within deadline_s={job.deadline_s}")
            return
        try:
            call = served.staged.call_params(job.params)
        except InvalidParams as exc:
            # At submit the same check answered 422; this message was published another way.
            log.warning("job %s: %s", job.id, exc)
            run.failed = exc
            return
        except Exception as exc:  # noqa: BLE001 - the pipeline's own complaint about the params
            log.warning("job %s: the pipeline refused its params: %r", job.id, exc)
            run.failed = InvalidParams(f"the pipeline refused these params ({type(exc).__name__})")
            return
        rank = LANE_RANK[job.lane]
        # Identical inputs of one job are fetched, run and postprocessed once.
        first: dict[str, Future[_Prepared]] = {}
        for item in job.inputs:
            key = item if isinstance(item, str) else item.model_dump_json()
            if key not in first:
                prepare = partial(
                    self._prepare, job.id, served, item, call, rank, expires_at, run.progress
                )
                future: Future[_Prepared]
                if isinstance(item, str) and window.tokenizes(served):
                    future = Future()
                    make = partial(_work_item, served.staged, call, rank, expires_at)
                    text = _Text(item, call, expires_at, run.progress, make, prepare, future)
                    window.texts.setdefault((job.model, call.key), []).append(text)
                elif isinstance(item, str) and not served.staged.chunked:
                    # A text needs no fetch and makes one part: prepared here, its part sent with
                    # the window's (one message to the forward process, no hand-off to a pool).
                    future = Future()
                    _complete(future, partial(prepare, None, partial(window.hold, job.model)))
                elif (
                    isinstance(item, _LOCAL_REFS)
                    and served.staged.reads_inline
                    and served.permits.acquire(blocking=False)
                ):
                    # A local file or inline bytes, only read here (JPEGs are decoded on the GPU):
                    # a pool thread per input cost more than the read, and parts submitted one at
                    # a time reached the forward process in blocks of one.
                    future = Future()
                    hold = partial(window.hold, job.model)
                    _complete(future, partial(prepare, served.permits, hold))
                    window.send_blocks(job.model)
                else:
                    if not served.permits.acquire(blocking=False):
                        window.send_held()  # held parts must not wait behind these permits
                        served.permits.acquire()
                    future = self._prefetch.submit(prepare, served.permits, served.batcher.submit)
                first[key] = future
                run.watch(future)
            run.prepared.append(first[key])

    def finish(self, run: JobRun) -> JobDocument:
        """The run's job document, its inputs postprocessed (called once all are answered)."""
        job = run.job
        if run.failed is not None:
            outputs, errors = _fail_all(len(job.inputs), run.failed)
            cached = 0
        else:
            outputs, errors, cached = self._collect(run)
        finished = time.time()
        failed_all = all(error is not None for error in errors)
        progress = run.progress.snapshot()
        return run.claimed.model_copy(
            update={
                "status": _final_status(errors) if failed_all else "succeeded",
                "outputs": outputs,
                "errors": errors,
                "cached": True if cached and cached == len(outputs) else None,
                "progress": progress,
                "timings": {
                    **run.claimed.timings,
                    "started_at": run.started,
                    "finished_at": finished,
                    "queued_s": run.started - job.submitted_at,
                    "run_s": finished - run.started,
                },
            }
        )

    def store(self, runs: list[JobRun], docs: list[JobDocument]) -> list[JobDocument]:
        """Write finished jobs (one round trip for those kept inline); returns their records as
        stored (outputs not inline when they went to S3)."""
        began = time.perf_counter()
        records = self.results.save_many(
            [(doc, run.job.store) for run, doc in zip(runs, docs, strict=True)]
        )
        each_s = (time.perf_counter() - began) / max(1, len(runs))
        for run, record in zip(runs, records, strict=True):
            STAGE_SECONDS.labels(run.job.model, "store").observe(each_s)
            _count(run.job, record, record.errors or [])
        return records

    def _collect(self, run: JobRun) -> tuple[list[Any], list[ErrorInfo | None], int]:
        """Outputs and errors per input, and how many outputs came from the cache."""
        job = run.job
        served = self.models[job.model]
        call = served.staged.call_params(job.params)
        outputs: list[Any] = []
        errors: list[ErrorInfo | None] = []
        answered: dict[int, tuple[Any, ErrorInfo | None]] = {}
        cached = 0
        for future in run.prepared:
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
                model_outputs = [part.result() for part in ready.futures]
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
        permits: threading.Semaphore | None,
        submit: Submit,
    ) -> _Prepared:
        """Fetch, decode and preprocess one input, and hand its parts to `submit` (or find its
        output in the cache). `permits`: the one this input holds, released once its parts are
        answered."""
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
                    _release_when_done([], permits)
                    return _Prepared([], key, hit)
            make = partial(_work_item, served.staged, call, rank, expires_at)
            try:
                parts = served.staged.iter_parts(loaded, call)
                waited_s = _feed(served, parts, make, progress, fed, submit)
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
            _release_when_done(fed, permits)
            log.warning("input of model %s ran out of memory while being prepared", name)
            raise OutOfMemory(
                "preparing this input needed more memory than the worker may use"
            ) from exc
        except BaseException:
            _release_when_done(fed, permits)
            raise
        _release_when_done(fed, permits)
        return _Prepared([work.future for work in fed], key)


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
    submit: Submit,
) -> float:
    """Hand `parts` to `submit` as they are made, appending them to `fed`; returns the
    seconds spent waiting for forward passes. At most two batches of one input's parts wait for
    a forward pass at a time, so a long input's chunks are never all held at once (a 16 s clip
    cut into 0.05 s chunks once made ~480 of them, 2.5 GB, before the first forward). The wait
    holds a prefetch thread, as making the chunks did before."""
    limit = served.batcher.max_batch_size
    # Only a chunked input makes more than one part to hold back.
    window = threading.Semaphore(2 * limit) if served.staged.chunked else None
    ready: list[WorkItem] = []

    def flush() -> None:
        if ready:
            progress.track([work.future for work in ready])
            submit(list(ready))
            fed.extend(ready)
            ready.clear()

    waited_s = 0.0
    for part in parts:
        work = make(part)
        if window is not None:
            if not window.acquire(blocking=False):
                flush()  # the parts held here must reach the batcher before this waits on them
                began = time.perf_counter()
                window.acquire()
                waited_s += time.perf_counter() - began
            work.future.add_done_callback(partial(_release, window))
        ready.append(work)
        if len(ready) >= limit:
            flush()
    flush()
    return waited_s


def _release_when_done(items: list[WorkItem], permits: threading.Semaphore | None) -> None:
    """Release the input's permit once all its parts are done (at once when it has none)."""
    if permits is None:
        return
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


def _complete(future: Future[_Prepared], call: Callable[[], _Prepared]) -> None:
    """Resolve `future` with `call()` run now (its exception kept, as the pool's would be)."""
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001 - re-raised by future.result() in _collect
        future.set_exception(exc)


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


def _release(window: threading.Semaphore, _: Future[Any]) -> None:
    window.release()
