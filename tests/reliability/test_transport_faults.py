"""The worker's transport guard, one fault at a time and deterministically.

The scenario tests (test_hostile.py, test_redis_restart.py) reach these paths
through real workers and real outages, where timing decides which one a run
hits; here each is forced: a kombu channel of a real server, the fault
injected at the exact step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from maas_worker import transport
from maas_worker.embedded import EmbeddedRedis

pytestmark = pytest.mark.reliability
QUEUE = "maas.high"


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def consumer(server: EmbeddedRedis) -> Iterator[tuple[Connection, list[Any]]]:
    """A hardened kombu connection consuming the high queue; the messages it got."""
    transport.install()
    conn = Connection(server.url)
    got: list[Any] = []
    queue = Queue(QUEUE, Exchange("maas", type="direct"), routing_key=QUEUE)
    consumer = conn.Consumer([queue], callbacks=[lambda body, msg: got.append(msg)],
                             accept=["json"])
    consumer.consume()
    try:
        yield conn, got
    finally:
        transport._orphans.clear()
        conn.release()


def publish(server: EmbeddedRedis, task: str = "maas.infer", **extra: Any) -> None:
    with Connection(server.url) as conn:
        conn.Producer().publish([["QUJD"], {}, {}], exchange="maas", routing_key=QUEUE,
                                declare=[Queue(QUEUE, Exchange("maas", type="direct"),
                                               routing_key=QUEUE)],
                                headers={"task": task, "id": "job-1"}, serializer="json",
                                **extra)


def drain(conn: Connection) -> None:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=2)


def test_a_message_taken_as_the_connection_breaks_is_put_back(
        server: EmbeddedRedis, consumer: tuple[Connection, list[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    conn, _ = consumer
    publish(server)

    def broken(self: Any, message: Any, delivery_tag: str) -> None:
        raise redis.ConnectionError("connection lost after BRPOP")
    monkeypatch.setattr(transport.HardenedQoS, "append", broken)
    with pytest.raises(redis.ConnectionError):
        drain(conn)
    r = redis.Redis.from_url(server.url)
    assert r.llen(QUEUE) == 0 and r.hlen("unacked") == 0  # popped, not reserved
    assert len(transport._orphans) == 1
    monkeypatch.undo()
    conn.default_channel.basic_consume(QUEUE, False, lambda m: None, "again")  # reconnection
    assert transport._orphans == []
    assert r.llen(QUEUE) == 1
    assert json.loads(r.lindex(QUEUE, 0))["headers"]["task"] == "maas.infer"
    r.close()


def test_ack_and_reject_on_a_closed_channel_leave_the_message_to_the_sweep(
        server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]) -> None:
    conn, got = consumer
    publish(server)
    publish(server)
    drain(conn)
    drain(conn)
    assert len(got) == 2
    r = redis.Redis.from_url(server.url)
    assert r.hlen("unacked") == 2
    # What Celery does when the connection drops with jobs still running.
    channel = conn.default_channel
    channel._disconnect_pools()
    conn._do_close_transport()
    got[0].ack()  # kombu raised AttributeError here: the worker exited
    got[1].reject(requeue=True)
    assert r.hlen("unacked") == 2  # still there: the visibility sweep restores them
    r.close()


def test_a_refused_entry_is_dropped_and_the_consumer_goes_on(
        server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]) -> None:
    conn, got = consumer
    r = redis.Redis.from_url(server.url)
    r.lpush(QUEUE, b"not a message")
    publish(server, task="celery.accumulate")
    publish(server)
    for _ in range(3):
        drain(conn)
    assert [m.headers["task"] for m in got] == ["maas.infer"]
    # Stamped with the list it was taken from, whatever the message said.
    assert got[0].delivery_info["routing_key"] == QUEUE
    assert r.llen(QUEUE) == 0
    r.close()
