"""The worker's transport guard, one fault at a time and deterministically.

The scenario tests (test_hostile.py, test_redis_restart.py) reach these paths
through real workers and real outages, where timing decides which one a run
hits; here each is forced: a kombu channel of a real server, the fault
injected at the exact step.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from maas_worker.broker import fetch, transport
from maas_worker.local.embedded import EmbeddedRedis

pytestmark = pytest.mark.reliability
QUEUE = "maas.high"
#: Job messages carry a canonical UUID task id (anything else is refused).
JOB_ID = str(uuid.uuid4())


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as s:
        yield s


def open_consumer(
    server: EmbeddedRedis, *, no_ack: bool = False, **transport_options: Any
) -> tuple[Connection, list[Any]]:
    """A hardened kombu connection consuming the high queue; the messages it got."""
    transport.install()
    conn = Connection(server.url, transport_options=transport_options)
    got: list[Any] = []
    queue = Queue(QUEUE, Exchange("maas", type="direct"), routing_key=QUEUE)
    conn.Consumer(
        [queue], callbacks=[lambda body, msg: got.append(msg)], accept=["json"], no_ack=no_ack
    ).consume()
    return conn, got


@pytest.fixture
def consumer(server: EmbeddedRedis) -> Iterator[tuple[Connection, list[Any]]]:
    conn, got = open_consumer(server)
    try:
        yield conn, got
    finally:
        conn.release()


def publish(
    server: EmbeddedRedis, task: str = "maas.infer", job_id: str = JOB_ID, **extra: Any
) -> None:
    with Connection(server.url) as conn:
        conn.Producer().publish(
            [["QUJD"], {}, {}],
            exchange="maas",
            routing_key=QUEUE,
            declare=[Queue(QUEUE, Exchange("maas", type="direct"), routing_key=QUEUE)],
            headers={"task": task, "id": job_id},
            serializer="json",
            **extra,
        )


def drain(conn: Connection) -> None:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=2)


def test_a_take_whose_reply_is_lost_leaves_the_message_reserved_for_the_sweep(
    server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]
) -> None:
    """Redis runs the take, then the connection dies before the reply arrives.

    With kombu's BRPOP the message was then gone: popped by Redis, never
    recorded. The take pops and reserves in one script, so it is in the
    unacked hash, and the visibility sweep puts it back in its queue.
    """
    conn, got = consumer
    publish(server)
    channel = conn.default_channel
    channel._ready = True
    conn.transport.cycle._register_BRPOP(channel)  # the take is sent ...
    r = redis.Redis.from_url(server.url)
    assert r.llen(QUEUE) == 0 and r.hlen("unacked") == 1  # ... and run by Redis
    channel.client.connection.disconnect()  # ... and its reply never read
    channel._in_poll = None
    assert got == []
    channel.qos.visibility_timeout = 0  # as if the timeout had passed
    channel.qos.restore_visible(num=10, interval=1)
    assert r.hlen("unacked") == 0 and r.llen(QUEUE) == 1
    restored = json.loads(r.lindex(QUEUE, 0))
    assert restored["headers"]["id"] == JOB_ID
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    drain(conn)  # and the consumer takes it again
    assert [m.headers["id"] for m in got] == [JOB_ID]
    r.close()


def test_a_lost_take_from_a_tenants_list_goes_back_to_that_list_and_takes_its_turn(
    server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]
) -> None:
    """Fair share: the same lost reply, for a job a producer pushed to its tenant's
    list. The take reserved it under that list (not the queue's own), so the sweep
    puts it back there and announces the tenant again: it is taken once more."""
    conn, got = consumer
    publish(server, **{fetch.TENANT_PROPERTY: "acme"})
    r = redis.Redis.from_url(server.url)
    own = fetch.tenant_queue(QUEUE, "acme")
    assert r.llen(QUEUE) == 0 and r.llen(own) == 1
    assert r.smembers(fetch.arrivals_key(QUEUE)) == {b"acme"}
    channel = conn.default_channel
    channel._ready = True
    conn.transport.cycle._register_BRPOP(channel)  # the take is sent and run ...
    assert r.llen(own) == 0 and r.hlen("unacked") == 1
    assert r.llen(fetch.ring_key(QUEUE)) == 0  # its list is empty: out of the ring
    assert json.loads(next(iter(r.hvals("unacked"))))[2] == own  # where it goes back
    channel.client.connection.disconnect()  # ... and its reply never read
    channel._in_poll = None
    assert got == []
    channel.qos.visibility_timeout = 0
    channel.qos.restore_visible(num=10, interval=1)
    assert r.hlen("unacked") == 0 and r.llen(own) == 1 and r.llen(QUEUE) == 0
    assert r.smembers(fetch.arrivals_key(QUEUE)) == {b"acme"}
    assert json.loads(r.lindex(own, 0))["properties"]["delivery_info"]["redelivered"] is True
    drain(conn)  # and the consumer takes it again, through the ring
    assert [m.headers["id"] for m in got] == [JOB_ID]
    assert r.llen(own) == 0
    r.close()


def test_a_command_sent_into_a_frozen_redis_still_runs_after_the_thaw(
    server: EmbeddedRedis,
) -> None:
    """Why a sweep can be cut off holding its lock (the test below): a client that
    timed out on a frozen server has still sent its command, which runs later."""
    r = redis.Redis.from_url(server.url, socket_timeout=0.5)
    r.ping()  # an established connection, as a pooled sweeper has
    server.freeze()
    try:
        with pytest.raises(redis.TimeoutError):
            r.lock("unacked_mutex", timeout=300).acquire(blocking=False)
    finally:
        server.thaw()
    check = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while not check.exists("unacked_mutex"):
        assert time.monotonic() < deadline, "the timed-out command never ran"
        time.sleep(0.05)
    assert 0 < check.ttl("unacked_mutex") <= 300  # held by a client that gave up
    check.close()
    r.close()


def test_a_sweep_lock_left_behind_by_a_cut_off_sweep_only_delays_the_sweep(
    server: EmbeddedRedis,
) -> None:
    """A sweep that loses Redis mid-pass cannot release its lock; the next sweeps
    skip until the lock expires (`app.transport_options` keeps that to seconds).
    Then a message whose take reply was lost is put back as usual."""
    conn, _ = open_consumer(server, unacked_mutex_expire=1)
    try:
        publish(server)
        channel = conn.default_channel
        channel._ready = True
        conn.transport.cycle._register_BRPOP(channel)  # the take runs; its reply is lost
        channel.client.connection.disconnect()
        channel._in_poll = None
        r = redis.Redis.from_url(server.url)
        stale = r.lock("unacked_mutex", timeout=1)  # the cut-off sweep's lock
        assert stale.acquire(blocking=False)
        channel.qos.visibility_timeout = 0
        channel.qos.restore_visible(num=10, interval=1)
        assert r.hlen("unacked") == 1 and r.llen(QUEUE) == 0  # held off by the lock
        assert 0 < r.pttl("unacked_mutex") <= 1000
        deadline = time.monotonic() + 10
        while r.exists("unacked_mutex"):  # expires on Redis's own clock
            assert time.monotonic() < deadline, "the stale sweep lock never expired"
            time.sleep(0.05)
        channel.qos.restore_visible(num=10, interval=1)
        assert r.hlen("unacked") == 0 and r.llen(QUEUE) == 1
        r.close()
    finally:
        conn.release()


def test_an_idle_consumer_is_woken_by_a_publish_not_by_its_poll_timeout(
    server: EmbeddedRedis,
) -> None:
    # A poll timeout far longer than the wait below: only the wake-up token
    # published with the message can end the idle wait in time.
    conn, got = open_consumer(server, brpop_timeout=60)
    try:
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)  # finds the queue empty, starts waiting
        assert conn.default_channel._sent == "wait"
        publish(server)
        conn.drain_events(timeout=10)  # the token wakes it: it takes at once
        assert [m.headers["id"] for m in got] == [JOB_ID]
    finally:
        conn.release()


def test_a_server_that_forgot_the_take_script_gets_it_again(
    server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]
) -> None:
    conn, got = consumer
    publish(server)
    drain(conn)
    assert conn.default_channel._script_known  # takes now go by EVALSHA
    r = redis.Redis.from_url(server.url)
    r.script_flush()  # what a restarted server looks like to a live connection
    publish(server)
    drain(conn)  # NOSCRIPT, then the script itself: nothing lost, no error
    assert [m.headers["id"] for m in got] == [JOB_ID, JOB_ID]
    assert r.llen(QUEUE) == 0 and r.hlen("unacked") == 2
    r.close()


def test_a_no_ack_consumer_leaves_nothing_reserved(server: EmbeddedRedis) -> None:
    """Remote-control replies are consumed without acknowledgement: a reservation
    of one would never be cleared, and the sweep would put it back for ever."""
    conn, got = open_consumer(server, no_ack=True)
    try:
        publish(server)
        drain(conn)
        assert [m.headers["id"] for m in got] == [JOB_ID]
        r = redis.Redis.from_url(server.url)
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
        r.close()
    finally:
        conn.release()


def test_every_publish_rings_the_wake_up_list_which_stays_bounded(server: EmbeddedRedis) -> None:
    r = redis.Redis.from_url(server.url)
    publish(server)
    assert r.llen(fetch.WAKE_KEY) == 1
    for _ in range(3):
        with Connection(server.url) as conn, conn.Producer() as producer:
            for _ in range(100):
                producer.publish(
                    [["QUJD"], {}, {}],
                    exchange="maas",
                    routing_key=QUEUE,
                    headers={"task": "maas.infer", "id": JOB_ID},
                    serializer="json",
                )
    assert r.llen(QUEUE) == 301
    assert r.llen(fetch.WAKE_KEY) == fetch.WAKE_MAX
    r.close()


def test_ack_and_reject_on_a_closed_channel_leave_the_message_to_the_sweep(
    server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]
) -> None:
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
    server: EmbeddedRedis, consumer: tuple[Connection, list[Any]]
) -> None:
    conn, got = consumer
    r = redis.Redis.from_url(server.url)
    r.lpush(QUEUE, b"not a message")
    publish(server, task="celery.accumulate")
    publish(server, job_id="job-1")  # a task id that is not a canonical UUID
    publish(server, job_id=JOB_ID.upper())
    publish(server)
    for _ in range(5):
        drain(conn)
    assert [(m.headers["task"], m.headers["id"]) for m in got] == [("maas.infer", JOB_ID)]
    # Stamped with the list it was taken from, whatever the message said.
    assert got[0].delivery_info["routing_key"] == QUEUE
    assert r.llen(QUEUE) == 0
    # Refused entries were taken and reserved like any other: the reservation
    # is dropped with them; only the one delivered message is reserved.
    assert r.hkeys("unacked") == [got[0].delivery_tag.encode()]
    r.close()
