"""Fair share in the atomic take (fetch.py, pop_reserve.lua) against fakeredis.

Producers push to their tenant's list and name themselves in the arrivals
(`fetch.push`); the take admits arrivals to the priority's ring and serves its
tenants in turn, ``weight`` takes per turn. With real workers: tests/integration/
test_fairshare.py.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from maas_worker.broker import fetch

HIGH, NORMAL, LOW = "maas.high", "maas.normal", "maas.low"
QUEUES = [HIGH, NORMAL, LOW]


def message(tag: str, **props: Any) -> str:
    return json.dumps(
        {
            "body": "QUJD",
            "content-type": "application/json",
            "headers": {"task": "maas.infer", "id": tag},
            "properties": {"delivery_tag": tag, **props},
        }
    )


SERIAL = itertools.count()


def push(r: fakeredis.FakeRedis, tenant: str, n: int, queue: str = NORMAL) -> None:
    pipe = r.pipeline(transaction=True)
    # Tags unique per entry, as a producer's are (a tag still reserved holds back its copies).
    fetch.push(pipe, queue, tenant, [message(f"{tenant}-{queue}-{next(SERIAL)}") for _ in range(n)])
    pipe.execute()


def take(r: fakeredis.FakeRedis, count: int = 1, **kw: Any) -> list[fetch.Taken]:
    return fetch.take(r, QUEUES, count=count, max_chars=100_000, **kw)


def tenants(taken: list[fetch.Taken]) -> list[str | None]:
    return [t.tenant for t in taken]


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_tenants_with_work_are_served_in_turn_and_each_in_its_own_order(
    r: fakeredis.FakeRedis,
) -> None:
    push(r, "acme", 50)
    push(r, "beta", 3)
    push(r, "gamma", 3)
    taken = [take(r)[0] for _ in range(12)]
    # Round robin while all three have work (each round in the ring's order, the
    # same every round), then acme alone.
    rounds = [tenants(taken[i : i + 3]) for i in range(0, 9, 3)]
    assert sorted(rounds[0]) == ["acme", "beta", "gamma"] and rounds == [rounds[0]] * 3
    assert tenants(taken[9:]) == ["acme"] * 3
    # Within a tenant: first in, first out.
    acme = [json.loads(t.raw)["headers"]["id"] for t in taken if t.tenant == "acme"]
    assert acme == [f"acme-{NORMAL}-{i}" for i in range(6)]
    # Each is reserved, recorded to go back to its tenant's list.
    for t in taken:
        _, exchange, routing_key = json.loads(r.hget("unacked", t.tag))
        assert (t.queue, t.source, exchange, routing_key) == (
            NORMAL,
            f"{NORMAL}.{t.tenant}",
            "",
            f"{NORMAL}.{t.tenant}",
        )
    # A tenant whose list empties leaves the ring; an empty ring takes nothing.
    assert r.lrange(fetch.ring_key(NORMAL), 0, -1) == [b"acme"]
    assert [t.tenant for t in take(r, count=100)] == ["acme"] * 44
    assert r.llen(fetch.ring_key(NORMAL)) == 0 and r.hlen(fetch.ring_key(NORMAL) + ":credit") == 0
    assert take(r) == []


def test_a_newcomer_waits_one_turn_of_each_busy_tenant_not_their_backlog(
    r: fakeredis.FakeRedis,
) -> None:
    push(r, "acme", 800)
    push(r, "bulk", 800)
    take(r, count=10)
    push(r, "beta", 10)
    seen: list[str | None] = []
    while "beta" not in seen:
        seen += tenants(take(r))
    # Admitted behind the two busy tenants: at most one job of each first.
    assert len(seen) <= 3, seen
    # And from then on every third take is beta's, until its ten are done.
    rest = tenants(take(r, count=27))
    assert rest.count("beta") == 9 and Counter(rest)["acme"] == Counter(rest)["bulk"] == 9


def test_many_job_ids_or_pushes_earn_a_tenant_no_more_turns(r: fakeredis.FakeRedis) -> None:
    push(r, "beta", 100)
    for _ in range(50):  # a flood in many small pushes, each announcing acme again
        push(r, "acme", 20)
    counts = Counter(tenants(take(r, count=100)))
    assert counts == {"acme": 50, "beta": 50}


def test_weights_give_that_many_takes_per_turn(r: fakeredis.FakeRedis) -> None:
    assert fetch.publish_weights(r, {"acme": 3, "beta": 1, "gamma": 2}) is True
    assert r.hgetall(fetch.WEIGHTS_KEY) == {b"acme": b"3", b"gamma": b"2"}  # 1 is the default
    assert fetch.publish_weights(r, {"acme": 3, "gamma": 2}) is False  # unchanged: no write
    for t in ("acme", "beta", "gamma"):
        push(r, t, 1000)
    counts = Counter(tenants(take(r, count=600)))
    assert counts == {"acme": 300, "beta": 100, "gamma": 200}
    # A changed weight holds from the tenant's next turn.
    fetch.publish_weights(r, {})
    take(r, count=6)  # every tenant's current turn ends within these
    assert Counter(tenants(take(r, count=300))) == {"acme": 100, "beta": 100, "gamma": 100}


def test_a_weight_beyond_the_maximum_is_capped(r: fakeredis.FakeRedis) -> None:
    r.hset(fetch.WEIGHTS_KEY, mapping={"acme": "1000000", "beta": "-3"})
    push(r, "acme", 500)
    push(r, "beta", 500)
    counts = Counter(tenants(take(r, count=(fetch.MAX_WEIGHT + 1) * 2)))
    assert counts == {"acme": fetch.MAX_WEIGHT * 2, "beta": 2}


def test_priority_order_holds_and_the_old_single_list_goes_first(r: fakeredis.FakeRedis) -> None:
    push(r, "acme", 3, LOW)
    push(r, "acme", 3, NORMAL)
    r.lpush(NORMAL, message("legacy-1"), message("legacy-2"))  # queued before an upgrade
    push(r, "beta", 1, HIGH)
    taken = take(r, count=9)
    assert [(t.queue, t.tenant) for t in taken] == [
        (HIGH, "beta"),
        (NORMAL, None),
        (NORMAL, None),
        (NORMAL, "acme"),
        (NORMAL, "acme"),
        (NORMAL, "acme"),
        (LOW, "acme"),
        (LOW, "acme"),
        (LOW, "acme"),
    ]
    _, _, routing_key = json.loads(r.hget("unacked", "legacy-1"))
    assert routing_key == NORMAL  # back to the list it came from


def test_arrivals_are_checked_before_they_join_the_ring(r: fakeredis.FakeRedis) -> None:
    push(r, "acme", 2)
    # What anyone who may SADD could add: other names, junk, names with nothing queued.
    r.sadd(fetch.arrivals_key(NORMAL), "beta", "NOT A TENANT", "x" * 80, "../acme", "")
    assert tenants(take(r, count=5)) == ["acme", "acme"]
    assert r.llen(fetch.ring_key(NORMAL)) == 0
    assert r.scard(fetch.arrivals_key(NORMAL)) == 0  # all looked at, none admitted


def test_a_stale_ring_entry_is_dropped(r: fakeredis.FakeRedis) -> None:
    # In the ring with nothing queued (their lists deleted behind the ring's back).
    r.rpush(fetch.ring_key(NORMAL), "acme", "beta")
    r.hset(fetch.ring_key(NORMAL) + ":credit", mapping={"acme": 1, "beta": 1})
    push(r, "gamma", 1)
    assert tenants(take(r, count=5)) == ["gamma"]
    assert r.llen(fetch.ring_key(NORMAL)) == 0


def test_a_handed_back_message_returns_to_its_tenant_and_is_taken_again(
    r: fakeredis.FakeRedis,
) -> None:
    push(r, "acme", 1)
    (t,) = take(r)
    assert r.llen(fetch.ring_key(NORMAL)) == 0  # its list is empty: out of the ring
    # As hand_back.lua and kombu's restore do: the reservation ends, the entry goes back.
    pipe = r.pipeline(transaction=True)
    pipe.hdel(fetch.UNACKED_KEY, t.tag or "")
    pipe.rpush(t.source, t.raw)
    fetch.announce(pipe, t.source)
    pipe.execute()
    (again,) = take(r)
    assert (again.raw, again.tenant) == (t.raw, "acme")


def test_reannounce_puts_jobs_outside_the_ring_back_in_turn(r: fakeredis.FakeRedis) -> None:
    # Jobs whose arrival was lost (a crash between a push and its SADD).
    r.lpush(fetch.tenant_queue(LOW, "acme"), message("lost"))
    assert take(r) == []
    assert fetch.reannounce(r, ["acme", "beta"]) == 1
    assert [t.tag for t in take(r)] == ["lost"]


def test_the_key_prefix_applies_to_every_key_of_the_ring(r: fakeredis.FakeRedis) -> None:
    p = "pfx:"
    r.lpush(p + fetch.tenant_queue(NORMAL, "acme"), message("a1"))
    r.sadd(p + fetch.arrivals_key(NORMAL), "acme")
    reply = r.execute_command(*fetch.command([NORMAL], count=2, max_chars=10_000, prefix=p))
    (t,) = fetch.parse(reply, p)
    assert (t.queue, t.source, t.tenant) == (NORMAL, f"{NORMAL}.acme", "acme")
    assert json.loads(r.hget(p + "unacked", "a1"))[2] == f"{NORMAL}.acme"
    assert r.lrange(p + fetch.ring_key(NORMAL), 0, -1) == []  # emptied: left the ring


def test_tenant_list_names_are_parsed_strictly() -> None:
    assert fetch.split_tenant_queue("maas.normal.acme") == ("maas.normal", "acme")
    assert fetch.split_tenant_queue("maas.high.a.b-c_d") == ("maas.high", "a.b-c_d")
    for bad in ("maas.normal", "maas.normal.", "maas.normal.ACME", "other.acme", "maas.monitor.x"):
        assert fetch.split_tenant_queue(bad) is None, bad


#: The take as merged with fair share (#20), before it was made cheaper: the
#: reference for the rule. The current take must do exactly what it did.
REFERENCE_TAKE = (Path(__file__).parent / "data" / "pop_reserve_as_merged.lua").read_text()


def reference_command(
    queues: list[str], count: int, prefix: str = "", unreserved: Collection[str] = ()
) -> list[Any]:
    """The reference take's command (its KEYS and ARGV layout, as fetch.command built it)."""
    srcs = fetch.sources(queues)
    flags = "".join(
        "r" if kind == "ring" else "0" if fetch.base_queue(k) in unreserved else "1"
        for kind, k in srcs
    )
    names = ("unacked", "unacked_index", fetch.WEIGHTS_KEY, *(k for _, k in srcs))
    keys = [prefix + k for k in names]
    return [
        "EVAL",
        REFERENCE_TAKE,
        len(keys),
        *keys,
        count,
        "1.0",
        100_000,
        fetch.PRIORITY_SEP,
        prefix,
        flags,
        fetch.RING_PREFIX,
        fetch.ARRIVALS_PREFIX,
        fetch.ADMIT_PER_TAKE,
        fetch.MAX_WEIGHT,
    ]


def state(r: fakeredis.FakeRedis, prefix: str) -> dict[str, Any]:
    """Everything the take writes, under ``prefix``."""
    out: dict[str, Any] = {
        "unacked": sorted(r.hgetall(prefix + "unacked").items()),
        REPLY: r.llen(prefix + REPLY),
    }
    for q in QUEUES:
        ring = prefix + fetch.ring_key(q)
        out[q] = (
            r.lrange(ring, 0, -1),
            r.hgetall(ring + fetch.CREDIT_SUFFIX),
            sorted(r.smembers(prefix + fetch.arrivals_key(q))),
            r.llen(prefix + q),
            {t: r.llen(prefix + fetch.tenant_queue(q, t)) for t in ALL_TENANTS},
        )
    return out


ALL_TENANTS = ("acme", "beta", "gamma", "delta", "omega")
#: A queue outside fair share, consumed without acknowledgement (a remote-control reply).
REPLY = "abc.reply.celery.pidbox"


@pytest.mark.parametrize("seed", range(4))
def test_the_take_does_what_the_merged_take_did(seed: int) -> None:
    """Random pushes, old-list jobs, weights, junk arrivals, lists emptied behind
    the ring's back and takes of any size, the queues in any order (the worker
    lets a starved lower priority go first) with a plain list among them, on two
    servers: one taken by the reference (the take as merged), one by
    fetch.command; the same messages come out, in the same order, and every key
    the take writes ends the same."""
    rng = random.Random(seed)
    prefix = rng.choice(["", "pfx:"])
    ref = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    new = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    n = 0
    for step in range(300):
        op = rng.random()
        queue = rng.choice(QUEUES)
        tenant = rng.choice(ALL_TENANTS)
        msgs = [message(f"m{n + i}") for i in range(rng.randint(1, 4))]
        weights = {t: rng.randint(1, 4) for t in rng.sample(ALL_TENANTS, 2)}
        keep_weights = rng.random() < 0.7
        junk = rng.choice(["BAD!", "nobody", tenant])
        for r in (ref, new):
            if op < 0.45:
                r.lpush(prefix + fetch.tenant_queue(queue, tenant), *msgs)
                r.sadd(prefix + fetch.arrivals_key(queue), tenant)
            elif op < 0.5:
                r.lpush(prefix + queue, msgs[0])  # queued before an upgrade
            elif op < 0.53:
                r.delete(prefix + fetch.WEIGHTS_KEY)
                if keep_weights:
                    r.hset(prefix + fetch.WEIGHTS_KEY, mapping=weights)
            elif op < 0.55:
                r.sadd(prefix + fetch.arrivals_key(queue), junk)
            elif op < 0.57:
                r.delete(prefix + fetch.tenant_queue(queue, tenant))  # behind the ring's back
            elif op < 0.6:
                r.lpush(prefix + REPLY, msgs[0])
            elif op < 0.63:  # kombu's priority sub-queue of a message with a priority set
                r.lpush(prefix + queue + fetch.PRIORITY_SEP + "3", msgs[0])
        n += 4
        count = rng.choice([1, 1, 1, 2, 5])
        queues = rng.sample(QUEUES, 3)
        if rng.random() < 0.3:
            queues.insert(rng.randint(0, 3), REPLY)
        # A no-ack consumer of a job queue takes its old list unreserved.
        unreserved = {REPLY, *(rng.sample(QUEUES, 1) if rng.random() < 0.2 else ())}
        # Several tenants waiting in the arrivals are admitted in SPOP's random
        # order; fakeredis draws it from Python's random: the same seed, the
        # same draw for both takes.
        random.seed(step)
        before = fetch.parse(
            ref.execute_command(*reference_command(queues, count, prefix, unreserved))
        )
        random.seed(step)
        after = fetch.parse(
            new.execute_command(
                *fetch.command(
                    queues,
                    count=count,
                    max_chars=100_000,
                    now=1.0,
                    prefix=prefix,
                    unreserved=unreserved,
                )
            )
        )
        assert after == before, step
        assert state(new, prefix) == state(ref, prefix), step
