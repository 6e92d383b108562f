"""Leases on Redis: a live worker's unacked jobs never return to the queue; a dead one's do soon.

kombu's Redis QoS keeps each unacked message in the hash `unacked` and its delivery time in the
sorted set `unacked_index`; any worker's `restore_visible` sweep re-queues the entries older
than the visibility timeout (= PIPEQ_LEASE_S). `LeaseRenewal`, a consumer bootstep, re-stamps
the entries of the delivery tags this process holds (its QoS `_delivered`: prefetched and
running jobs) every lease_s / 3 with `ZADD XX`, so an entry already acked or already restored is
never re-created. A SIGKILLed worker stops renewing, and its jobs come back after the lease plus
at most one sweep (PIPEQ_UNACKED_RESTORE_INTERVAL_S). On RabbitMQ the broker requeues a dead
connection's messages itself and this step is not installed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


def held_tags(channel: Any) -> list[str]:
    """Delivery tags this channel holds unacked (read from another thread: retry on a race)."""
    for _ in range(5):
        try:
            return [str(tag) for tag in list(channel.qos._delivered)]
        except RuntimeError:  # the consumer thread changed the dict while we copied it
            continue
    return []


def renew(channel: Any, tags: list[str], now: float) -> int:
    """Re-stamp `tags` in the unacked index; returns how many entries were still there."""
    if not tags:
        return 0
    # Never `channel.client`: that is the consumer's BRPOP connection, and a command sent on it
    # from this thread takes the BRPOP's reply (and kills the consumer). conn_or_acquire gives a
    # pooled synchronous client.
    with channel.conn_or_acquire() as client:
        renewed: int = client.zadd(
            channel.unacked_index_key, dict.fromkeys(tags, now), xx=True, ch=True
        )
    return renewed


class LeaseRenewal(bootsteps.StartStopStep):
    """Renews the lease of every message the worker's task consumer holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def include_if(self, parent: Any) -> bool:
        # Only Redis has an unacked index to renew; RabbitMQ requeues a dead connection's
        # messages itself, and the embedded filesystem broker has no leases.
        return bool(parent.app.connection_for_write().transport.driver_type == "redis")

    def start(self, parent: Any) -> None:
        options = parent.app.conf.broker_transport_options or {}
        interval_s = float(options.get("visibility_timeout", 30)) / 3
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(parent, interval_s), name="lease-renewal", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, parent: Any, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            try:
                channel = parent.task_consumer.channel
                renew(channel, held_tags(channel), time.time())
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried next tick
                log.warning("lease renewal failed: %r", exc)
