"""What admission control and the backlog metrics read, kept in the broker's Redis.

- `pipeq:backlog` (hash, field `<model>/<lane>`): queued inputs. The producer adds a job's input
  count before publishing it (and takes it back if the publish fails); the worker takes it when
  it claims the job from `queued`, or drops it cancelled. LLEN would count jobs, not inputs, and
  reading every waiting envelope to count inputs costs a scan of the queue per submit.
- `pipeq:rate:<model>` (hash, field worker hostname): `[items per second of forward time, at]`,
  published by each worker every lease_s / 3; entries older than the lease are ignored.
- `pipeq:consumers:<model>/<lane>` (sorted set): worker hostnames scored by their last beat, so a
  lane with no beat within the lease has no capacity.

Counters can drift (a job whose record expired while queued is never claimed); reads clamp at 0.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping

import redis

from pipeq.config.errors import Overloaded
from pipeq.config.queues import LANES
from pipeq.config.settings import Settings
from pipeq.core.combine import Combiner

_BACKLOG = "pipeq:backlog"
_RATE = "pipeq:rate:"
_CONSUMERS = "pipeq:consumers:"

Lane = tuple[str, str]  # (model, lane)


def _field(model: str, lane: str) -> str:
    return f"{model}/{lane}"


class QueueLedger:
    def __init__(self, client: redis.Redis, stale_s: float) -> None:
        self._redis = client
        self._stale_s = stale_s
        # A worker's job threads claim at the same moments: their takes share a round trip.
        self._takes = Combiner(self.take_many)

    def add(self, counts: Mapping[Lane, int], sign: int = 1) -> None:
        with self._redis.pipeline(transaction=False) as pipe:
            for (model, lane), count in counts.items():
                pipe.hincrby(_BACKLOG, _field(model, lane), sign * count)
            pipe.execute()

    def take(self, model: str, lane: str, count: int) -> None:
        self._takes((model, lane, count))

    def take_many(self, takes: list[tuple[str, str, int]]) -> list[None]:
        counts: dict[Lane, int] = {}
        for model, lane, count in takes:
            counts[(model, lane)] = counts.get((model, lane), 0) + count
        self.add(counts, sign=-1)
        return [None] * len(takes)

    def backlog(self, lanes: Iterable[Lane]) -> dict[Lane, int]:
        keys = list(lanes)
        if not keys:
            return {}
        raw = self._redis.hmget(_BACKLOG, [_field(m, lane) for m, lane in keys])
        return {key: max(0, int(value or 0)) for key, value in zip(keys, raw, strict=True)}

    def beat(self, hostname: str, lanes: Iterable[Lane], rates: Mapping[str, float]) -> None:
        """One worker's heartbeat: the lanes it consumes and its measured rate per model."""
        now = time.time()
        with self._redis.pipeline(transaction=False) as pipe:
            for model, lane in lanes:
                pipe.zadd(_CONSUMERS + _field(model, lane), {hostname: now})
                pipe.zremrangebyscore(_CONSUMERS + _field(model, lane), 0, now - 10 * self._stale_s)
            for model, rate in rates.items():
                pipe.hset(_RATE + model, hostname, json.dumps([rate, now]))
            pipe.execute()

    def leave(self, hostname: str, lanes: Iterable[Lane]) -> None:
        with self._redis.pipeline(transaction=False) as pipe:
            for model, lane in lanes:
                pipe.zrem(_CONSUMERS + _field(model, lane), hostname)
            pipe.execute()

    def consumers(self, lanes: Iterable[Lane]) -> dict[Lane, int]:
        keys = list(lanes)
        since = time.time() - self._stale_s
        with self._redis.pipeline(transaction=False) as pipe:
            for model, lane in keys:
                pipe.zcount(_CONSUMERS + _field(model, lane), since, "+inf")
            return dict(zip(keys, pipe.execute(), strict=True))

    def live_workers(self, model: str) -> list[str]:
        """Workers whose heartbeat for one of the model's lanes is fresh."""
        since = time.time() - self._stale_s
        with self._redis.pipeline(transaction=False) as pipe:
            for lane in LANES:
                pipe.zrangebyscore(_CONSUMERS + _field(model, lane), since, "+inf")
            answers: list[list[bytes]] = pipe.execute()
        return sorted({name.decode() for names in answers for name in names})

    def rate(self, model: str) -> float | None:
        """Items per second the model's live workers forward together; None when unmeasured."""
        since = time.time() - self._stale_s
        rates = [json.loads(raw) for raw in self._redis.hvals(_RATE + model)]
        live = [rate for rate, at in rates if at >= since and rate > 0]
        return sum(live) if live else None


def open_ledger(settings: Settings) -> QueueLedger | None:
    """The ledger on the broker's Redis; None on other brokers (no admission control there)."""
    url = settings.broker_url
    if not url or not url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return QueueLedger(client, stale_s=settings.lease_s)


def admit(
    ledger: QueueLedger,
    settings: Settings,
    jobs: list[tuple[str, str, int, float | None]],
) -> None:
    """Raise Overloaded unless every job (model, lane, inputs, deadline_s) fits, counting the
    earlier jobs of the same call as queued ahead of the later ones."""
    lanes = {(model, lane) for model, lane, _, _ in jobs}
    lanes |= {(model, "interactive") for model, _ in lanes}
    queued = ledger.backlog(lanes)
    rates: dict[str, float | None] = {}
    for model, lane, count, deadline_s in jobs:
        held = queued[(model, lane)]
        limit = settings.max_backlog
        if model not in rates:
            rates[model] = ledger.rate(model)
        rate = rates[model]
        if limit is not None and held > 0 and held + count > limit:
            wait_s = (held + count - limit) / rate if rate else 1.0
            raise Overloaded(
                f"{model} {lane} holds {held} queued inputs; PIPEQ_MAX_BACKLOG is {limit}",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        # Interactive work is always taken first, so it is ahead of a bulk job too.
        ahead = held + (queued[(model, "interactive")] if lane == "bulk" else 0)
        if deadline_s is not None and rate and ahead / rate > deadline_s:
            raise Overloaded(
                f"{model} {lane}: {ahead} inputs ahead at {rate:.1f}/s is a wait of "
                f"{ahead / rate:.1f} s, over deadline_s={deadline_s}",
                retry_after_s=max(1, math.ceil(ahead / rate - deadline_s)),
            )
        queued[(model, lane)] = held + count
