"""Re-publishing jobs that kombu's Redis transport lost.

kombu takes a message off its queue (BRPOP) and only then records it as unacked
(`_brpop_read` -> `QoS.append`): a worker killed between the two, or with the reply still unread
in its socket, loses the message, and its job would stay `queued` forever
(tests/reliability/test_worker_kill.py lost 2, and once 41, of 2,000 jobs to five SIGKILLs).
So every job keeps its message in its record while it is queued (core/records.py), and a
worker sweeps, for each lane it serves whose queue is empty, the jobs still queued that were
published more than `grace_s` ago, and publishes them again once it has seen them so at two
sweeps `grace_s` apart. One sighting is not enough: a job that waited long in a busy queue is
stale the moment a worker takes its message, until the worker claims it; a copy published then
could run the job a second time after its first run's record was collected and deleted (a
backfill deletes what it has written out). Whichever copy claims a job first runs it; the other
finds it running or done and is dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from prometheus_client import Counter

from pipeq.config.queues import queue_name
from pipeq.core.jobs import JobMessage
from pipeq.core.queue_depth import priority_keys
from pipeq.core.records import RedisRecords

log = logging.getLogger(__name__)

REPUBLISHED = Counter(
    "pipeq_jobs_republished",
    "Queued jobs whose message was lost and was published again",
    ["model"],
)
_LOCK = "pipeq:sweeper"
_BATCH = 1000


class LostJobSweeper:
    def __init__(
        self,
        records: RedisRecords,
        broker: redis.Redis,
        send: Callable[[list[JobMessage]], None],
        lanes: list[tuple[str, str]],
        transport_options: Mapping[str, Any],
        grace_s: float,
    ) -> None:
        self._records = records
        self._broker = broker
        self._send = send
        self._lanes = lanes
        self._options = transport_options
        self._grace_s = grace_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lost-job-sweeper", daemon=True)

    def sweep(self, now: float) -> int:
        """One pass over this worker's lanes; returns how many jobs were published again."""
        republished = 0
        for model, lane in self._lanes:
            keys = priority_keys(queue_name(model, lane), self._options)
            if sum(self._broker.llen(key) for key in keys):
                continue  # what is still queued will be taken; nothing can be told lost yet
            stale = self._records.stale_pending(model, lane, now - self._grace_s, _BATCH)
            if stale:
                stale = self._records.seen_stale_before(model, lane, stale, now, self._grace_s)
            bodies = self._records.republishable(model, lane, stale, now) if stale else []
            if bodies:
                self._send([JobMessage.model_validate(json.loads(body)) for body in bodies])
                REPUBLISHED.labels(model).inc(len(bodies))
                log.warning("published %d lost %s job(s) of %s again", len(bodies), lane, model)
            republished += len(bodies)
        return republished

    def start(self, interval_s: float) -> LostJobSweeper:
        self._interval_s = interval_s
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                # One sweeper at a time across the fleet: copies are harmless, not free.
                if self._broker.set(_LOCK, "1", nx=True, ex=max(1, int(self._interval_s))):
                    self.sweep(time.time())
            except redis.RedisError as exc:
                log.warning("lost-job sweep skipped: %r", exc)
