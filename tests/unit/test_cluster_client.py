"""The result store's Redis Cluster client, without a cluster: its startup nodes and
options, which cluster errors are outages, the slot grouping on one server, and the
settings that go with it (tests/integration/test_cluster_backend.py runs a real one)."""

from __future__ import annotations

import ssl
from pathlib import Path

import fakeredis
import pytest
import redis
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

from maas_worker.backend.cluster import (
    ClusterUnavailable,
    _is_outage,
    _outage,
    _retry_outage,
    by_slot,
    cluster_options,
    is_cluster,
    mget_many,
)
from maas_worker.errors import ConfigError
from maas_worker.settings import RedisHA, RedisTLS, Settings


def test_the_startup_nodes_are_the_url_s_then_the_listed_ones_once() -> None:
    ha = RedisHA(cluster=True, cluster_nodes="10.0.0.2:7001, 10.0.0.1:7000,[::1]:7002")
    nodes, options = cluster_options(
        "redis://app:p%40ss@10.0.0.1:7000/0", tls=RedisTLS(), ha=ha, common={"socket_timeout": 10}
    )
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    assert (options["username"], options["password"]) == ("app", "p@ss")
    assert options["socket_timeout"] == 10
    assert "ssl" not in options


def test_a_rediss_url_gives_every_node_the_tls_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    _, options = cluster_options(
        "rediss://10.0.0.1:7000/0", tls=RedisTLS(ca=ca), ha=RedisHA(cluster=True)
    )
    assert options["ssl"] is True
    assert options["ssl_ca_certs"] == str(ca)
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_a_seed_that_is_not_host_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="MAAS_REDIS_CLUSTER_NODES"):
        cluster_options(
            "redis://10.0.0.1:7000/0",
            tls=RedisTLS(),
            ha=RedisHA(cluster=True, cluster_nodes="10.0.0.2"),
        )


def test_cluster_outages_are_connection_errors_and_mistakes_are_not() -> None:
    unreachable = RedisClusterException("Redis Cluster cannot be connected. Please provide ...")
    for exc in (ClusterDownError("CLUSTERDOWN"), SlotNotCoveredError("slot"), unreachable):
        assert _is_outage(exc)
        assert isinstance(_outage(exc), ClusterUnavailable)
        assert isinstance(_outage(exc), redis.ConnectionError)
        assert _retry_outage(exc)
    cross = RedisClusterException("EVALSHA - all keys must map to the same key slot")
    assert not _is_outage(cross) and not _retry_outage(cross)
    assert not _retry_outage(redis.TimeoutError("read"))  # it may be running: not again
    assert not _retry_outage(redis.AuthenticationError("WRONGPASS"))


def test_refused_credentials_on_every_node_are_an_authentication_error() -> None:
    try:
        try:
            raise redis.AuthenticationError("WRONGPASS invalid username-password pair")
        except redis.AuthenticationError as cause:
            raise RedisClusterException("Redis Cluster cannot be connected: ...") from cause
    except RedisClusterException as exc:
        mapped = _outage(exc)
    assert type(mapped) is redis.AuthenticationError
    assert not _retry_outage(mapped)


def test_on_one_server_a_batch_stays_one_group() -> None:
    r = fakeredis.FakeRedis()
    assert not is_cluster(r)
    assert by_slot(r, ["maas:{a}:x", "maas:{b}:x", "maas:{a}:y"]) == [[0, 1, 2]]
    assert by_slot(r, []) == []
    r.set("k1", "1")
    r.set("k3", "3")
    assert mget_many(r, ["k1", "k2", "k3"], chunk=2) == [b"1", None, b"3"]
    assert mget_many(r, []) == []


def test_wait_is_accepted_with_a_cluster() -> None:
    # The durability barrier (backend/barrier.py) makes WAIT hold on a cluster.
    env = {"MAAS_BROKER_URL": "redis://10.0.0.1:7000/0", "MAAS_REDIS_CLUSTER": "1"}
    ha = Settings.from_env({**env, "MAAS_REDIS_WAIT_REPLICAS": "1"}).redis_ha
    assert ha.cluster and ha.wait_replicas == 1
