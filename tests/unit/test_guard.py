"""JobGuard's Lua scripts (claim, lease, write-once result, rejection) on fakeredis."""

from __future__ import annotations

import time
from collections.abc import Callable

import fakeredis
import pytest

from maas_worker import keyspace
from maas_worker.guard import JobGuard, new_holder_id

LEASE_S = 15
RESULT_TTL_S = 60
REPLAY_WINDOW_MS = 120_000
JOB = "job-1"


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


def _store(guard: JobGuard, sealed: bytes, job_id: str = JOB) -> bool:
    return guard.store_result(job_id, sealed, result_ttl_s=RESULT_TTL_S,
                              replay_window_ms=REPLAY_WINDOW_MS)


def _wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def _die(r: fakeredis.FakeRedis, job_id: str = JOB) -> None:
    """Simulate a dead holder: its lease is not renewed and lapses (1 ms left)."""
    r.pexpire(keyspace.claim(job_id), 1)
    _wait_until(lambda: not r.exists(keyspace.claim(job_id)))


def test_holder_ids_are_unique() -> None:
    assert new_holder_id() != new_holder_id()
    guard = JobGuard(fakeredis.FakeRedis(server=fakeredis.FakeServer()), lease_s=LEASE_S)
    assert guard.holder
    assert guard.lease_ms == LEASE_S * 1000


def test_claim_stores_holder_with_lease(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    assert r.get(keyspace.claim(JOB)) == b"worker-a"
    assert 0 < r.pttl(keyspace.claim(JOB)) <= LEASE_S * 1000


def test_second_claim_while_lease_is_live_is_busy(a: JobGuard, b: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    assert b.claim(JOB) == "busy"
    # Redelivered to the holder itself while it still runs: not run twice either.
    assert a.claim(JOB) == "busy"


def test_claims_are_per_job(a: JobGuard, b: JobGuard) -> None:
    assert a.claim("job-1") == "claimed"
    assert b.claim("job-2") == "claimed"


def test_after_store_result_claims_are_replayed(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(JOB) == "claimed"
    assert _store(a, b"sealed-1") is True
    assert r.get(keyspace.result(JOB)) == b"sealed-1"
    assert r.get(keyspace.claim(JOB)) == b"done"
    assert b.claim(JOB) == "replayed"
    assert a.claim(JOB) == "replayed"


def test_result_is_write_once(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    assert _store(a, b"first") is True
    assert _store(b, b"second") is False
    assert _store(a, b"third") is False
    assert r.get(keyspace.result(JOB)) == b"first"


def test_store_sets_expiries(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(JOB)
    _store(a, b"sealed")
    assert 0 < r.pttl(keyspace.result(JOB)) <= RESULT_TTL_S * 1000
    # The claim stays "done" for the longer of the replay window and the result TTL.
    assert RESULT_TTL_S * 1000 < r.pttl(keyspace.claim(JOB)) <= REPLAY_WINDOW_MS
    assert 0 < r.pttl(keyspace.done(JOB)) <= RESULT_TTL_S * 1000


def test_replayed_when_only_the_result_exists(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    # The claim marker expired (or was lost) but the result is still there.
    a.claim(JOB)
    _store(a, b"sealed")
    r.delete(keyspace.claim(JOB))
    assert a.claim(JOB) == "replayed"


def test_lapsed_lease_is_taken_over(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    assert b.claim(JOB) == "busy"
    _die(r)
    assert b.claim(JOB) == "claimed"
    assert r.get(keyspace.claim(JOB)) == b"worker-b"
    assert a.claim(JOB) == "busy"


def test_deleted_claim_is_taken_over(r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    r.delete(keyspace.claim(JOB))
    assert b.claim(JOB) == "claimed"


def test_slow_holder_finishing_after_takeover_keeps_one_result(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(JOB)
    _die(r)  # a stalled, did not renew; b took over
    assert b.claim(JOB) == "claimed"
    assert _store(a, b"from-a") is True
    assert _store(b, b"from-b") is False
    assert r.get(keyspace.result(JOB)) == b"from-a"
    assert r.llen(keyspace.done(JOB)) == 1


def test_renew_all_extends_only_our_own_claims(
    server: fakeredis.FakeServer, r: fakeredis.FakeRedis
) -> None:
    a = JobGuard(r, lease_s=100, holder="worker-a")
    b = JobGuard(fakeredis.FakeRedis(server=server), lease_s=5, holder="worker-b")
    assert a.claim("mine") == "claimed"
    assert a.claim("lost") == "claimed"
    r.pexpire(keyspace.claim("mine"), 1000)
    _die(r, "lost")
    assert b.claim("lost") == "claimed"
    assert b.claim("theirs") == "claimed"

    a.renew_all()

    assert r.pttl(keyspace.claim("mine")) > 50_000
    assert r.get(keyspace.claim("mine")) == b"worker-a"
    # Claims held by b keep b's holder and b's short lease.
    for job_id in ("lost", "theirs"):
        assert r.get(keyspace.claim(job_id)) == b"worker-b"
        assert r.pttl(keyspace.claim(job_id)) <= 5000


def test_renew_all_leaves_finished_jobs_alone(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(JOB)
    _store(a, b"sealed")
    ttl = r.pttl(keyspace.claim(JOB))
    a.renew_all()
    assert r.get(keyspace.claim(JOB)) == b"done"
    assert r.pttl(keyspace.claim(JOB)) <= ttl
    assert r.pttl(keyspace.claim(JOB)) > LEASE_S * 1000


def test_renew_all_does_not_recreate_a_lapsed_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(JOB)
    _die(r)
    a.renew_all()
    assert not r.exists(keyspace.claim(JOB))


def test_release_releases_only_our_own_claim(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(JOB) == "claimed"
    b.release(JOB)  # b never held it
    assert r.get(keyspace.claim(JOB)) == b"worker-a"
    a.release(JOB)
    assert not r.exists(keyspace.claim(JOB))
    assert b.claim(JOB) == "claimed"  # released: the job can be retried
    a.release(JOB)  # a no longer holds it
    assert r.get(keyspace.claim(JOB)) == b"worker-b"


def test_release_after_result_keeps_it_done(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(JOB)
    _store(a, b"sealed")
    a.release(JOB)
    assert r.get(keyspace.claim(JOB)) == b"done"
    assert a.claim(JOB) == "replayed"


def test_released_job_is_no_longer_renewed(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(JOB)
    a.release(JOB)
    b.claim(JOB)
    before = r.pttl(keyspace.claim(JOB))
    r.pexpire(keyspace.claim(JOB), 2000)
    a.renew_all()
    assert r.pttl(keyspace.claim(JOB)) <= 2000 < before


def test_mark_rejected_never_overwrites_a_result(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim(JOB)
    _store(a, b"sealed")
    for authenticated in (False, True):
        b.mark_rejected(JOB, ttl_s=60, authenticated=authenticated)
    assert r.get(keyspace.result(JOB)) == b"sealed"
    assert not r.exists(keyspace.rejected(JOB))
    assert r.get(keyspace.claim(JOB)) == b"done"
    assert r.llen(keyspace.done(JOB)) == 1


def test_authenticated_rejection_closes_the_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    assert a.claim(JOB) == "claimed"
    a.mark_rejected(JOB, ttl_s=60, authenticated=True)
    assert r.exists(keyspace.rejected(JOB))
    assert 0 < r.pttl(keyspace.rejected(JOB)) <= 60_000
    assert r.get(keyspace.claim(JOB)) == b"done"
    assert a.claim(JOB) == "replayed"


def test_authenticated_rejection_of_an_unclaimed_job_closes_it(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.mark_rejected(JOB, ttl_s=60, authenticated=True)
    assert b.claim(JOB) == "replayed"


def test_unauthenticated_rejection_leaves_the_claim_alone(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    # A forged message carrying a job id must not block (or close) the real job.
    b.mark_rejected(JOB, ttl_s=60, authenticated=False)
    assert r.exists(keyspace.rejected(JOB))
    assert not r.exists(keyspace.claim(JOB))
    assert a.claim(JOB) == "claimed"
    b.mark_rejected(JOB, ttl_s=60, authenticated=False)
    assert r.get(keyspace.claim(JOB)) == b"worker-a"


def test_done_list_gets_one_element_per_completion(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    a.claim("ok")
    _store(a, b"sealed", "ok")
    _store(a, b"sealed", "ok")
    assert r.llen(keyspace.done("ok")) == 1
    _store(b, b"again", "ok")
    assert r.llen(keyspace.done("ok")) == 1

    a.mark_rejected("bad", ttl_s=60, authenticated=True)
    assert r.llen(keyspace.done("bad")) == 1
    assert 0 < r.pttl(keyspace.done("bad")) <= 60_000
    assert r.llen(keyspace.done("never")) == 0


def test_store_result_forgets_the_claim(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.claim(JOB)
    _store(a, b"sealed")
    r.set(keyspace.claim(JOB), "worker-a", px=1000)  # as if the claim were ours again
    a.renew_all()
    assert r.pttl(keyspace.claim(JOB)) <= 1000


def test_unauthenticated_rejection_does_not_mark_a_running_job_rejected(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(JOB) == "claimed"
    b.mark_rejected(JOB, ttl_s=60, authenticated=False)
    assert not r.exists(keyspace.rejected(JOB))
    assert r.llen(keyspace.done(JOB)) == 0


def test_a_job_that_keeps_killing_its_worker_is_exhausted(
    r: fakeredis.FakeRedis, a: JobGuard
) -> None:
    """Each start counts; past max_attempts the claim says `exhausted`, not `claimed`."""
    outcomes = []
    for _ in range(a.max_attempts + 1):
        outcomes.append(a.claim(JOB, window_ms=60_000))
        _die(r)
    assert outcomes == ["claimed"] * a.max_attempts + ["exhausted"]
    assert 0 < r.pttl(keyspace.attempts(JOB)) <= 60_000


def test_busy_and_replayed_sightings_do_not_count_as_attempts(
    r: fakeredis.FakeRedis, a: JobGuard, b: JobGuard
) -> None:
    assert a.claim(JOB) == "claimed"
    for _ in range(5):
        assert b.claim(JOB) == "busy"
    _store(a, b"sealed")
    for _ in range(5):
        assert b.claim(JOB) == "replayed"
    assert int(r.get(keyspace.attempts(JOB))) == 1


# -- the batch consumer's pipelined forms --------------------------------------------------
def test_claim_many_matches_one_claim_each(r: fakeredis.FakeRedis, a: JobGuard,
                                           b: JobGuard) -> None:
    from maas_worker.guard import ClaimRequest

    assert b.claim("busy-job") == "claimed"
    a.store_result("done-job", b"sealed", result_ttl_s=RESULT_TTL_S,
                   replay_window_ms=REPLAY_WINDOW_MS)
    claims = a.claim_many([ClaimRequest(j, REPLAY_WINDOW_MS)
                           for j in ("new-job", "busy-job", "done-job", "new-job")])
    # the same job twice in one batch: the second copy finds it held (busy), never runs
    assert [c.outcome for c in claims] == ["claimed", "busy", "replayed", "busy"]
    assert a.held() == ["new-job"]
    assert r.get(keyspace.claim("new-job")) == b"worker-a"


def test_store_many_is_write_once_per_job(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    a.store_result("j1", b"first", result_ttl_s=RESULT_TTL_S, replay_window_ms=REPLAY_WINDOW_MS)
    assert a.claim("j2") == "claimed"
    stored = a.store_many([("j1", b"second", REPLAY_WINDOW_MS), ("j2", b"r2", REPLAY_WINDOW_MS)],
                          result_ttl_s=RESULT_TTL_S)
    assert stored == [False, True]
    assert r.get(keyspace.result("j1")) == b"first"
    assert r.get(keyspace.result("j2")) == b"r2"
    assert r.get(keyspace.claim("j2")) == b"done"
    assert a.held() == []
    assert a.claim("j2") == "replayed"


def test_fetch_payloads_reads_each_within_the_limit(r: fakeredis.FakeRedis, a: JobGuard) -> None:
    r.set(keyspace.payload("small"), b"abc")
    r.set(keyspace.payload("big"), b"x" * 100)
    r.rpush(keyspace.payload("list"), b"a")
    assert a.fetch_payloads(["small", "big", "missing", "list"], 10) == [b"abc", -1, None, None]
    assert a.fetch_payloads([], 10) == []


def test_pipelined_scripts_are_reloaded_after_a_script_flush(r: fakeredis.FakeRedis,
                                                             a: JobGuard) -> None:
    from maas_worker.guard import ClaimRequest

    assert [c.outcome for c in a.claim_many([ClaimRequest("x", REPLAY_WINDOW_MS)])] == ["claimed"]
    r.script_flush()  # a Redis restart empties the script cache
    assert [c.outcome for c in a.claim_many([ClaimRequest("y", REPLAY_WINDOW_MS)])] == ["claimed"]
