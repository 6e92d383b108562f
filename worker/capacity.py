"""The job path's capacity hook: what the queue ledger (admission control) counts as waiting."""

from __future__ import annotations

from pipeq.core.jobs import JobMessage
from pipeq.core.ledger import QueueLedger


class Capacity:
    def __init__(self, ledger: QueueLedger | None) -> None:
        self.ledger = ledger

    def left_backlog(self, jobs: list[JobMessage]) -> None:
        """Once per job: when it is claimed from queued, or its message dropped as cancelled."""
        if self.ledger is not None and jobs:
            self.ledger.take_many([(job.model, job.lane, len(job.inputs)) for job in jobs])
