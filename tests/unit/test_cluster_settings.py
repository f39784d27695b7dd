"""Settings of a Redis Cluster deployment and the queue shard placement rule."""

from __future__ import annotations

import zlib

import pytest

from maas_worker.broker.shards import parse_shards, prefix, shard_of
from maas_worker.errors import ConfigError
from maas_worker.settings import Settings

SEED = "redis://127.0.0.1:7000/0"


def test_the_placement_rule_is_crc32_of_the_tenant_mod_n() -> None:
    for tenant in ("acme", "globex", "initech", "t\u00e9"):
        assert shard_of(tenant, 7) == zlib.crc32(tenant.encode()) % 7
        assert shard_of(tenant, 1) == 0
    # The documented values, for producers in other languages.
    assert [shard_of(t, 3) for t in ("acme", "globex", "initech")] == [
        zlib.crc32(b"acme") % 3,
        zlib.crc32(b"globex") % 3,
        zlib.crc32(b"initech") % 3,
    ]


def test_a_shard_prefix_is_a_hash_tag_only_when_sharded() -> None:
    assert prefix(4, sharded=True) == "{maas-q4}"
    assert prefix(0, sharded=False) == ""


def test_shard_lists_parse_and_bad_ones_are_refused() -> None:
    assert parse_shards("0,2-4, 3", 6) == [0, 2, 3, 4]
    for bad in ("", "6", "3-1", "x"):
        with pytest.raises(ValueError):
            parse_shards(bad, 6)


def test_cluster_settings_read_and_imply_sharding() -> None:
    s = Settings.from_env(
        {"MAAS_BROKER_URL": SEED, "MAAS_REDIS_CLUSTER": "1", "MAAS_QUEUE_SHARDS": "6"}
    )
    assert (s.redis_ha.cluster, s.redis_ha.queue_shards, s.redis_ha.sharded) == (True, 6, True)
    one = Settings.from_env({"MAAS_BROKER_URL": SEED, "MAAS_REDIS_CLUSTER": "1"})
    assert one.redis_ha.sharded  # one shard on a cluster still carries its hash tag
    assert not Settings.from_env({"MAAS_BROKER_URL": SEED}).redis_ha.sharded


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAAS_BROKER_URL": "redis://127.0.0.1:7000/3"}, "database 0 only"),
        ({"MAAS_BROKER_URL": "redis+socket:///tmp/r.sock"}, "redis:// or rediss://"),
        ({"MAAS_QUEUE_SHARDS": "0"}, "MAAS_QUEUE_SHARDS"),
    ],
)
def test_cluster_settings_refuse_what_a_cluster_cannot_be(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"MAAS_BROKER_URL": SEED, "MAAS_REDIS_CLUSTER": "1", **env})


def test_cluster_nodes_without_a_cluster_is_refused() -> None:
    with pytest.raises(ConfigError, match="MAAS_REDIS_CLUSTER is not"):
        Settings.from_env({"MAAS_BROKER_URL": SEED, "MAAS_REDIS_CLUSTER_NODES": "h:1"})
