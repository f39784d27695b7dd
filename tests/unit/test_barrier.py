"""The durability barrier's pieces that need no cluster (backend/barrier.py); on a
real Redis Cluster: tests/integration/test_cluster_wait.py."""

from __future__ import annotations

import fakeredis
import pytest
from redis.crc import key_slot

from maas_worker.backend import barrier, keyspace
from maas_worker.backend.redis import NotReplicated
from maas_worker.settings import RedisHA


def test_the_barrier_key_is_in_its_tenants_slot() -> None:
    for tenant in ("acme", "globex", "a-b_c"):
        key = keyspace.barrier(tenant)
        assert key.startswith(keyspace.tenant_prefix(tenant))
        assert key_slot(key.encode()) == key_slot(keyspace.claim(tenant, "x").encode())


def test_on_one_server_there_is_no_barrier() -> None:
    # One server or Sentinel: WAIT rides in the writes' own pipeline, as before.
    r = fakeredis.FakeRedis()
    assert barrier.pin(r, ["acme"]) is None
    barrier.confirm(r, None, RedisHA(wait_replicas=1), "test")
    assert r.keys("*") == []  # nothing written


def test_a_refused_or_short_barrier_is_no_confirmation() -> None:
    ha = RedisHA(wait_replicas=1, wait_timeout_ms=100)
    barrier._check("n:1", ["OK", 1], ha, "x")
    with pytest.raises(NotReplicated, match="0 of 1 replica"):
        barrier._check("n:1", ["OK", 0], ha, "x")
    moved = Exception("MOVED 1234 127.0.0.1:7001")
    with pytest.raises(NotReplicated, match="barrier refused by n:1"):
        barrier._check("n:1", [moved, 1], ha, "x")
