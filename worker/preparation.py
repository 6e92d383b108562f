"""Preparing a window of claimed jobs: each input fetched, decoded and preprocessed (or found in
the result cache), its parts handed to the model's batcher. Texts of a window go through one
tokenizer call on the calling thread; media go to the prefetch pool, or are read on the calling
thread where reading is all there is to do. No thread waits on a job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeq.config.errors import (
    Expired,
    InputError,
    InvalidParams,
    ModelError,
    OutOfMemory,
    PipeqError,
    PoisonJob,
)
from pipeq.config.settings import Settings
from pipeq.core.inputs import DataRef, Input, PathRef
from pipeq.core.jobs import JobMessage
from pipeq.worker.batcher import LANE_RANK, WorkItem
from pipeq.worker.feeding import SendWindow, Submit, complete, feed, under_permit, work_item
from pipeq.worker.job_run import JobRun, Prepared, ServedModel
from pipeq.worker.media import MediaLoader
from pipeq.worker.metrics import JobMetrics
from pipeq.worker.pipelines import CallParams
from pipeq.worker.result_cache import MISS, CacheHook

log = logging.getLogger(__name__)

_LOCAL_REFS = (PathRef, DataRef)
# Prepares one input: (submit, fed) -> Prepared, fed collecting the parts handed on.
Prepare = Callable[[Submit, list[WorkItem]], Prepared]


@dataclass(frozen=True)
class _Route:
    """What every input of one job shares on its way to the batcher."""

    run: JobRun
    served: ServedModel
    call: CallParams
    rank: int
    expires_at: float | None

    def work_item(self, part: Any) -> WorkItem:
        return work_item(self.served.staged, self.call, self.rank, self.expires_at, part)


@dataclass
class _Text:
    """A text input waiting for its window's tokenizer call."""

    item: str
    route: _Route
    prepare: Prepare  # the one-text way, if the window's call fails
    prepared: Future[Prepared]


class Preparation:
    def __init__(
        self,
        settings: Settings,
        models: dict[str, ServedModel],
        media: MediaLoader,
        metrics: JobMetrics,
        cache: CacheHook,
        prefetch_threads: int,
    ) -> None:
        self.settings = settings
        self.models = models
        self.media = media
        self.metrics = metrics
        self.cache = cache
        self._prefetch = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="prefetch")

    def close(self) -> None:
        self._prefetch.shutdown(wait=True, cancel_futures=True)

    def start(self, runs: list[JobRun], on_ready: Callable[[JobRun], None]) -> None:
        """Prepare every input of `runs` and hand its parts to the batchers; `on_ready(run)` is
        called once a run's inputs are all answered (perhaps at once, on this thread)."""
        window = SendWindow(self.models)
        texts: dict[tuple[str, str], list[_Text]] = {}
        for run in runs:
            try:
                route = self._guard(run)
                if route is not None:
                    self._start(route, window, texts)
            except Exception as exc:  # noqa: BLE001 - pipeq's bug fails this job, not the window
                log.exception("job %s could not be started", run.job.id)
                run.failed = ModelError(f"the job could not be started ({type(exc).__name__})")
        for (model, _), same_call in texts.items():
            self._prepare_texts(self.models[model], same_call, window)
        window.send_held()
        for run in runs:
            run.seal(on_ready)

    def _guard(self, run: JobRun) -> _Route | None:
        """The job's route to its batcher, or None with `run.failed` set: a poison job, a model
        this worker does not serve, a deadline passed, params the pipeline refuses."""
        job = run.job
        deliveries = run.claimed.deliveries or 0
        if deliveries > self.settings.max_deliveries:
            run.failed = _poisoned(job, deliveries)
            return None
        served = self.models.get(job.model)
        if served is None:
            run.failed = ModelError(f"this worker does not serve {job.model!r}")
            return None
        expires_at = None if job.deadline_s is None else job.submitted_at + job.deadline_s
        if expires_at is not None and time.time() > expires_at:
            self.metrics.on_expired(job.model, "queue", len(job.inputs))
            run.failed = Expired(f"not started within deadline_s={job.deadline_s}")
            return None
        try:
            call = served.staged.call_params(job.params)
        except InvalidParams as exc:
            # At submit the same check answered 422; this message was published another way.
            log.warning("job %s: %s", job.id, exc)
            run.failed = exc
            return None
        except Exception as exc:  # noqa: BLE001 - the pipeline's own complaint about the params
            log.warning("job %s: the pipeline refused its params: %r", job.id, exc)
            run.failed = InvalidParams(f"the pipeline refused these params ({type(exc).__name__})")
            return None
        return _Route(run, served, call, LANE_RANK[job.lane], expires_at)

    def _start(
        self, route: _Route, window: SendWindow, texts: dict[tuple[str, str], list[_Text]]
    ) -> None:
        run = route.run
        # Identical inputs of one job are fetched, run and postprocessed once.
        first: dict[str, Future[Prepared]] = {}
        for item in run.job.inputs:
            key = item if isinstance(item, str) else item.model_dump_json()
            if key not in first:
                first[key] = self._send(route, item, window, texts)
                run.watch(first[key])
            run.prepared.append(first[key])

    def _send(
        self,
        route: _Route,
        item: Input,
        window: SendWindow,
        texts: dict[tuple[str, str], list[_Text]],
    ) -> Future[Prepared]:
        """One input on its way: where it is prepared depends on what preparing it costs."""
        served, model = route.served, route.run.job.model
        prepare: Prepare = partial(self._prepare, route, item)
        hold = partial(window.hold, model)
        future: Future[Prepared] = Future()
        if isinstance(item, str) and served.staged.tokenizes_windows and _uncached(served):
            texts.setdefault((model, route.call.key), []).append(
                _Text(item, route, prepare, future)
            )
        elif isinstance(item, str) and not served.staged.chunked:
            # A text needs no fetch and makes one part: prepared here, its part sent with the
            # window's (one message to the forward process, no hand-off to a pool).
            complete(future, partial(prepare, hold, []))
        elif (
            isinstance(item, _LOCAL_REFS)
            and served.staged.reads_inline
            and window.take_permit(served, wait=False)
        ):
            # A local file or inline bytes, only read here (JPEGs are decoded on the GPU): a pool
            # thread per input cost more than the read, and parts submitted one at a time
            # reached the forward process in blocks of one.
            complete(future, partial(under_permit, served.permits, partial(prepare, hold)))
            window.send_blocks(model)
        else:
            window.take_permit(served, wait=True)
            submit = served.batcher.submit
            future = self._prefetch.submit(under_permit, served.permits, partial(prepare, submit))
        return future

    def _prepare_texts(self, served: ServedModel, texts: list[_Text], window: SendWindow) -> None:
        """The window's texts of one model and call, tokenized in one call."""
        name = served.staged.spec.name
        began = time.perf_counter()
        ready: list[_Text] = []
        for text in texts:
            try:
                self._check_deadline(name, text.route.expires_at)
                served.staged.load(text.item, self.media)
                ready.append(text)
            except PipeqError as exc:
                text.prepared.set_exception(exc)
        parts: list[Any] | None = None
        if ready:
            try:
                call = ready[0].route.call
                parts = served.staged.preprocess_texts([t.item for t in ready], call)
            except Exception:  # noqa: BLE001 - a text the tokenizer refuses: each alone, as usual
                parts = None
        each_s = (time.perf_counter() - began) / max(1, len(texts))
        for index, text in enumerate(ready):
            if parts is None:
                complete(text.prepared, partial(text.prepare, partial(window.hold, name), []))
                continue
            self.metrics.on_stage(name, "preprocess", each_s)
            work = text.route.work_item(parts[index])
            text.route.run.progress.track([work.future])
            window.hold(name, [work])
            text.prepared.set_result(Prepared([work.future]))

    def _check_deadline(self, model: str, expires_at: float | None) -> None:
        if expires_at is not None and time.time() > expires_at:
            self.metrics.on_expired(model, "prefetch")
            raise Expired("deadline passed before this input was fetched")

    def _prepare(self, route: _Route, item: Input, submit: Submit, fed: list[WorkItem]) -> Prepared:
        """Fetch, decode and preprocess one input, and hand its parts to `submit`, appending
        them to `fed` (or find its output in the cache)."""
        served = route.served
        spec = served.staged.spec
        try:
            self._check_deadline(spec.name, route.expires_at)
            began = time.perf_counter()
            loaded = served.staged.load(item, self.media)
            fetched = time.perf_counter()
            self.metrics.on_stage(spec.name, "fetch", fetched - began)
            key = self.cache.key(spec, route.call.key, loaded)
            if key is not None:
                hit = self.cache.lookup(key)
                self.metrics.on_cache(spec.name, hit is not MISS)
                if hit is not MISS:
                    return Prepared([], key, hit)
            waited_s = _preprocess(route, loaded, fed, submit)
            self.metrics.on_stage(spec.name, "preprocess", time.perf_counter() - fetched - waited_s)
        except MemoryError as exc:
            # The worker's RLIMIT_DATA (worker/memory.py) failed this input's allocation; what it
            # had allocated is freed with it, and the job's other inputs go on.
            log.warning("input of model %s ran out of memory while being prepared", spec.name)
            raise OutOfMemory(
                "preparing this input needed more memory than the worker may use"
            ) from exc
        return Prepared([work.future for work in fed], key)


def _preprocess(route: _Route, loaded: Any, fed: list[WorkItem], submit: Submit) -> float:
    """The input's parts fed to `submit`; returns the seconds spent waiting on the batcher."""
    served, run = route.served, route.run
    try:
        parts = served.staged.iter_parts(loaded, route.call)
        waited_s = feed(served, parts, route.work_item, run.progress, fed, submit)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the pipeline rejects this input
        # Library and subprocess (Tesseract) text stays in the log: it can quote files.
        name = served.staged.spec.name
        log.warning("job %s: %s could not preprocess an input: %r", run.job.id, name, exc)
        raise ModelError(
            f"the pipeline could not preprocess this input ({type(exc).__name__})"
        ) from exc
    if not fed:
        raise ModelError("the pipeline produced nothing to run for this input")
    return waited_s


def _uncached(served: ServedModel) -> bool:
    # A cached model looks each text up first, one by one (worker/result_cache.py).
    return served.staged.spec.cache_ttl_s is None


def _poisoned(job: JobMessage, deliveries: int) -> PoisonJob:
    # Each earlier delivery ended with its worker dead (OOM kill, segfault, SIGKILL) before the
    # ack; running it again would take down the next worker the same way.
    runs = deliveries - 1
    log.error("job %s: its worker died on each of its %d deliveries; failing it", job.id, runs)
    return PoisonJob(f"the job was delivered {runs} times and its worker died each time")
