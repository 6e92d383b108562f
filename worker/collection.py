"""Collecting a run: each input's parts answered, postprocessed into the job document, and a
window of documents stored in one round trip."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

from pipeq.config.errors import ErrorInfo, ModelError, PipeqError
from pipeq.core.jobs import JobDocument
from pipeq.core.stores import ResultStores
from pipeq.worker.job_run import JobRun, Prepared, ServedModel
from pipeq.worker.metrics import JobMetrics
from pipeq.worker.pipelines import CallParams
from pipeq.worker.result_cache import MISS, CacheHook

log = logging.getLogger(__name__)


class Collection:
    def __init__(
        self,
        models: dict[str, ServedModel],
        results: ResultStores,
        metrics: JobMetrics,
        cache: CacheHook,
    ) -> None:
        self.models = models
        self.results = results
        self.metrics = metrics
        self.cache = cache

    def finish(self, run: JobRun) -> JobDocument:
        """The run's job document, its inputs postprocessed (called once all are answered)."""
        job = run.job
        outputs: list[Any]
        errors: list[ErrorInfo | None]
        if run.failed is not None:
            outputs, errors = [None] * len(job.inputs), [run.failed.to_info()] * len(job.inputs)
            cached = 0
        else:
            outputs, errors, cached = self._collect(run)
        finished = time.time()
        failed_all = all(error is not None for error in errors)
        return run.claimed.model_copy(
            update={
                "status": _final_status(errors) if failed_all else "succeeded",
                "outputs": outputs,
                "errors": errors,
                "cached": True if cached and cached == len(outputs) else None,
                "progress": run.progress.snapshot(),
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
            self.metrics.on_stage(run.job.model, "store", each_s)
            self.metrics.on_stored(run.job.model, record.status, record.errors or [])
        return records

    def _collect(self, run: JobRun) -> tuple[list[Any], list[ErrorInfo | None], int]:
        """Outputs and errors per input, and how many outputs came from the cache."""
        served = self.models[run.job.model]
        call = served.staged.call_params(run.job.params)
        outputs: list[Any] = []
        errors: list[ErrorInfo | None] = []
        answered: dict[int, tuple[Any, ErrorInfo | None]] = {}
        cached = 0
        for future in run.prepared:
            if id(future) not in answered:  # identical inputs of a job share one future
                answered[id(future)] = self._answer(run, served, call, future)
                cached += _from_cache(future)
            output, error = answered[id(future)]
            outputs.append(output)
            errors.append(error)
        return outputs, errors, cached

    def _answer(
        self, run: JobRun, served: ServedModel, call: CallParams, future: Future[Prepared]
    ) -> tuple[Any, ErrorInfo | None]:
        """One input's output, or its error."""
        try:
            ready = future.result()
            if ready.cached is not MISS:
                return ready.cached, None
            model_outputs = [part.result() for part in ready.futures]
            began = time.perf_counter()
            output = served.staged.postprocess(model_outputs, call)
            self.metrics.on_stage(run.job.model, "postprocess", time.perf_counter() - began)
            self.cache.remember(served.staged.spec, ready.cache_key, output)
            return output, None
        except PipeqError as exc:
            return None, exc.to_info()
        except Exception as exc:  # noqa: BLE001 - postprocess of one input must not sink the job
            log.exception("postprocess failed in job %s", run.job.id)
            failed = ModelError(
                f"the pipeline could not postprocess this input ({type(exc).__name__})"
            )
            return None, failed.to_info()


def _from_cache(future: Future[Prepared]) -> bool:
    return future.exception() is None and future.result().cached is not MISS


def _final_status(errors: list[ErrorInfo | None]) -> str:
    return "expired" if all(e is not None and e.type == "Expired" for e in errors) else "failed"
