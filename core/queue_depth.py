"""Queue depth per model and lane, read from the Redis broker at scrape time.

Flower exports no queue-length metric, and a queue's depth is the signal an autoscaler (KEDA)
scales workers on, so the API computes it for its own `/metrics`. It counts messages waiting in
the broker, as Flower's broker page does: jobs a worker has already reserved are not waiting.

kombu's Redis transport keeps one list per queue and priority step: the bare queue name for
priority 0 and `<queue><sep><step>` for the others, all under `global_keyprefix`. Messages are
LPUSHed and popped from the right, so the oldest waiting message is at index -1.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pipeq.config.queues import LANES, queue_name
from pipeq.core.ledger import QueueLedger
from pipeq.core.records import JobRecords

log = logging.getLogger(__name__)

# kombu.transport.redis defaults, overridable through broker_transport_options.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

# The envelope's tail only: kombu writes `body` first and the small `headers` (with the job id)
# after it, so an inline-media message never crosses the network whole at each scrape.
_OLDEST_TAIL = """
local message = redis.call('LINDEX', KEYS[1], -1)
if not message then return false end
return string.sub(message, -tonumber(ARGV[1]))
"""
TAIL_BYTES = 4096


def priority_keys(queue: str, options: Mapping[str, Any]) -> list[str]:
    """The Redis list names kombu uses for `queue`, one per priority step."""
    prefix = str(options.get("global_keyprefix", ""))
    sep = str(options.get("sep", PRIORITY_SEP))
    steps = options.get("priority_steps", PRIORITY_STEPS)
    return [f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}" for step in steps]


def job_id_of(tail: bytes) -> str | None:
    """The Celery task id (= pipeq job id) from the tail of a kombu envelope, if it holds one."""
    start = tail.find(b'"headers": ')
    if start < 0:
        return None
    try:
        envelope = json.loads(b"{" + tail[start:])
    except ValueError:
        return None
    job_id = envelope.get("headers", {}).get("id")
    return job_id if isinstance(job_id, str) else None


class QueueDepthCollector(Collector):
    """`pipeq_queue_depth` and `pipeq_queue_oldest_age_seconds` per model and lane."""

    def __init__(
        self,
        broker: redis.Redis,
        transport_options: Mapping[str, Any],
        models: Iterable[str],
        records: JobRecords,
        ledger: QueueLedger | None = None,
    ) -> None:
        self._broker = broker
        self._records = records
        self._ledger = ledger
        self._oldest_tail = broker.register_script(_OLDEST_TAIL)
        self._lanes = {
            (model, lane): priority_keys(queue_name(model, lane), transport_options)
            for model in models
            for lane in LANES
        }

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "pipeq_queue_depth",
            "Jobs waiting in the broker, by model and lane",
            labels=["model", "lane"],
        )
        age = GaugeMetricFamily(
            "pipeq_queue_oldest_age_seconds",
            "Seconds since the oldest waiting job was submitted, by model and lane",
            labels=["model", "lane"],
        )
        stranded = GaugeMetricFamily(
            "pipeq_backlog_without_capacity",
            "Jobs waiting on a lane that no live worker consumes (pipeq_queue_depth where no "
            "worker heartbeat arrived within PIPEQ_LEASE_S; else 0), by model and lane",
            labels=["model", "lane"],
        )
        try:
            self._read(depth, age, stranded)
        except redis.RedisError as exc:
            # The request counters stay scrapeable while the broker is down; the queue series
            # go absent, which `absent()` alerts can catch.
            log.warning("queue depth not read from the broker: %s", exc)
            return
        yield depth
        yield age
        if self._ledger is not None:
            yield stranded

    def _read(
        self, depth: GaugeMetricFamily, age: GaugeMetricFamily, stranded: GaugeMetricFamily
    ) -> None:
        with self._broker.pipeline(transaction=False) as pipe:
            for keys in self._lanes.values():
                for key in keys:
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        waiting = {lane: [(k, next(lengths)) for k in keys] for lane, keys in self._lanes.items()}
        now = time.time()
        live = self._ledger.consumers(waiting) if self._ledger is not None else {}
        for (model, lane), per_key in waiting.items():
            jobs = sum(length for _, length in per_key)
            depth.add_metric([model, lane], jobs)
            stranded.add_metric([model, lane], 0 if live.get((model, lane)) else jobs)
            ages = [self._age_s(key, now) for key, length in per_key if length]
            known = [a for a in ages if a is not None]
            if known:
                age.add_metric([model, lane], max(known))

    def _age_s(self, key: str, now: float) -> float | None:
        tail = self._oldest_tail(keys=[key], args=[TAIL_BYTES])
        job_id = job_id_of(tail) if tail else None
        doc = self._records.get(job_id) if job_id else None
        submitted = doc.timings.get("submitted_at") if doc else None
        return None if submitted is None else max(0.0, now - submitted)


def register_queue_depth(
    metrics: CollectorRegistry,
    broker_url: str | None,
    options: Mapping[str, Any],
    models: Iterable[str],
    records: JobRecords,
    ledger: QueueLedger | None,
) -> None:
    """Add the queue series to the API's registry where the broker is Redis; the embedded
    filesystem broker and AMQP get none."""
    if not broker_url or not broker_url.startswith(("redis://", "rediss://")):
        return
    # A short timeout: a scrape must answer before Prometheus gives up on it (10 s by default).
    broker = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    metrics.register(QueueDepthCollector(broker, options, models, records, ledger))
