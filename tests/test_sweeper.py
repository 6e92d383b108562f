"""The lost-job sweeper against the real Redis: a queued job whose message vanished from the queue
is published again once seen so at two sweeps a grace period apart; a claimed job leaves the
pending set."""

from __future__ import annotations

import time

import redis

from pipeq.config.queues import queue_name
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument
from pipeq.core.records import RedisRecords, pending_key
from pipeq.producer.client import Client
from pipeq.worker.sweeper import LostJobSweeper


def _idle_client(settings: Settings, db: int) -> Client:
    broker = settings.broker_url.rsplit("/", 1)[0] + f"/{db}"  # type: ignore[union-attr]
    redis.Redis.from_url(broker).flushdb()
    return Client(settings.model_copy(update={"broker_url": broker}))


def test_lost_message_is_published_again(settings: Settings) -> None:
    client = _idle_client(settings, 9)
    broker = redis.Redis.from_url(client.settings.broker_url)  # type: ignore[arg-type]
    records = client.records
    assert isinstance(records, RedisRecords)
    queue = queue_name("tiny-sentiment", "bulk")
    lost = client.submit("tiny-sentiment", ["lost in transit"], priority="bulk")
    kept = client.submit("tiny-sentiment", ["still queued"], priority="bulk")
    sweeper = LostJobSweeper(
        records,
        broker,
        client.send,
        [("tiny-sentiment", "bulk")],
        client.celery.conf.broker_transport_options,
        grace_s=5,
    )
    now = time.time()
    # While the queue holds messages nothing can be told lost, however old.
    assert sweeper.sweep(now + 60) == 0

    broker.delete(queue)  # both messages gone, as a SIGKILL after BRPOP leaves them
    # A worker claimed one of them before dying: it is running, not lost.
    running = JobDocument(id=kept, model="tiny-sentiment", status="running", lane="bulk")
    assert records.transition(running, ("queued",))[0]
    assert sweeper.sweep(now + 1) == 0, "within the grace period"
    assert sweeper.sweep(now + 60) == 0, "seen stale once: a worker may be about to claim it"
    assert sweeper.sweep(now + 62) == 0, "seen again, but within a grace of the first sighting"
    assert sweeper.sweep(now + 65) == 1
    raw = broker.lrange(queue, 0, -1)
    assert len(raw) == 1 and lost.encode() in raw[0]
    assert records.get(lost).status == "queued"  # type: ignore[union-attr]

    broker.delete(queue)
    assert sweeper.sweep(now + 66) == 0, "published again just now: not before another grace"
    assert sweeper.sweep(now + 120) == 0
    assert sweeper.sweep(now + 125) == 1
    # Claimed at last: it leaves the pending set and is never published again.
    claimed = JobDocument(id=lost, model="tiny-sentiment", status="running", lane="bulk")
    assert records.transition(claimed, ("queued",))[0]
    broker.delete(queue)
    assert sweeper.sweep(now + 600) == 0
    results = redis.Redis.from_url(client.settings.effective_result_url)
    assert results.zcard(pending_key("tiny-sentiment", "bulk")) == 0
