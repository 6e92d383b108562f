"""A job of n inputs holds n of a front's prefetch credit while it is held, and gives it back
when its message is settled, so fronts share a queue of large jobs by inputs, not by jobs."""

from __future__ import annotations

from types import SimpleNamespace

from celery import Celery
from kombu.common import QoS
from kombu.message import Message

from pipeq.worker.engine import Delivery, JobEngine


def _delivery(inputs: int, acks: list[str]) -> Delivery:
    body = {"id": f"job-{inputs}", "inputs": ["text"] * inputs}
    return Delivery(
        message=Message(headers={"id": body["id"], "task": "pipeq.run"}),
        body=body,
        task_id=body["id"],
        root_id=None,
        ack=lambda *_: acks.append(body["id"]),
    )


def test_credit_follows_inputs() -> None:
    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), 64)
    engine = JobEngine(runner=None, app=Celery(), hostname="credit@test")  # type: ignore[arg-type]
    engine.consumer = SimpleNamespace(qos=qos, event_dispatcher=None, connection_errors=())
    acks: list[str] = []
    large, single, huge = _delivery(40, acks), _delivery(1, acks), _delivery(100, acks)
    engine.accept(large)
    assert qos.value == 64 - 39  # the message's own slot was taken by the consumer already
    engine.accept(single)
    assert qos.value == 25
    engine.accept(huge)  # more than the credit left: it takes all but one slot
    assert qos.value == 1
    for delivery in (large, huge, single):
        engine._settle(delivery)
    assert qos.value == 64
    assert acks == ["job-40", "job-100", "job-1"]
    qos.update()
    assert applied == [64]


def test_unlimited_prefetch_is_left_alone() -> None:
    qos = QoS(lambda **_: None, 0)  # prefetch 0: no limit, nothing to weigh
    engine = JobEngine(runner=None, app=Celery(), hostname="credit@test")  # type: ignore[arg-type]
    engine.consumer = SimpleNamespace(qos=qos, event_dispatcher=None, connection_errors=())
    delivery = _delivery(10, [])
    engine.accept(delivery)
    assert qos.value == 0 and delivery.credit == 0
