"""Queue shards (shards.py): the placement rule, the shard prefix on every broker key
(fetch.py and the kombu channel's own commands, against fakeredis), the slot map
reading of pinned connections, and backlogs summed over shards.

Connections pinned to a Redis Cluster node, failover included, are tested
against a real cluster in tests/integration/test_shards_cluster.py.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import fakeredis
import pytest
from kombu.transport import redis as kombu_redis

from maas_worker.broker import backlog, fetch, shards
from maas_worker.broker.transport import PrefixedClient
from maas_worker.errors import ConfigError
from maas_worker.settings import Settings

P = "{maas-q2}"
NORMAL = "maas.normal"


def message(tag: str) -> str:
    return json.dumps(
        {
            "body": "QUJD",
            "content-type": "application/json",
            "headers": {"task": "maas.infer", "id": tag},
            "properties": {"delivery_tag": tag},
        }
    )


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_the_placement_rule_is_zlibs_crc32_of_the_utf8_name_mod_n() -> None:
    for tenant in ("acme", "globex", "ünïcode", "a" * 64):
        assert shards.shard_of(tenant, 7) == zlib.crc32(tenant.encode()) % 7
    assert shards.shard_of("acme", 1) == 0
    # Known answers, for producers in other languages.
    assert [shards.shard_of(t, 3) for t in ("acme", "globex", "initech")] == [2, 1, 0]


def test_prefixes_and_shard_lists() -> None:
    assert shards.prefix(3, sharded=True) == "{maas-q3}"
    assert shards.prefix(3, sharded=False) == ""
    assert shards.parse_shards("0, 2-3,2", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="shard 4 does not exist"):
        shards.parse_shards("4", 4)
    settings = Settings.from_env({"MAAS_QUEUE_SHARDS": "4", "MAAS_WORKER_SHARDS": "1-2"})
    assert shards.consumed(settings) == [1, 2]
    assert shards.consumed(settings, "3") == [3]
    assert shards.consumed(Settings.from_env({"MAAS_QUEUE_SHARDS": "3"})) == [0, 1, 2]
    with pytest.raises(ConfigError, match="shard 9 does not exist"):
        shards.consumed(settings, "9")


def test_every_shards_keys_share_one_slot_and_the_shards_spread() -> None:
    slots = [shards.tag_slot(k) for k in range(16)]
    assert len(set(slots)) == 16
    for k in range(16):
        # The hash tag decides: any key under the prefix is in the shard's slot.
        from redis.crc import key_slot

        for key in ("maas.normal.acme", "unacked", "_kombu.binding.celery.pidbox"):
            assert key_slot((shards.prefix(k, sharded=True) + key).encode()) == slots[k]


def test_an_unsharded_deployment_keeps_its_key_names(r: fakeredis.FakeRedis) -> None:
    pipe = r.pipeline(transaction=True)
    fetch.push(pipe, NORMAL, "acme", [message("t1")])
    pipe.execute()
    assert sorted(k.decode() for k in r.keys("*")) == [
        "maas.normal.acme",
        "maas:arrivals:maas.normal",
        "maas:wake",
    ]
    assert Settings.from_env({}).redis_ha.sharded is False
    assert shards.shard_transport_options(Settings.from_env({})) == {}


def test_push_take_ack_and_hand_back_stay_under_the_shard_prefix(r: fakeredis.FakeRedis) -> None:
    pipe = r.pipeline(transaction=True)
    fetch.push(pipe, NORMAL, "acme", [message("t1"), message("t2")], P)
    pipe.execute()
    fetch.publish_weights(r, {"acme": 3}, P)
    assert all(k.decode().startswith(P) for k in r.keys("*"))
    taken = fetch.take(r, [NORMAL], count=2, max_chars=10_000, prefix=P)
    assert [(t.queue, t.source, t.tag) for t in taken] == [
        (NORMAL, f"{NORMAL}.acme", "t1"),
        (NORMAL, f"{NORMAL}.acme", "t2"),
    ]
    assert r.hlen(P + fetch.UNACKED_KEY) == 2 and r.zcard(P + fetch.UNACKED_INDEX_KEY) == 2
    assert fetch.hand_back(r, taken[1:], P) == {"t2"}
    assert r.lrange(P + f"{NORMAL}.acme", 0, -1) == [message("t2").encode()]
    fetch.ack(r, ["t1"], P)
    assert r.hlen(P + fetch.UNACKED_KEY) == 0
    assert fetch.reannounce(r, ["acme"], P) == 1
    assert fetch.wait(r, 0.01, P) is True
    assert all(k.decode().startswith(P) for k in r.keys("*"))


def test_the_channels_client_prefixes_the_wake_up_trim_too() -> None:
    server = fakeredis.FakeServer()
    client = PrefixedClient(
        connection_pool=fakeredis.FakeRedis(server=server).connection_pool, global_keyprefix=P
    )
    pipe = client.pipeline()
    fetch.ring(pipe)  # LPUSH and LTRIM of the wake-up list
    fetch.announce(pipe, f"{NORMAL}.acme")
    pipe.execute()
    plain = fakeredis.FakeRedis(server=server)
    assert sorted(k.decode() for k in plain.keys("*")) == [
        P + "maas:arrivals:maas.normal",
        P + "maas:wake",
    ]
    assert "LTRIM" not in kombu_redis.GlobalKeyPrefixMixin.PREFIXED_SIMPLE_COMMANDS  # why ours


def test_the_transport_options_name_the_shard_and_the_cluster_seeds() -> None:
    settings = Settings.from_env(
        {
            "MAAS_BROKER_URL": "redis://n1:7000/0",
            "MAAS_REDIS_CLUSTER": "1",
            "MAAS_REDIS_CLUSTER_NODES": "n2:7001, n3:7002",
            "MAAS_QUEUE_SHARDS": "4",
            "MAAS_WORKER_SHARDS": "3,1",
        }
    )
    assert shards.shard_transport_options(settings) == {
        "global_keyprefix": "{maas-q1}",
        shards.CLUSTER_SEEDS_OPTION: [("n1", 7000), ("n2", 7001), ("n3", 7002)],
    }
    assert shards.shard_transport_options(settings, 3)["global_keyprefix"] == "{maas-q3}"


def slots_reply(*ranges: tuple[int, int, str, int]) -> list[Any]:
    return [
        [lo, hi, [host.encode(), port, b"id"], [b"127.0.0.9", 9, b"r"]]
        for lo, hi, host, port in ranges
    ]


def test_the_slot_owner_is_read_from_cluster_slots_and_forgotten_on_demand() -> None:
    owner = shards.SlotOwner([("seed", 1)], slot=100)
    reply = slots_reply((0, 99, "a", 1), (100, 200, "?", 2))
    # "?": the node does not know its address: it is the one asked.
    assert owner.learn(("seed", 1), reply) == ("seed", 2)
    assert owner.cached() == ("seed", 2)
    assert ("127.0.0.9", 9) in owner.candidates()  # replicas are asked next time too
    owner.forget()
    assert owner.cached() is None
    with pytest.raises(Exception, match="no Redis Cluster node serves slot 100"):
        owner.learn(("seed", 1), slots_reply((0, 99, "a", 1)))


def test_backlogs_of_shards_are_summed() -> None:
    one = backlog.Backlog(
        {"high": 1, "normal": 2, "low": 0},
        {"high": 5.0, "normal": None, "low": None},
        {"normal": {"acme": 2}},
        {"normal": {"acme": 1.0}},
    )
    two = backlog.Backlog(
        {"high": 0, "normal": 3, "low": 1},
        {"high": None, "normal": 7.0, "low": 2.0},
        {"normal": {"globex": 3}},
        {"normal": {"globex": 7.0}},
    )
    both = backlog.merge([one, two])
    assert both.depth == {"high": 1, "normal": 5, "low": 1}
    assert both.oldest_age_s == {"high": 5.0, "normal": 7.0, "low": 2.0}
    assert both.by_tenant() == {"acme": 2, "globex": 3}


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_async_clients_keep_our_connection_class_whatever_the_scheme(scheme: str) -> None:
    """redis.asyncio's from_url puts the URL scheme's class over the one given: a
    ``rediss://`` shard client once lost its pinning (its connections went to the
    URL's node), and the plain TLS client its READONLY-is-an-outage class."""
    import redis.asyncio

    from maas_worker.backend.redis import async_redis_client
    from maas_worker.settings import Settings

    url = f"{scheme}://127.0.0.1:7000/0"
    plain = Settings.from_env({"MAAS_BROKER_URL": url})
    client = async_redis_client(url, tls=plain.redis_tls)
    assert client.connection_pool.connection_class.__module__ == "maas_worker.backend.redis"
    on_cluster = Settings.from_env({"MAAS_BROKER_URL": url, "MAAS_REDIS_CLUSTER": "1"})
    pinned = shards.async_broker_client(on_cluster, 1).connection_pool.connection_class
    assert pinned.__name__.startswith("Pinned") and pinned.locator.slot == shards.tag_slot(1)
    assert issubclass(pinned, redis.asyncio.SSLConnection) is (scheme == "rediss")
