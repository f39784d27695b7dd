"""Tenant quotas on fakeredis: the client's advisory check and the worker's charge.

`Quotas.advise_many` is what a client asks before it queues a batch: it
reads the bucket without charging it, counts the tenant's queued (pending)
jobs as spent, and records the batch as pending. The charge is the
worker's, inside the claim script (`JobGuard.claim_job` with an admission):
every start of a job is charged, nothing the client writes gets a job past
it.
"""

from __future__ import annotations

import fakeredis
import pytest

from maas_worker.backend import keyspace, scripts
from maas_worker.backend.claims import Claim, JobGuard
from maas_worker.crypto.envelope import now_ms
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.tenancy.quota import Quotas, admission_args, admission_keys

FAR = now_ms() + 3_600_000  # an expiry an hour ahead (ms)
TENANT = "acme"
OTHER = "globex"
#: Refills one token in ~17 minutes: nothing refills during a test.
SLOW = 0.001
JOBS = [f"0b7e8c6a-3f1d-4c2e-9a7b-{i:012x}" for i in range(10)]
J1, J2, J3, J4 = JOBS[:4]


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def q(r: fakeredis.FakeRedis) -> Quotas:
    return Quotas(r)


@pytest.fixture
def guard(r: fakeredis.FakeRedis) -> JobGuard:
    return JobGuard(r, lease_s=15, holder="worker-a")


def start(
    guard: JobGuard,
    job_id: str,
    policy: TenantPolicy,
    *,
    tenant: str = TENANT,
    expires_at_ms: int = FAR,
) -> Claim:
    """A worker starting the job: the claim script, charging the tenant's quota."""
    return guard.claim_job(
        tenant,
        job_id,
        admission=(admission_keys(tenant), admission_args(job_id, policy, expires_at_ms)),
    )


def die(r: fakeredis.FakeRedis, job_id: str, tenant: str = TENANT) -> None:
    """The job's worker died and its lease lapsed: the job can be started again."""
    r.delete(keyspace.claim(tenant, job_id))


def tokens(r: fakeredis.FakeRedis, tenant: str = TENANT) -> float:
    raw = r.hget(keyspace.bucket(tenant), "tokens")
    assert raw is not None, "the bucket was never charged"
    return float(raw)


def members(r: fakeredis.FakeRedis, key: str) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else str(m) for m in r.zrange(key, 0, -1)}


# -- the client's advisory check ---------------------------------------------------------------
def test_unlimited_tenant_needs_no_round_trip(q: Quotas, r: fakeredis.FakeRedis) -> None:
    assert q.advise_many(TENANT, [J1], TenantPolicy(), FAR).admitted
    assert q.advise_many(TENANT, [], TenantPolicy(rate_per_s=1, burst=1), FAR).admitted
    assert not r.keys("*")


def test_advice_charges_nothing_and_records_the_batch_as_pending(
    q: Quotas, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=5)
    # Kept until the jobs expire (and a second more): at most that from now on.
    longest_ms = FAR - now_ms() + 1000
    assert q.advise_many(TENANT, [J1, J2], policy, FAR).admitted
    assert not r.exists(keyspace.bucket(TENANT))
    assert not r.exists(keyspace.in_flight(TENANT))
    assert members(r, keyspace.pending(TENANT)) == {J1, J2}
    assert r.zscore(keyspace.pending(TENANT), J1) == FAR
    assert 0 < r.pttl(keyspace.pending(TENANT)) <= longest_ms


def test_pending_jobs_count_as_spent_then_a_retry_after(q: Quotas, r: fakeredis.FakeRedis) -> None:
    policy = TenantPolicy(rate_per_s=2, burst=3)
    assert q.advise_many(TENANT, [J1, J2], policy, FAR).admitted
    assert q.advise_many(TENANT, [J3], policy, FAR).admitted
    v = q.advise_many(TENANT, [J4], policy, FAR)
    assert not v.admitted and v.over == "rate"
    # One token short at 2 per second.
    assert v.retry_after_s is not None and 0 < v.retry_after_s <= 0.5
    # A refused batch is not recorded.
    assert members(r, keyspace.pending(TENANT)) == {J1, J2, J3}
    assert not r.exists(keyspace.bucket(TENANT))


def test_a_batch_is_all_or_nothing(q: Quotas, r: fakeredis.FakeRedis) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=3)
    assert q.advise_many(TENANT, [J1, J2], policy, FAR).admitted
    v = q.advise_many(TENANT, [J3, J4], policy, FAR)
    assert not v.admitted and v.over == "rate" and v.retry_after_s is not None
    assert members(r, keyspace.pending(TENANT)) == {J1, J2}


def test_a_batch_larger_than_the_burst_can_never_pass(q: Quotas) -> None:
    policy = TenantPolicy(rate_per_s=100, burst=3)
    v = q.advise_many(TENANT, JOBS[:4], policy, FAR)
    assert not v.admitted and v.over == "rate" and v.retry_after_s is None


def test_tokens_the_workers_charged_are_not_advised_again(q: Quotas, guard: JobGuard) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=2)
    assert start(guard, J1, policy).outcome == "claimed"
    assert start(guard, J2, policy).outcome == "claimed"
    v = q.advise_many(TENANT, [J3], policy, FAR)
    assert not v.admitted and v.over == "rate" and v.retry_after_s is not None


def test_in_flight_cap_counts_in_flight_and_pending(
    q: Quotas, guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(max_in_flight=3)
    assert start(guard, J1, policy).outcome == "claimed"  # running: in flight
    assert q.advise_many(TENANT, [J2, J3], policy, FAR).admitted  # 1 + 0 + 2
    v = q.advise_many(TENANT, [J4], policy, FAR)  # 1 + 2 + 1
    assert not v.admitted and v.over == "in_flight" and v.retry_after_s is None
    # A queued job starting moves from pending to in flight: still full.
    assert start(guard, J2, policy).outcome == "claimed"
    assert members(r, keyspace.in_flight(TENANT)) == {J1, J2}
    assert members(r, keyspace.pending(TENANT)) == {J3}
    assert not q.advise_many(TENANT, [J4], policy, FAR).admitted
    q.release(TENANT, J1, policy)
    assert q.advise_many(TENANT, [J4], policy, FAR).admitted


def test_expired_pending_and_in_flight_entries_are_purged(
    q: Quotas, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(max_in_flight=1, rate_per_s=SLOW, burst=1)
    r.zadd(keyspace.pending(TENANT), {J1: 1})  # expired long ago
    r.zadd(keyspace.in_flight(TENANT), {J2: 1})
    assert q.advise_many(TENANT, [J3], policy, FAR).admitted
    assert members(r, keyspace.pending(TENANT)) == {J3}
    assert not r.exists(keyspace.in_flight(TENANT))


def test_tenants_are_advised_separately(q: Quotas) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=1, max_in_flight=1)
    assert q.advise_many(TENANT, [J1], policy, FAR).admitted
    assert not q.advise_many(TENANT, [J2], policy, FAR).admitted
    # The same job id, another tenant: its own bucket and sets.
    assert q.advise_many(OTHER, [J2], policy, FAR).admitted
    assert q.advise_many("initech", [J1], policy, FAR).admitted


# -- the worker's charge (the claim script) ----------------------------------------------------
def test_every_start_is_charged(guard: JobGuard, r: fakeredis.FakeRedis) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=3)
    assert start(guard, J1, policy).outcome == "claimed"
    assert tokens(r) == pytest.approx(2, abs=0.01)
    die(r, J1)
    assert start(guard, J1, policy).outcome == "claimed"  # run again: charged again
    assert tokens(r) == pytest.approx(1, abs=0.01)
    assert start(guard, J2, policy).outcome == "claimed"
    limited = start(guard, J3, policy)
    assert limited.outcome == "rate_limited"
    assert limited.retry_after_s is not None and limited.retry_after_s > 0
    assert r.pttl(keyspace.bucket(TENANT)) > 0


def test_a_rate_limited_start_says_when_to_retry(guard: JobGuard, r: fakeredis.FakeRedis) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=1)
    assert start(guard, J1, policy).outcome == "claimed"
    limited = start(guard, J2, policy)
    assert limited.outcome == "rate_limited"
    # Up to one token short at one per 1000 s.
    assert limited.retry_after_s is not None and 990 < limited.retry_after_s <= 1000
    # Refused before anything was written: not claimed, not counted, not held.
    assert not r.exists(keyspace.claim(TENANT, J2))
    assert not r.exists(keyspace.attempts(TENANT, J2))
    assert guard.held() == [(TENANT, J1)]


def test_sightings_that_do_not_start_the_job_are_not_charged(
    guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=5, max_in_flight=5)
    other_worker = JobGuard(r, lease_s=15, holder="worker-b")
    assert start(guard, J1, policy).outcome == "claimed"
    charged = tokens(r)
    assert start(other_worker, J1, policy).outcome == "busy"
    guard.store_result(TENANT, J2, b"sealed", result_ttl_s=60, replay_window_ms=60_000)
    assert start(other_worker, J2, policy).outcome == "replayed"
    r.set(keyspace.cancel(TENANT, J3), "token")
    assert start(other_worker, J3, policy).outcome == "cancelled"
    assert tokens(r) == pytest.approx(charged, abs=0.01)
    assert members(r, keyspace.in_flight(TENANT)) == {J1}


def test_a_restarted_job_is_not_counted_twice_in_flight(
    guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(max_in_flight=1)
    assert start(guard, J1, policy).outcome == "claimed"
    die(r, J1)
    assert start(guard, J1, policy).outcome == "claimed"
    assert members(r, keyspace.in_flight(TENANT)) == {J1}
    full = start(guard, J2, policy)
    assert full.outcome == "rate_limited" and full.retry_after_s is None
    assert not r.exists(keyspace.claim(TENANT, J2))


def test_starting_a_job_moves_it_from_pending_to_in_flight(
    q: Quotas, guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(max_in_flight=5)
    assert q.advise_many(TENANT, [J1, J2], policy, FAR).admitted
    assert start(guard, J1, policy, expires_at_ms=FAR).outcome == "claimed"
    assert members(r, keyspace.pending(TENANT)) == {J2}
    assert members(r, keyspace.in_flight(TENANT)) == {J1}
    assert r.zscore(keyspace.in_flight(TENANT), J1) == FAR
    assert r.pttl(keyspace.in_flight(TENANT)) > 0


def test_release_frees_the_in_flight_slot(
    q: Quotas, guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(max_in_flight=2)
    assert start(guard, J1, policy).outcome == "claimed"
    assert start(guard, J2, policy).outcome == "claimed"
    assert start(guard, J3, policy).outcome == "rate_limited"
    q.release(TENANT, J1, policy)
    assert start(guard, J3, policy).outcome == "claimed"
    q.release_many([(TENANT, J2), (TENANT, J3)])
    assert not r.exists(keyspace.in_flight(TENANT))


def test_expired_jobs_leave_the_in_flight_set(guard: JobGuard, r: fakeredis.FakeRedis) -> None:
    policy = TenantPolicy(max_in_flight=1)
    assert start(guard, J1, policy, expires_at_ms=1).outcome == "claimed"  # expired long ago
    assert start(guard, J2, policy).outcome == "claimed"
    assert members(r, keyspace.in_flight(TENANT)) == {J2}


def test_workers_charge_tenants_separately(guard: JobGuard) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=1, max_in_flight=1)
    assert start(guard, J1, policy).outcome == "claimed"
    assert start(guard, J2, policy).outcome == "rate_limited"
    assert start(guard, J2, policy, tenant=OTHER).outcome == "claimed"


@pytest.mark.parametrize(
    "policy",
    [TenantPolicy(rate_per_s=SLOW, burst=2), TenantPolicy(max_in_flight=2)],
    ids=["rate", "in-flight"],
)
def test_a_client_that_skips_the_advice_is_still_charged_and_limited(
    guard: JobGuard, policy: TenantPolicy
) -> None:
    outcomes = [start(guard, j, policy).outcome for j in JOBS[:3]]
    assert outcomes == ["claimed", "claimed", "rate_limited"]


@pytest.mark.parametrize(
    "policy",
    [TenantPolicy(rate_per_s=SLOW, burst=2), TenantPolicy(max_in_flight=2)],
    ids=["rate", "in-flight"],
)
def test_keys_a_client_writes_get_no_job_past_the_charge(
    guard: JobGuard, r: fakeredis.FakeRedis, policy: TenantPolicy
) -> None:
    # Everything a producer may write for its jobs: pending entries (here with
    # already-expired and far-future scores), queued markers, payloads.
    r.zadd(keyspace.pending(TENANT), {j: (1 if i % 2 else FAR) for i, j in enumerate(JOBS)})
    for job_id in JOBS:
        r.set(keyspace.submitted(TENANT, job_id), FAR)
        r.set(keyspace.payload(TENANT, job_id), b"sealed request")
    outcomes = [start(guard, j, policy).outcome for j in JOBS[:3]]
    assert outcomes == ["claimed", "claimed", "rate_limited"]


def test_a_wrong_typed_pending_key_does_not_break_the_charge(
    guard: JobGuard, r: fakeredis.FakeRedis
) -> None:
    policy = TenantPolicy(rate_per_s=SLOW, burst=5, max_in_flight=5)
    r.set(keyspace.pending(TENANT), "written by a producer")
    assert start(guard, J1, policy).outcome == "claimed"


def test_a_very_slow_rate_gives_a_retry_after(guard: JobGuard) -> None:
    policy = TenantPolicy.from_json({"rate_per_s": 1e-12, "burst": 1})
    assert start(guard, J1, policy).outcome == "claimed"
    limited = start(guard, J2, policy)
    assert limited.outcome == "rate_limited"
    assert limited.retry_after_s is not None and limited.retry_after_s > 0


def test_policy_json_round_trip_with_quotas() -> None:
    p = TenantPolicy(("echo",), "normal", rate_per_s=2.5, burst=5, max_in_flight=10)
    assert TenantPolicy.from_json(p.to_json()) == p
    with pytest.raises(Exception, match="burst"):
        TenantPolicy.from_json({"burst": 1.5})


def _cancel(r: fakeredis.FakeRedis, job_id: str) -> int:
    """The client's cancel script (cancel.lua), as `Job.cancel` runs it."""
    t = TENANT
    return int(
        scripts.register(r, "cancel")(
            keys=[
                keyspace.result(t, job_id),
                keyspace.cancel(t, job_id),
                keyspace.done(t, job_id),
                keyspace.submitted(t, job_id),
                keyspace.rejected(t, job_id),
                keyspace.claim(t, job_id),
                keyspace.pending(t),
            ],
            args=["token", 60_000, 60_000, job_id, keyspace.MAX_TTL_MS],
        )
    )


def test_a_cancelled_queued_job_frees_its_place_at_once(r: fakeredis.FakeRedis, q: Quotas) -> None:
    policy = TenantPolicy(max_in_flight=1)
    assert q.advise_many(TENANT, [J1], policy, FAR).admitted
    r.set(keyspace.submitted(TENANT, J1), str(FAR))
    assert not q.advise_many(TENANT, [J2], policy, FAR).admitted
    assert _cancel(r, J1) == 1
    assert q.advise_many(TENANT, [J2], policy, FAR).admitted


def test_a_cancel_of_no_job_of_this_tenant_writes_nothing(r: fakeredis.FakeRedis) -> None:
    assert _cancel(r, J1) == -1
    assert r.keys("*") == []


def test_a_job_closed_by_a_worker_leaves_the_pending_set(r: fakeredis.FakeRedis, q: Quotas) -> None:
    policy = TenantPolicy(max_in_flight=1)
    assert q.advise_many(TENANT, [J1], policy, FAR).admitted
    JobGuard(r, lease_s=15, holder="w").close(TENANT, J1, window_ms=60_000)
    assert r.zcard(keyspace.pending(TENANT)) == 0
    assert q.advise_many(TENANT, [J2], policy, FAR).admitted
