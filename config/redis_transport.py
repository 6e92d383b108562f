"""kombu's Redis transport, claiming many messages per round trip and acking in batches.

Claims: kombu's consumer takes one message per BRPOP and then writes its unacked entry in a second
round trip, so a worker spends two round trips per message on its consumer thread. Here, once a
BRPOP answers, one server-side script (`CLAIM`) pops up to the channel's free prefetch credit from
the same queues (a job weighs its inputs, `INPUTS_HEADER`) and, in the same call, writes each
message's unacked entry exactly as kombu's `QoS.append` does (hash `unacked`: tag -> [payload,
exchange, routing key]; sorted set `unacked_index`: tag -> claim time), so kombu's
`restore_visible` and pipeq's lease renewal treat them like any other delivery
(tests/test_redis_transport.py pins the format).

Acks: kombu removes each acked message from both indices in a round trip of its own; here acks
are buffered and removed in one pipeline per `ACK_FLUSH_MS` or per `ACK_BATCH` tags, by one
flusher thread per channel, started with it (a thread started per flush would be a thread a few
hundred times a second, and one that cannot start, under the worker's memory bound, left its
acks unflushed and its caller waiting). An ack still in the buffer when the process dies only
means the message comes back after the lease, and a redelivered job whose record is final is not
run again (worker/runner.py).

Clients: kombu builds a new `redis.Redis` for every publish, ack and queue read
(`Channel._create_client`); with redis-py 8 each construction costs ~130 µs. A `redis.Redis`
over a connection pool is safe to share between threads, so each channel keeps one per pool.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from kombu.transport import redis as _kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads

from pipeq.config.claim_script import CLAIM, CLAIM_LIMIT

# Its stubs (celery-types) leave out the Channel and QoS internals this transport extends.
kombu_redis: Any = _kombu_redis

log = logging.getLogger(__name__)

ACK_BATCH = 256
ACK_FLUSH_MS = 2.0


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []
        self._acks_lock = threading.Lock()
        self._acks_waiting = threading.Event()
        threading.Thread(target=self._flush_loop, name="ack-flusher", daemon=True).start()

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.claimed.pop(delivery_tag, None) is not None:
            # The claim script wrote the unacked entry: only the in-memory bookkeeping is left.
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        with self._acks_lock:
            self._acks.append(delivery_tag)
            full = len(self._acks) >= ACK_BATCH
        if full:
            self.flush_acks()
        else:
            self._acks_waiting.set()
        virtual.QoS.ack(self, delivery_tag)

    def _flush_loop(self) -> None:
        while not self.channel.closed:
            if not self._acks_waiting.wait(timeout=1.0):
                continue
            time.sleep(ACK_FLUSH_MS / 1000)  # the acks of this moment leave together
            self._acks_waiting.clear()
            try:
                self.flush_acks()
            except Exception as exc:  # noqa: BLE001 - the tags wait for the lease; the loop goes on
                log.warning("ack flush failed: %r", exc)

    def flush_acks(self) -> None:
        with self._acks_lock:
            tags, self._acks = self._acks, []
        if not tags or self.channel.closed:
            return
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(self.unacked_index_key, *tags)
            pipe.hdel(self.unacked_key, *tags)
            pipe.execute()

    def restore_unacked(self, client: Any = None) -> None:
        self.flush_acks()
        super().restore_unacked(client)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _shared_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Tags the claim script has written unacked entries for, until QoS.append sees them.
        self.claimed: dict[str, bool] = {}
        self._claim_script: Any = None

    def close(self) -> None:
        if not self.closed:
            self.qos.flush_acks()
        super().close()

    def _brpop_read(self, **options: Any) -> bool:
        delivered: bool = super()._brpop_read(**options)
        if delivered:
            self._claim_more()
        return delivered

    def _claim_more(self) -> None:
        """After a BRPOP's one message, take what else is waiting, up to the free credit (in
        inputs: the worker lowers its prefetch by each held job's inputs beyond the first)."""
        credit = self.qos.can_consume_max_estimate()
        credit = CLAIM_LIMIT if credit is None else credit
        queues = self._queue_cycle.consume(len(self.active_queues))
        if credit <= 0 or not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        with self.conn_or_acquire() as client:
            if self._claim_script is None:
                self._claim_script = client.register_script(CLAIM)
            found = self._claim_script(
                keys=[self.unacked_key, self.unacked_index_key, *keys],
                args=[credit, time.time(), CLAIM_LIMIT],
                client=client,
            )
        for key, raw in zip(found[::2], found[1::2], strict=True):
            payload = _envelope(raw)
            if payload is None:
                log.error("dropped a message that is not a kombu envelope from %s", key)
                continue
            self.claimed[payload["properties"]["delivery_tag"]] = True
            self.connection._deliver(payload, key.decode().rsplit(self.sep, 1)[0])

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # When the broker goes away Celery closes the channel, and kombu, putting the unacked
        # messages back, rebuilds a pool from a connection already gone: an AttributeError that
        # Celery treats as fatal (the worker exits). A connection error makes it reconnect, and
        # the unacked messages come back through the visibility timeout
        # (tests/reliability/test_redis_restart.py).
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection is closed")
        return super()._get_pool(asynchronous)


def _envelope(raw: bytes) -> Any:
    """kombu's message envelope, or None for a payload without one (the script wrote no
    unacked entry for it)."""
    try:
        payload = loads(raw)
        payload["properties"]["delivery_tag"]  # noqa: B018 - the key the consumer needs
    except (ValueError, KeyError, TypeError):
        return None
    return payload


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
