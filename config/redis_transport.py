"""kombu's Redis transport, reusing its synchronous clients.

kombu builds a new `redis.Redis` for every publish, ack and queue read (`Channel._create_client`);
with redis-py 8 each construction costs ~130 µs (it rebuilds its response-callback table). On a
busy worker that was 60% of the consumer thread's time (py-spy, sampling the GIL holder), and the
consumer thread is what feeds the batcher. A `redis.Redis` over a connection pool is safe to share
between threads, so each channel keeps one per pool. The asynchronous clients (BRPOP, pub/sub)
hold a dedicated connection and are left as kombu makes them.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

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


class Transport(kombu_redis.Transport):
    Channel = Channel
