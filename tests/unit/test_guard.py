"""JobGuard's Lua scripts (claim, lease, write-once result, rejection, faults) on fakeredis.

A job is the pair (tenant, job id): every call names both, and every key a
test looks at is the tenant's own (keyspace.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import fakeredis
import pytest
import redis

from maas_worker.backend import keyspace
from maas_worker.backend.claims import ClaimRequest, JobGuard, new_holder_id
from maas_worker.crypto.envelope import now_ms
from maas_worker.protocol import AuditReason
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.tenancy.quota import admission_args, admission_keys

LEASE_S = 15
RESULT_TTL_S = 60
REPLAY_WINDOW_MS = 120_000
TENANT = "acme"
OTHER = "globex"
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"
JOB_2 = "1c8f9d7b-4a2e-4d3f-8b8c-6e7f5a4b3c2d"
JOB_3 = "2d9a0e8c-5b3f-4e4a-9c9d-7f8a6b5c4d3e"
JOB_4 = "3e0b1f9d-6c4a-4f5b-8d0e-8a9b7c6d5e4f"


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def r(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def a(r: fakeredis.FakeRedis) -> JobGuard:
    return JobGuard(r, lease_s=LEASE_S, holder="worker-a")


@pytest.fixture
def b(server: fakeredis.FakeServer) -> JobGuard:
    # A second process, with its own connection to the same Redis.
    return JobGuard(fakeredis.FakeRedis(server=server), lease_s=LEASE_S, holder="worker-b")


def _store(guard: JobGuard, sealed: bytes, job_id: str = JOB, tenant: str = TENANT) -> bool:
    return guard.store_result(
        tenant, job_id, sealed, result_ttl_s=RESULT_TTL_S, replay_window_ms=REPLAY_WINDOW_MS
    )


def _wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def _die(r: fakeredis.FakeRedis, job_id: str = JOB, tenant: str = TENANT) -> None:
    """Simulate a dead holder: its lease is not renewed and lapses (1 ms left)."""
    r.pexpire(keyspace.claim(tenant, job_id), 1)
    _wait_until(lambda: not r.exists(keyspace.claim(tenant, job_id)))


def _tokens(r: fakeredis.FakeRedis, tenant: str = TENANT) -> float:
    raw = r.hget(keyspace.bucket(tenant), "tokens")
    assert raw is not None
    return float(raw)


def test_holder_ids_are_unique() -> None:
    assert new_holder_id() != new_holder_id()
    guard = JobGuard(fakeredis.FakeRedis(server=fakeredis.FakeServer()), lease_s=LEASE_S)
    assert guard.holder
    assert guard.lease_ms == LEASE_S * 1000


def test_claim_stores_holder_with_lease(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"
    assert 0 < r.pttl(keyspace.claim(TENANT, JOB)) <= LEASE_S * 1000
    assert a.held() == [(TENANT, JOB)]


def test_second_claim_while_lease_is_live_is_busy(a: JobGuard, b: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert b.claim(TENANT, JOB) == "busy"
    # Redelivered to the holder itself while it still runs: not run twice either.
    assert a.claim(TENANT, JOB) == "busy"


def test_claims_are_per_job(a: JobGuard, b: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert b.claim(TENANT, JOB_2) == "claimed"


def test_after_store_result_claims_are_replayed(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert _store(a, b"sealed-1") is True
    assert r.get(keyspace.result(TENANT, JOB)) == b"sealed-1"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert b.claim(TENANT, JOB) == "replayed"
    assert a.claim(TENANT, JOB) == "replayed"


def test_result_is_write_once(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert _store(a, b"first") is True
    assert _store(b, b"second") is False
    assert _store(a, b"third") is False
    assert r.get(keyspace.result(TENANT, JOB)) == b"first"


def test_store_sets_expiries(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    assert 0 < r.pttl(keyspace.result(TENANT, JOB)) <= RESULT_TTL_S * 1000
    # The claim stays "done" for the longer of the replay window and the result TTL.
    assert RESULT_TTL_S * 1000 < r.pttl(keyspace.claim(TENANT, JOB)) <= REPLAY_WINDOW_MS
    assert 0 < r.pttl(keyspace.done(TENANT, JOB)) <= RESULT_TTL_S * 1000


def test_store_deletes_the_claim_checked_payload(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    r.set(keyspace.payload(TENANT, JOB), b"sealed request")
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    assert not r.exists(keyspace.payload(TENANT, JOB))


def test_replayed_when_only_the_result_exists(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    # The claim marker expired (or was lost) but the result is still there.
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    r.delete(keyspace.claim(TENANT, JOB))
    assert a.claim(TENANT, JOB) == "replayed"


def test_lapsed_lease_is_taken_over(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    assert b.claim(TENANT, JOB) == "busy"
    _die(r)
    assert b.claim(TENANT, JOB) == "claimed"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-b"
    assert a.claim(TENANT, JOB) == "busy"


def test_deleted_claim_is_taken_over(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    r.delete(keyspace.claim(TENANT, JOB))
    assert b.claim(TENANT, JOB) == "claimed"


def test_slow_holder_finishing_after_takeover_keeps_one_result(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(TENANT, JOB)
    _die(r)  # a stalled, did not renew; b took over
    assert b.claim(TENANT, JOB) == "claimed"
    assert _store(a, b"from-a") is True
    assert _store(b, b"from-b") is False
    assert r.get(keyspace.result(TENANT, JOB)) == b"from-a"
    assert r.llen(keyspace.done(TENANT, JOB)) == 1


def test_renew_all_extends_only_our_own_claims(
    server: fakeredis.FakeServer, r: fakeredis.FakeRedis
) -> None:
    a = JobGuard(r, lease_s=100, holder="worker-a")
    b = JobGuard(fakeredis.FakeRedis(server=server), lease_s=5, holder="worker-b")
    mine, lost, theirs = JOB, JOB_2, JOB_3
    assert a.claim(TENANT, mine) == "claimed"
    assert a.claim(TENANT, lost) == "claimed"
    r.pexpire(keyspace.claim(TENANT, mine), 1000)
    _die(r, lost)
    assert b.claim(TENANT, lost) == "claimed"
    assert b.claim(TENANT, theirs) == "claimed"

    a.renew_all()

    assert r.pttl(keyspace.claim(TENANT, mine)) > 50_000
    assert r.get(keyspace.claim(TENANT, mine)) == b"worker-a"
    # Claims held by b keep b's holder and b's short lease.
    for job_id in (lost, theirs):
        assert r.get(keyspace.claim(TENANT, job_id)) == b"worker-b"
        assert r.pttl(keyspace.claim(TENANT, job_id)) <= 5000


def test_renew_all_renews_each_job_under_its_own_tenant(r: fakeredis.FakeRedis) -> None:
    a = JobGuard(r, lease_s=100, holder="worker-a")
    assert a.claim(TENANT, JOB) == "claimed"
    assert a.claim(OTHER, JOB) == "claimed"
    assert sorted(a.held()) == [(TENANT, JOB), (OTHER, JOB)]
    for tenant in (TENANT, OTHER):
        r.pexpire(keyspace.claim(tenant, JOB), 1000)
    a.renew_all()
    for tenant in (TENANT, OTHER):
        assert r.pttl(keyspace.claim(tenant, JOB)) > 50_000


def test_renew_all_leaves_finished_jobs_alone(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    ttl = r.pttl(keyspace.claim(TENANT, JOB))
    a.renew_all()
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert r.pttl(keyspace.claim(TENANT, JOB)) <= ttl
    assert r.pttl(keyspace.claim(TENANT, JOB)) > LEASE_S * 1000


def test_renew_all_does_not_recreate_a_lapsed_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _die(r)
    a.renew_all()
    assert not r.exists(keyspace.claim(TENANT, JOB))


def test_release_releases_only_our_own_claim(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    b.release(TENANT, JOB)  # b never held it
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"
    a.release(TENANT, JOB)
    assert not r.exists(keyspace.claim(TENANT, JOB))
    assert a.held() == []
    assert b.claim(TENANT, JOB) == "claimed"  # released: the job can be retried
    a.release(TENANT, JOB)  # a no longer holds it
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-b"


def test_release_after_result_keeps_it_done(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    a.release(TENANT, JOB)
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert a.claim(TENANT, JOB) == "replayed"


def test_released_job_is_no_longer_renewed(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(TENANT, JOB)
    a.release(TENANT, JOB)
    b.claim(TENANT, JOB)
    before = r.pttl(keyspace.claim(TENANT, JOB))
    r.pexpire(keyspace.claim(TENANT, JOB), 2000)
    a.renew_all()
    assert r.pttl(keyspace.claim(TENANT, JOB)) <= 2000 < before


# -- cancellation ------------------------------------------------------------------------------
def test_a_cancel_request_is_returned_and_the_job_is_not_claimed(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    r.set(keyspace.cancel(TENANT, JOB), "token-1")
    claim = a.claim_job(TENANT, JOB)
    assert claim.outcome == "cancelled" and claim.cancel_token == "token-1"
    assert not r.exists(keyspace.claim(TENANT, JOB))
    assert not r.exists(keyspace.attempts(TENANT, JOB))
    assert a.held() == []
    # A request that failed verification is ignored on the second try.
    assert a.claim_job(TENANT, JOB, ignore_cancel=True).outcome == "claimed"


def test_close_ends_a_job_that_never_ran(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    r.set(keyspace.payload(TENANT, JOB), b"sealed request")
    a.close(TENANT, JOB, window_ms=60_000)
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert 0 < r.pttl(keyspace.claim(TENANT, JOB)) <= 60_000
    assert r.llen(keyspace.done(TENANT, JOB)) == 1
    assert not r.exists(keyspace.payload(TENANT, JOB))
    assert a.claim(TENANT, JOB) == "replayed"


def test_close_never_touches_a_stored_result(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    a.close(TENANT, JOB, window_ms=60_000)
    assert r.get(keyspace.result(TENANT, JOB)) == b"sealed"
    assert r.llen(keyspace.done(TENANT, JOB)) == 1


# -- rejections --------------------------------------------------------------------------------
def test_mark_rejected_never_overwrites_a_result(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    b.mark_suspect(TENANT, JOB, ttl_s=60)
    b.mark_rejected(TENANT, JOB, ttl_s=60)
    assert r.get(keyspace.result(TENANT, JOB)) == b"sealed"
    assert not r.exists(keyspace.rejected(TENANT, JOB))
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert r.llen(keyspace.done(TENANT, JOB)) == 1


def test_authenticated_rejection_closes_the_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    a.mark_rejected(TENANT, JOB, ttl_s=60, reason=AuditReason.POLICY)
    assert r.get(keyspace.rejected(TENANT, JOB)) == b"rejected:policy"
    assert 0 < r.pttl(keyspace.rejected(TENANT, JOB)) <= 60_000
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert a.held() == []
    assert a.claim(TENANT, JOB) == "replayed"


def test_authenticated_rejection_of_an_unclaimed_job_closes_it(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    r.set(keyspace.payload(TENANT, JOB), b"sealed request")
    a.mark_rejected(TENANT, JOB, ttl_s=60, state="expired")
    assert r.get(keyspace.rejected(TENANT, JOB)) == b"expired"
    assert not r.exists(keyspace.payload(TENANT, JOB))
    assert b.claim(TENANT, JOB) == "replayed"


def test_authenticated_rejection_leaves_a_job_another_worker_runs(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    # A stale copy refused by b must not make the client of a's live run give up.
    assert a.claim(TENANT, JOB) == "claimed"
    b.mark_rejected(TENANT, JOB, ttl_s=60)
    assert not r.exists(keyspace.rejected(TENANT, JOB))
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"
    assert r.llen(keyspace.done(TENANT, JOB)) == 0


def test_authenticated_rejection_removes_the_job_from_pending(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    far = now_ms() + 3_600_000
    r.zadd(keyspace.pending(TENANT), {JOB: far, JOB_2: far})
    a.mark_rejected(TENANT, JOB, ttl_s=60)
    assert r.zrange(keyspace.pending(TENANT), 0, -1) == [JOB_2.encode()]


def test_a_wrong_typed_pending_key_does_not_fail_a_rejection(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    r.set(keyspace.pending(TENANT), "written by a producer")
    a.mark_rejected(TENANT, JOB, ttl_s=60)
    assert r.get(keyspace.rejected(TENANT, JOB)) == b"rejected"


def test_suspect_marker_leaves_the_job_alone(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    # A forged message carrying a job id must not block (or close) the real job.
    r.zadd(keyspace.pending(TENANT), {JOB: now_ms() + 3_600_000})
    b.mark_suspect(TENANT, JOB, ttl_s=60)
    assert r.get(keyspace.suspect(TENANT, JOB)) == b"1"
    assert 0 < r.pttl(keyspace.suspect(TENANT, JOB)) <= 60_000
    assert not r.exists(keyspace.rejected(TENANT, JOB))
    assert not r.exists(keyspace.claim(TENANT, JOB))
    assert r.llen(keyspace.done(TENANT, JOB)) == 0
    assert r.zscore(keyspace.pending(TENANT), JOB) is not None
    assert a.claim(TENANT, JOB) == "claimed"


def test_suspect_marker_does_not_touch_a_running_job(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    b.mark_suspect(TENANT, JOB, ttl_s=60)
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"
    assert not r.exists(keyspace.rejected(TENANT, JOB))
    assert r.llen(keyspace.done(TENANT, JOB)) == 0
    assert a.held() == [(TENANT, JOB)]


def test_suspect_marker_does_not_touch_a_finished_job(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    b.mark_suspect(TENANT, JOB, ttl_s=60)
    assert r.get(keyspace.result(TENANT, JOB)) == b"sealed"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"done"
    assert r.llen(keyspace.done(TENANT, JOB)) == 1


def test_done_list_gets_one_element_per_completion(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    ok, bad, never = JOB, JOB_2, JOB_3
    a.claim(TENANT, ok)
    _store(a, b"sealed", ok)
    _store(a, b"sealed", ok)
    assert r.llen(keyspace.done(TENANT, ok)) == 1
    _store(b, b"again", ok)
    assert r.llen(keyspace.done(TENANT, ok)) == 1

    a.mark_rejected(TENANT, bad, ttl_s=60)
    assert r.llen(keyspace.done(TENANT, bad)) == 1
    assert 0 < r.pttl(keyspace.done(TENANT, bad)) <= 60_000
    assert r.llen(keyspace.done(TENANT, never)) == 0


def test_store_result_forgets_the_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(TENANT, JOB)
    _store(a, b"sealed")
    r.set(keyspace.claim(TENANT, JOB), "worker-a", px=1000)  # as if the claim were ours again
    a.renew_all()
    assert r.pttl(keyspace.claim(TENANT, JOB)) <= 1000


# -- tenants -----------------------------------------------------------------------------------
def test_the_same_job_id_of_two_tenants_are_two_jobs(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    # Another tenant's job of the same id is neither busy nor replayed...
    assert b.claim(OTHER, JOB) == "claimed"
    assert _store(b, b"globex-result", tenant=OTHER) is True
    # ...and finishing it leaves the first tenant's job running.
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"
    assert not r.exists(keyspace.result(TENANT, JOB))
    assert r.llen(keyspace.done(TENANT, JOB)) == 0
    assert b.claim(TENANT, JOB) == "busy"
    assert a.held() == [(TENANT, JOB)]
    assert _store(a, b"acme-result") is True
    assert r.get(keyspace.result(TENANT, JOB)) == b"acme-result"
    assert r.get(keyspace.result(OTHER, JOB)) == b"globex-result"


def test_rejecting_or_closing_one_tenants_job_leaves_the_others(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    r.set(keyspace.payload(TENANT, JOB), b"acme request")
    b.mark_rejected(OTHER, JOB, ttl_s=60)
    b.close(OTHER, JOB_2, window_ms=60_000)
    b.mark_suspect(OTHER, JOB_3, ttl_s=60)
    for job_id in (JOB, JOB_2, JOB_3):
        for key in (
            keyspace.rejected(TENANT, job_id),
            keyspace.claim(TENANT, job_id),
            keyspace.done(TENANT, job_id),
            keyspace.suspect(TENANT, job_id),
        ):
            assert not r.exists(key), key
    assert r.get(keyspace.payload(TENANT, JOB)) == b"acme request"
    assert a.claim(TENANT, JOB) == "claimed"
    assert a.claim(TENANT, JOB_2) == "claimed"


def test_a_cancel_request_of_another_tenant_does_not_cancel(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    r.set(keyspace.cancel(OTHER, JOB), "globex-token")
    assert a.claim_job(TENANT, JOB).outcome == "claimed"
    assert a.claim_job(OTHER, JOB).outcome == "cancelled"


def test_payloads_are_read_from_the_tenants_own_key(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    r.set(keyspace.payload(OTHER, JOB), b"globex request")
    assert a.fetch_payload(TENANT, JOB, 100) is None
    assert a.fetch_payload(OTHER, JOB, 100) == b"globex request"
    assert a.fetch_payload(OTHER, JOB, 5) == -1


# -- attempts ----------------------------------------------------------------------------------
def test_a_job_that_keeps_killing_its_worker_is_exhausted(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    """Each start counts; past max_attempts the claim says `exhausted`, not `claimed`."""
    outcomes = []
    for _ in range(a.max_attempts + 1):
        outcomes.append(a.claim(TENANT, JOB, window_ms=60_000))
        _die(r)
    assert outcomes == ["claimed"] * a.max_attempts + ["exhausted"]
    assert 0 < r.pttl(keyspace.attempts(TENANT, JOB)) <= 60_000


def test_busy_and_replayed_sightings_do_not_count_as_attempts(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(TENANT, JOB) == "claimed"
    for _ in range(5):
        assert b.claim(TENANT, JOB) == "busy"
    _store(a, b"sealed")
    for _ in range(5):
        assert b.claim(TENANT, JOB) == "replayed"
    assert r.get(keyspace.attempts(TENANT, JOB)) == b"1"


@pytest.mark.parametrize("window_ms", [2**64, 10**30, keyspace.MAX_TTL_MS + 1])
def test_a_huge_window_is_clamped(r: fakeredis.FakeRedis, a: JobGuard, window_ms: int) -> None:
    assert a.claim(TENANT, JOB, window_ms=window_ms) == "claimed"
    assert 0 < r.pttl(keyspace.attempts(TENANT, JOB)) <= keyspace.MAX_TTL_MS
    assert (
        a.store_result(
            TENANT, JOB, b"sealed", result_ttl_s=RESULT_TTL_S, replay_window_ms=window_ms
        )
        is True
    )
    assert 0 < r.pttl(keyspace.claim(TENANT, JOB)) <= keyspace.MAX_TTL_MS


@pytest.mark.parametrize("window_ms", [0, -5])
def test_a_window_of_nothing_is_no_script_error(
    r: fakeredis.FakeRedis, a: JobGuard, window_ms: int
) -> None:
    # PX 0 or a negative PX would make Redis refuse the SET: the TTL is clamped to 1 ms.
    assert a.claim(TENANT, JOB, window_ms=window_ms) == "claimed"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"


def test_ttls_are_clamped_into_what_redis_accepts() -> None:
    assert keyspace.clamp_ttl_ms(2**64) == keyspace.MAX_TTL_MS
    assert keyspace.clamp_ttl_ms(0) == 1
    assert keyspace.clamp_ttl_ms(-10) == 1
    assert keyspace.clamp_ttl_ms(1234.7) == 1234


@pytest.mark.parametrize("junk", ["abc", "", "list", "hash"])
def test_a_garbled_attempt_count_counts_as_none(
    r: fakeredis.FakeRedis, a: JobGuard, junk: str
) -> None:
    key = keyspace.attempts(TENANT, JOB)
    if junk == "list":
        r.rpush(key, "9", "9")
    elif junk == "hash":
        r.hset(key, "n", "9")
    else:
        r.set(key, junk)
    assert a.claim(TENANT, JOB) == "claimed"
    assert r.get(key) == b"1"


@pytest.mark.parametrize("kind", ["claim", "cancel"])
def test_a_wrong_typed_claim_or_cancel_key_is_treated_as_absent(
    r: fakeredis.FakeRedis, a: JobGuard, kind: str
) -> None:
    key = keyspace.claim(TENANT, JOB) if kind == "claim" else keyspace.cancel(TENANT, JOB)
    r.rpush(key, "x")
    assert a.claim_job(TENANT, JOB).outcome == "claimed"
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"


def test_an_exhausted_job_is_not_charged(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    # Exactly as many tokens as attempts, refilling too slowly to matter here.
    policy = TenantPolicy(rate_per_s=0.001, burst=a.max_attempts)
    admission = (admission_keys(TENANT), admission_args(JOB, policy, now_ms() + 3_600_000))
    for _ in range(a.max_attempts):
        assert a.claim_job(TENANT, JOB, admission=admission).outcome == "claimed"
        _die(r)
    before = _tokens(r)
    assert before < 1
    # Out of tokens, yet the job is exhausted (failed), not rate limited and charged again.
    assert a.claim_job(TENANT, JOB, admission=admission).outcome == "exhausted"
    assert _tokens(r) == before


# -- faults ------------------------------------------------------------------------------------
def test_record_fault_counts_up_with_a_ttl(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    assert [a.record_fault(TENANT, JOB, window_ms=60_000) for _ in range(3)] == [1, 2, 3]
    assert 0 < r.pttl(keyspace.faults(TENANT, JOB)) <= 60_000
    assert a.record_fault(OTHER, JOB, window_ms=60_000) == 1
    assert a.record_fault(TENANT, JOB_2, window_ms=2**64) == 1
    assert 0 < r.pttl(keyspace.faults(TENANT, JOB_2)) <= keyspace.MAX_TTL_MS


# -- the batch consumer's pipelined forms ------------------------------------------------------
def test_claim_many_matches_one_claim_each(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    new, busy, done = JOB, JOB_2, JOB_3
    assert b.claim(TENANT, busy) == "claimed"
    _store(a, b"sealed", done)
    claims = a.claim_many(
        [ClaimRequest(TENANT, j, REPLAY_WINDOW_MS) for j in (new, busy, done, new)]
    )
    # the same job twice in one batch: the second copy finds it held (busy), never runs
    assert [c.outcome for c in claims] == ["claimed", "busy", "replayed", "busy"]
    assert a.held() == [(TENANT, new)]
    assert r.get(keyspace.claim(TENANT, new)) == b"worker-a"


def test_claim_many_gives_a_failing_job_its_error_and_decides_the_others(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    policy = TenantPolicy(rate_per_s=10, burst=10)
    far = now_ms() + 3_600_000
    r.rpush(keyspace.bucket(OTHER), "not a hash")  # HMGET on it: WRONGTYPE
    claims = a.claim_many(
        [
            ClaimRequest(
                TENANT,
                JOB,
                REPLAY_WINDOW_MS,
                (admission_keys(TENANT), admission_args(JOB, policy, far)),
            ),
            ClaimRequest(
                OTHER,
                JOB_2,
                REPLAY_WINDOW_MS,
                (admission_keys(OTHER), admission_args(JOB_2, policy, far)),
            ),
            ClaimRequest(TENANT, JOB_3, REPLAY_WINDOW_MS),
        ]
    )
    assert [c.outcome for c in claims] == ["claimed", "error", "claimed"]
    assert isinstance(claims[1].error, redis.ResponseError)
    assert "WRONGTYPE" in str(claims[1].error)
    # The failing job is neither claimed nor counted nor held: it can be retried cleanly.
    assert not r.exists(keyspace.claim(OTHER, JOB_2))
    assert not r.exists(keyspace.attempts(OTHER, JOB_2))
    assert sorted(a.held()) == sorted([(TENANT, JOB), (TENANT, JOB_3)])
    assert r.get(keyspace.claim(TENANT, JOB)) == b"worker-a"


def test_claim_job_raises_a_redis_error(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    policy = TenantPolicy(max_in_flight=2)
    r.set(keyspace.in_flight(TENANT), "not a sorted set")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        a.claim_job(
            TENANT,
            JOB,
            admission=(admission_keys(TENANT), admission_args(JOB, policy, now_ms() + 60_000)),
        )
    assert not r.exists(keyspace.claim(TENANT, JOB))
    assert a.held() == []


def test_store_many_is_write_once_per_job(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    _store(a, b"first", JOB)
    assert a.claim(TENANT, JOB_2) == "claimed"
    stored = a.store_many(
        [(TENANT, JOB, b"second", REPLAY_WINDOW_MS), (TENANT, JOB_2, b"r2", REPLAY_WINDOW_MS)],
        result_ttl_s=RESULT_TTL_S,
    )
    assert stored == [False, True]
    assert r.get(keyspace.result(TENANT, JOB)) == b"first"
    assert r.get(keyspace.result(TENANT, JOB_2)) == b"r2"
    assert r.get(keyspace.claim(TENANT, JOB_2)) == b"done"
    assert a.held() == []
    assert a.claim(TENANT, JOB_2) == "replayed"


def test_a_wake_up_list_a_client_spoilt_does_not_fail_a_store(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    """The done list is popped by clients (a producer's key): pushing to it cannot fail."""
    for job_id in (JOB, JOB_2, JOB_3):
        assert a.claim(TENANT, job_id) == "claimed"
    r.set(keyspace.done(TENANT, JOB_2), "not a list")  # RPUSH on it: WRONGTYPE, ignored
    stored = a.store_many(
        [(TENANT, j, f"r-{j}".encode(), REPLAY_WINDOW_MS) for j in (JOB, JOB_2, JOB_3)],
        result_ttl_s=RESULT_TTL_S,
    )
    assert stored == [True, True, True]
    for job_id in (JOB, JOB_2, JOB_3):
        assert r.get(keyspace.result(TENANT, job_id)) == f"r-{job_id}".encode()
        assert r.get(keyspace.claim(TENANT, job_id)) == b"done"
    for job_id in (JOB, JOB_3):
        assert r.llen(keyspace.done(TENANT, job_id)) == 1
    assert a.held() == []


def test_store_many_of_nothing_is_no_round_trip(a: JobGuard) -> None:
    assert a.store_many([], result_ttl_s=RESULT_TTL_S) == []
    assert a.claim_many([]) == []


def test_fetch_payloads_reads_each_within_the_limit(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    small, big, missing, listed = JOB, JOB_2, JOB_3, JOB_4
    r.set(keyspace.payload(TENANT, small), b"abc")
    r.set(keyspace.payload(TENANT, big), b"x" * 100)
    r.rpush(keyspace.payload(TENANT, listed), b"a")
    assert a.fetch_payloads([(TENANT, j) for j in (small, big, missing, listed)], 10) == [
        b"abc",
        -1,
        None,
        None,
    ]
    assert a.fetch_payloads([(OTHER, small)], 10) == [None]
    assert a.fetch_payloads([], 10) == []


def test_pipelined_scripts_are_reloaded_after_a_script_flush(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    assert [c.outcome for c in a.claim_many([ClaimRequest(TENANT, JOB, REPLAY_WINDOW_MS)])] == [
        "claimed"
    ]
    r.script_flush()  # a Redis restart empties the script cache
    assert [c.outcome for c in a.claim_many([ClaimRequest(TENANT, JOB_2, REPLAY_WINDOW_MS)])] == [
        "claimed"
    ]
