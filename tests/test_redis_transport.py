"""The Redis transport's bulk claims and batched acks, against a real Redis.

The claim script must leave exactly what kombu's own `QoS.append` leaves, or kombu's restore and
pipeq's lease renewal would mishandle claimed messages: the format is pinned here against a
message consumed by stock kombu.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from pipeq.config.claim_script import INPUTS_HEADER
from pipeq.config.redis_transport import ACK_FLUSH_MS, Transport
from tests.conftest import REDIS

DB = 12
QUEUE = Queue("claims", Exchange("claims", type="direct"), routing_key="claims")


@pytest.fixture
def db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{REDIS}/{DB}")
    client.flushdb()
    yield client
    client.flushdb()


def _publish(count: int) -> None:
    with Connection(f"{REDIS}/{DB}") as conn:
        producer = Producer(conn.channel())
        for index in range(count):
            producer.publish(
                {"index": index}, exchange=QUEUE.exchange, routing_key="claims", declare=[QUEUE]
            )


def _consume(prefetch: int, want: int, ack: bool) -> tuple[list[Any], Any]:
    """Messages delivered through pipeq's transport until `want` arrived or the queue ran dry."""
    conn = Connection(f"{REDIS}/{DB}", transport=Transport)
    channel = conn.channel()
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(message)
        if ack:
            message.ack()

    consumer = Consumer(channel, [QUEUE], callbacks=[on_message], prefetch_count=prefetch)
    consumer.consume()
    deadline = time.monotonic() + 10
    while len(got) < want and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            break
    return got, (conn, channel)


def test_one_claim_takes_up_to_the_credit_and_writes_kombus_unacked_entries(
    db: redis.Redis,
) -> None:
    _publish(100)
    got, (conn, channel) = _consume(prefetch=40, want=100, ack=False)
    try:
        # The credit holds: 40 unacked at most, however many wait.
        assert len(got) == 40
        assert [m.payload["index"] for m in got] == list(range(40))
        assert db.llen("claims") == 60
        entries = db.hgetall("unacked")
        index = dict(db.zrange("unacked_index", 0, -1, withscores=True))
        tags = {m.delivery_tag.encode() for m in got}
        assert set(entries) == tags and set(index) == tags
        for message in got:
            payload, exchange, routing_key = json.loads(entries[message.delivery_tag.encode()])
            assert (exchange, routing_key) == ("claims", "claims")
            assert payload["properties"]["delivery_tag"] == message.delivery_tag
            assert payload["body"] == message._raw["body"]
            assert abs(index[message.delivery_tag.encode()] - time.time()) < 60
        assert channel.claimed == {}
    finally:
        conn.release()


def test_claimed_entries_match_what_stock_kombu_writes(db: redis.Redis) -> None:
    _publish(3)
    with Connection(f"{REDIS}/{DB}") as stock:
        message = stock.SimpleQueue(QUEUE).get(timeout=5)
        stock_entry = json.loads(db.hget("unacked", message.delivery_tag))
    got, (conn, _) = _consume(prefetch=10, want=2, ack=False)
    try:
        ours = json.loads(db.hget("unacked", got[1].delivery_tag))
        assert len(ours) == len(stock_entry) == 3
        assert set(ours[0]) == set(stock_entry[0])
        assert ours[1:] == stock_entry[1:]
    finally:
        conn.release()


def test_kombus_restore_returns_claimed_messages(db: redis.Redis) -> None:
    """A worker that died holding claimed messages: another's restore sweep re-queues them."""
    _publish(20)
    got, (conn, channel) = _consume(prefetch=20, want=20, ack=False)
    channel.qos.restore_at_shutdown = False  # as if SIGKILLed: nothing is given back
    conn.release()
    assert len(got) == 20 and db.llen("claims") == 0
    db.zadd("unacked_index", {tag: 0 for tag in db.hkeys("unacked")})
    with Connection(f"{REDIS}/{DB}", transport_options={"visibility_timeout": 1}) as other:
        other.channel().qos.restore_visible(num=100)
    assert db.llen("claims") == 20 and db.hlen("unacked") == 0
    again, (conn, _) = _consume(prefetch=20, want=20, ack=True)
    conn.release()
    assert sorted(m.payload["index"] for m in again) == list(range(20))
    assert all(m.delivery_info["redelivered"] for m in again)


def test_acks_are_removed_in_batches(db: redis.Redis) -> None:
    _publish(300)
    got, (conn, channel) = _consume(prefetch=0, want=300, ack=True)
    try:
        assert len(got) == 300
        deadline = time.monotonic() + 5
        while db.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(ACK_FLUSH_MS / 1000)
        assert db.hlen("unacked") == 0 and db.zcard("unacked_index") == 0
        assert len(channel.qos._delivered) == len(channel.qos._dirty)  # none held
    finally:
        conn.release()


def test_acks_leave_from_one_thread_per_channel(
    db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush starts no thread: a worker under its memory bound may be unable to start one, and
    a thread per flush would be hundreds a second."""
    _publish(40)
    got, (conn, channel) = _consume(prefetch=0, want=40, ack=False)
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    try:
        for first in range(0, 40, 4):  # acks in small groups, each left to the flusher
            for message in got[first : first + 4]:
                message.ack()
            time.sleep(5 * ACK_FLUSH_MS / 1000)
        deadline = time.monotonic() + 5
        while db.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(ACK_FLUSH_MS / 1000)
        assert db.hlen("unacked") == 0 and db.zcard("unacked_index") == 0
        assert started == []
    finally:
        conn.release()


def test_a_malformed_message_is_dropped_and_the_rest_delivered(db: redis.Redis) -> None:
    _publish(2)
    db.lpush("claims", b"not json")
    _publish(2)
    got, (conn, _) = _consume(prefetch=10, want=4, ack=True)
    conn.release()
    assert sorted(m.payload["index"] for m in got) == [0, 0, 1, 1]
    assert db.llen("claims") == 0


def test_a_claim_weighs_each_job_by_its_inputs(db: redis.Redis) -> None:
    """Credit counts inputs: after the BRPOP's one job of 8, a credit of 19 takes two more
    of 8, and the next stays queued, in order, for a front with room for it."""
    with Connection(f"{REDIS}/{DB}") as conn:
        producer = Producer(conn.channel())
        for index in range(10):
            producer.publish(
                {"index": index},
                exchange=QUEUE.exchange,
                routing_key="claims",
                declare=[QUEUE],
                headers={INPUTS_HEADER: 8},
            )
    conn = Connection(f"{REDIS}/{DB}", transport=Transport)
    got: list[Any] = []
    consumer = Consumer(
        conn.channel(), [QUEUE], callbacks=[lambda _, m: got.append(m)], prefetch_count=20
    )
    consumer.consume()
    try:
        conn.drain_events(timeout=5)  # one BRPOP and the claim after it
        assert [m.payload["index"] for m in got] == [0, 1, 2]
        assert db.llen("claims") == 7 and db.hlen("unacked") == 3
        for message in got:
            message.ack()
    finally:
        conn.release()
    again, (conn, _) = _consume(prefetch=0, want=7, ack=True)
    conn.release()
    assert [m.payload["index"] for m in again] == [3, 4, 5, 6, 7, 8, 9]
