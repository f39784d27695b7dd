"""The atomic take (fetch.py): the Lua script against fakeredis, kombu's formats.

The real consumer path (a kombu channel of a real server, a lost reply, the
sweep bringing the message back) is in tests/reliability/test_transport_faults.py.
"""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from maas_worker.broker import fetch

HIGH, LOW = "maas.high", "maas.low"


def message(tag: str, **props: Any) -> str:
    return json.dumps(
        {
            "body": "QUJD",
            "content-type": "application/json",
            "headers": {"task": "maas.infer", "id": tag, "empty": [], "map": {}},
            "properties": {"delivery_tag": tag, **props},
        }
    )


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_takes_in_queue_order_and_reserves_each_in_kombus_format(r: fakeredis.FakeRedis) -> None:
    r.lpush(LOW, message("l1"))
    r.lpush(HIGH, message("h1"), message("h2"))  # h1 is the oldest: taken first
    taken = fetch.take(r, [HIGH, LOW], count=2, max_chars=10_000, now=100.5)
    assert [(t.queue, json.loads(t.raw)["headers"]["id"], t.reserved) for t in taken] == [
        (HIGH, "h1", True),
        (HIGH, "h2", True),
    ]
    assert r.llen(HIGH) == 0 and r.llen(LOW) == 1
    # kombu's QoS reads these back to restore: [message, exchange, routing key].
    stored, exchange, routing_key = json.loads(r.hget("unacked", "h1"))
    assert stored == json.loads(taken[0].raw)  # the text itself: [] stays [], {} stays {}
    assert (exchange, routing_key) == ("", HIGH)
    assert r.zscore("unacked_index", "h1") == 100.5
    assert [t.queue for t in fetch.take(r, [HIGH, LOW], count=5, max_chars=10_000)] == [LOW]
    assert fetch.take(r, [HIGH, LOW], count=5, max_chars=10_000) == []


def test_priority_sub_queues_come_after_every_plain_queue_like_kombus_brpop(
    r: fakeredis.FakeRedis,
) -> None:
    r.lpush(HIGH + fetch.PRIORITY_SEP + "3", message("h3"))
    r.lpush(LOW, message("l0"))
    taken = fetch.take(r, [HIGH, LOW], count=2, max_chars=10_000)
    assert [(t.queue, t.tag) for t in taken] == [(LOW, "l0"), (HIGH, "h3")]
    # Recorded under the queue's own name: restoring routes it by the message priority.
    assert json.loads(r.hget("unacked", "h3"))[2] == HIGH


def test_the_recorded_queue_is_where_it_was_taken_not_what_it_claims(
    r: fakeredis.FakeRedis,
) -> None:
    r.lpush(LOW, message("x", delivery_info={"exchange": "", "routing_key": HIGH}))
    fetch.take(r, [HIGH, LOW], count=1, max_chars=10_000)
    assert json.loads(r.hget("unacked", "x"))[2] == LOW


@pytest.mark.parametrize(
    "entry",
    [
        b"not json",
        b"\xff\xfe binary",
        b"[1, 2]",
        b'{"properties": "x"}',
        b'{"properties": {"delivery_tag": 7}}',
        b'{"properties": {"delivery_tag": ""}}',
    ],
)
def test_an_entry_without_a_delivery_tag_is_taken_unreserved(
    r: fakeredis.FakeRedis, entry: bytes
) -> None:
    r.lpush(HIGH, entry)
    [taken] = fetch.take(r, [HIGH], count=1, max_chars=10_000)
    assert taken.reserved is False and taken.queue == HIGH
    assert taken.raw.encode("utf-8", "surrogateescape") == entry
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0


def test_an_entry_over_the_size_limit_is_not_decoded_nor_reserved(r: fakeredis.FakeRedis) -> None:
    r.lpush(HIGH, message("big") + " " * 1000)
    [taken] = fetch.take(r, [HIGH], count=1, max_chars=500)
    assert not taken.reserved and r.hlen("unacked") == 0


@pytest.mark.parametrize(
    "entry",
    [
        # kombu's and our clients' layout: the tag read at the end, not decoded
        message("tail-1"),
        # any other layout: decoded
        message("deco-1", priority=0),
        '{"properties": {"delivery_tag": "spaced-1"} }',
        '{"properties":{"delivery_tag":"compact-1"}}',
        json.dumps({"properties": {"delivery_tag": "x" * 65}}),  # longer than the tail read
        json.dumps({"properties": {"delivery_tag": "caf\u00e9"}}),  # not [a-zA-Z0-9-]
    ],
)
def test_the_tag_reserved_is_the_one_the_entry_names(r: fakeredis.FakeRedis, entry: str) -> None:
    r.lpush(HIGH, entry)
    [taken] = fetch.take(r, [HIGH], count=1, max_chars=10_000)
    tag = json.loads(entry)["properties"]["delivery_tag"]
    assert taken.tag == tag and taken.tag_agrees(json.loads(taken.raw))
    assert r.hkeys("unacked") == [tag.encode()]


def test_an_entry_whose_end_names_a_decoy_tag_is_reserved_under_it_and_disagrees(
    r: fakeredis.FakeRedis,
) -> None:
    """What the tail read cannot tell (which object the tag ends): the consumer's
    check on the parsed entry refuses it (tests/integration/test_isolation_faults.py)."""
    entry = json.dumps({"properties": {"delivery_tag": "real"}, "x": {"delivery_tag": "decoy"}})
    r.lpush(HIGH, entry)
    [taken] = fetch.take(r, [HIGH], count=1, max_chars=10_000)
    assert taken.tag == "decoy" and not taken.tag_agrees(json.loads(taken.raw))
    assert r.hkeys("unacked") == [b"decoy"]  # acknowledged when the consumer refuses it


def test_an_entry_not_json_at_all_but_ending_like_one_is_reserved_and_disagrees(
    r: fakeredis.FakeRedis,
) -> None:
    r.lpush(HIGH, 'garbage "delivery_tag": "t-1"}}')
    [taken] = fetch.take(r, [HIGH], count=1, max_chars=10_000)
    assert taken.tag == "t-1" and not taken.tag_agrees(None)


def test_a_copy_of_a_reserved_entry_waits_until_the_reservation_ends(
    r: fakeredis.FakeRedis,
) -> None:
    """A second entry under a tag still reserved never replaces that reservation
    (acknowledging one would drop the other's, and a crash would lose it): it
    goes back to the far end of its list, and is taken once the first is acked."""
    r.lpush(HIGH, message("t1"))
    [first] = fetch.take(r, [HIGH], count=1, max_chars=10_000)
    held = r.hget("unacked", "t1")
    r.lpush(HIGH, message("t1", copy=True), message("t2"))  # the copy is taken first
    assert [t.tag for t in fetch.take(r, [HIGH], count=5, max_chars=10_000)] == []
    assert r.hget("unacked", "t1") == held and r.lrange(HIGH, 0, -1) == [
        message("t1", copy=True).encode(),
        message("t2").encode(),
    ]
    assert [t.tag for t in fetch.take(r, [HIGH], count=5, max_chars=10_000)] == ["t2"]
    assert fetch.take(r, [HIGH], count=5, max_chars=10_000) == []  # still held
    fetch.ack(r, [first.tag or ""])
    [copy] = fetch.take(r, [HIGH], count=5, max_chars=10_000)
    assert json.loads(copy.raw)["properties"]["copy"] is True and copy.tag == "t1"


def test_a_copy_in_a_tenant_list_passes_that_tenants_turn_only(r: fakeredis.FakeRedis) -> None:
    acme, beta = (fetch.tenant_queue("maas.normal", t) for t in ("acme", "beta"))
    r.lpush(acme, message("a1"))
    r.sadd(fetch.arrivals_key("maas.normal"), "acme")
    [first] = fetch.take(r, ["maas.normal"], count=1, max_chars=10_000)
    r.lpush(acme, message("a1", copy=True))  # acme's only entry: the copy
    r.lpush(beta, message("b1"), message("b2"))
    r.sadd(fetch.arrivals_key("maas.normal"), "acme", "beta")
    # Arrivals are admitted in SPOP's (random) order: a take goes once round the
    # ring past acme's held entry, so beta's two may take one take or two.
    once = [t.tag for t in fetch.take(r, ["maas.normal"], count=5, max_chars=10_000)]
    again = [t.tag for t in fetch.take(r, ["maas.normal"], count=5, max_chars=10_000)]
    assert once and once + again == ["b1", "b2"]
    assert r.llen(acme) == 1 and r.hget("unacked", "a1") is not None
    fetch.ack(r, [first.tag or ""])
    assert [t.tag for t in fetch.take(r, ["maas.normal"], count=5, max_chars=10_000)] == ["a1"]


def test_ack_removes_many_reservations_at_once(r: fakeredis.FakeRedis) -> None:
    r.lpush(HIGH, *(message(f"t{i}") for i in range(5)))
    taken = fetch.take(r, [HIGH], count=5, max_chars=10_000)
    fetch.ack(r, [t.tag or "" for t in taken[:3]])
    assert sorted(r.hkeys("unacked")) == [b"t3", b"t4"]
    assert sorted(r.zrange("unacked_index", 0, -1)) == [b"t3", b"t4"]


def test_key_prefix_applies_to_every_key_and_not_to_the_recorded_queue(
    r: fakeredis.FakeRedis,
) -> None:
    r.lpush("p:" + HIGH, message("t"))
    reply = r.execute_command(*fetch.command([HIGH], count=1, max_chars=10_000, prefix="p:"))
    [taken] = fetch.parse(reply, "p:")
    assert taken.queue == HIGH
    assert json.loads(r.hget("p:unacked", "t"))[2] == HIGH
    assert r.zcard("p:unacked_index") == 1


def test_wake_up_tokens_are_bounded_and_wait_returns_on_one(r: fakeredis.FakeRedis) -> None:
    pipe = r.pipeline()
    fetch.ring(pipe, fetch.WAKE_MAX + 50)
    pipe.execute()
    assert r.llen(fetch.WAKE_KEY) == fetch.WAKE_MAX
    assert fetch.wait(r, 0.01) is True
    r.delete(fetch.WAKE_KEY)
    assert fetch.wait(r, 0.01) is False


def test_queues_of_no_ack_consumers_are_taken_unreserved(r: fakeredis.FakeRedis) -> None:
    # A remote-control reply queue: nothing ever acknowledges its messages, so a
    # reservation would only be put back by the sweep, again and again.
    reply = "abc.reply.celery.pidbox"
    r.lpush(reply, message("pong"))
    r.lpush(HIGH, message("job"))
    reply_ = r.execute_command(
        *fetch.command([reply, HIGH], count=2, max_chars=10_000, unreserved={reply})
    )
    assert [(t.queue, t.reserved) for t in fetch.parse(reply_)] == [(reply, False), (HIGH, True)]
    assert r.hkeys("unacked") == [b"job"]


def test_hand_back_returns_only_what_is_still_reserved(r: fakeredis.FakeRedis) -> None:
    """A message the visibility sweep already put back is not pushed a second time."""
    acme = fetch.tenant_queue("maas.normal", "acme")
    r.lpush(acme, message("a1"), message("a2"))
    r.sadd(fetch.arrivals_key("maas.normal"), "acme")
    r.lpush(HIGH, message("h1"))
    taken = fetch.take(r, [HIGH, "maas.normal"], count=3, max_chars=10_000)
    assert [t.tag for t in taken] == ["h1", "a1", "a2"]
    assert r.llen(acme) == r.llen(HIGH) == 0
    # The sweep restored a2 while its consumer was cut off (kombu: HDEL, ZREM, push).
    r.hdel(fetch.UNACKED_KEY, "a2")
    r.zrem(fetch.UNACKED_INDEX_KEY, "a2")
    r.rpush(acme, message("a2"))
    r.delete(fetch.arrivals_key("maas.normal"), fetch.WAKE_KEY)
    assert fetch.hand_back(r, taken) == {"h1", "a1"}
    # Each once, at the taking end of its own list; acme announced again; one token.
    assert r.lrange(acme, 0, -1) == [message("a2").encode(), message("a1").encode()]
    assert r.lrange(HIGH, 0, -1) == [message("h1").encode()]
    assert r.smembers(fetch.arrivals_key("maas.normal")) == {b"acme"}
    assert r.hlen(fetch.UNACKED_KEY) == r.zcard(fetch.UNACKED_INDEX_KEY) == 0
    assert r.llen(fetch.WAKE_KEY) == 1
    # Handing back again changes nothing: none is held any more.
    assert fetch.hand_back(r, taken) == set()
    assert r.llen(acme) == 2 and r.llen(HIGH) == 1
