"""The quota admission script (token bucket + in-flight cap) on fakeredis."""

from __future__ import annotations

import fakeredis
import pytest

from maas_worker import keyspace
from maas_worker.envelope import now_ms
from maas_worker.keys import TenantPolicy
from maas_worker.quota import Quotas

FAR = now_ms() + 3_600_000  # an expiry an hour ahead (ms)


@pytest.fixture
def q() -> Quotas:
    return Quotas(fakeredis.FakeRedis())


def test_unlimited_tenant_needs_no_round_trip(q: Quotas) -> None:
    assert q.admit("t", "j", TenantPolicy(), FAR).admitted
    assert not q._r.keys("*")


def test_burst_then_refused_with_a_retry_after(q: Quotas) -> None:
    policy = TenantPolicy(rate_per_s=2, burst=3)
    assert [q.admit("t", f"j{i}", policy, FAR).admitted for i in range(3)] == [True] * 3
    v = q.admit("t", "j3", policy, FAR)
    assert not v.admitted and v.over == "rate"
    assert v.retry_after_s is not None and 0 < v.retry_after_s <= 0.5


def test_a_job_is_charged_once(q: Quotas) -> None:
    policy = TenantPolicy(rate_per_s=1, burst=1)
    assert q.admit("t", "same", policy, FAR).admitted
    assert q.admit("t", "same", policy, FAR).admitted  # the worker's check after the client's
    assert not q.admit("t", "other", policy, FAR).admitted


def test_tenants_have_separate_buckets(q: Quotas) -> None:
    policy = TenantPolicy(rate_per_s=1, burst=1)
    assert q.admit("a", "j1", policy, FAR).admitted
    assert not q.admit("a", "j2", policy, FAR).admitted
    assert q.admit("b", "j3", policy, FAR).admitted


def test_in_flight_cap_and_release(q: Quotas) -> None:
    policy = TenantPolicy(max_in_flight=2)
    assert q.admit("t", "j1", policy, FAR).admitted
    assert q.admit("t", "j2", policy, FAR).admitted
    v = q.admit("t", "j3", policy, FAR)
    assert not v.admitted and v.over == "in_flight" and v.retry_after_s is None
    q.release("t", "j1", policy)
    assert q.admit("t", "j3", policy, FAR).admitted


def test_expired_jobs_leave_the_in_flight_set(q: Quotas) -> None:
    policy = TenantPolicy(max_in_flight=1)
    assert q.admit("t", "old", policy, 1).admitted  # expired long ago
    assert q.admit("t", "new", policy, FAR).admitted
    assert q._r.zrange(keyspace.in_flight("t"), 0, -1) == [b"new"]


def test_policy_json_round_trip_with_quotas() -> None:
    p = TenantPolicy(("echo",), "normal", rate_per_s=2.5, burst=5, max_in_flight=10)
    assert TenantPolicy.from_json(p.to_json()) == p
    with pytest.raises(Exception, match="burst"):
        TenantPolicy.from_json({"burst": 1.5})
