"""The job path, in order: claim a window's records (worker/claims.py), guard and prepare each
job's inputs and hand their parts to the model's batcher (worker/preparation.py), then, once a
run's inputs are answered, collect it into its job document and store a window of them
(worker/collection.py). Hooks hang around the path as they do around the batcher: metrics,
capacity (what admission control reads), the result cache and progress.

The engine (worker/engine.py) calls these steps; no thread waits on a job: a job in flight costs
its futures, not a thread. Each model holds at most `max_prepared` prepared media inputs (its
permits, worker/feeding.py), which bounds memory however many jobs are in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument
from pipeq.core.ledger import QueueLedger
from pipeq.core.records import JobRecords
from pipeq.core.stores import ResultStores
from pipeq.worker.capacity import Capacity
from pipeq.worker.claims import claim_jobs
from pipeq.worker.collection import Collection
from pipeq.worker.job_run import JobRun, ServedModel
from pipeq.worker.media import MediaLoader
from pipeq.worker.metrics import JobMetrics
from pipeq.worker.preparation import Preparation
from pipeq.worker.progress import ProgressPublisher
from pipeq.worker.result_cache import CacheHook, ResultCache


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
        self.records = records
        self.media = media
        self.ledger = ledger
        self.metrics = JobMetrics()
        self.capacity = Capacity(ledger)
        self.progress = ProgressPublisher(records)
        hook = CacheHook(cache)
        self.preparation = Preparation(
            settings, models, media, self.metrics, hook, prefetch_threads
        )
        self.collection = Collection(models, ResultStores(settings, records), self.metrics, hook)

    def close(self) -> None:
        self.preparation.close()

    def claim(
        self, deliveries: list[tuple[dict[str, Any], Any]], worker: str
    ) -> list[JobRun | None]:
        return claim_jobs(self.records, self.capacity, self.metrics, deliveries, worker)

    def start(self, runs: list[JobRun], on_ready: Callable[[JobRun], None]) -> None:
        self.preparation.start(runs, on_ready)

    def publish_progress(self, runs: list[JobRun]) -> None:
        self.progress.publish([(run.claimed, run.progress) for run in runs])

    def finish(self, run: JobRun) -> JobDocument:
        return self.collection.finish(run)

    def store(self, runs: list[JobRun], docs: list[JobDocument]) -> list[JobDocument]:
        return self.collection.store(runs, docs)
