"""The batch consumer's scripts: a batch's claims (claim_batch.lua) and results (store_batch.lua).

Each runs, for every job of the batch in turn, the body the one-job script runs
(claim_job.lua, store_job.lua), so a batch must decide each job exactly as
`JobGuard.claim_job` and `JobGuard.store_result` would one at a time: the same
outcomes, the same keys written, the quota charged the same. One job's failure
must not touch the others. Run on fakeredis and on a real Valkey (embedded, started
here) since ``pcall`` around ``redis.call`` is what keeps the jobs apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis

from maas_worker.backend import keyspace, scripts
from maas_worker.backend.claims import Claim, ClaimOutcome, ClaimRequest, JobGuard
from maas_worker.crypto.envelope import now_ms
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.tenancy.quota import admission_args, admission_keys

LEASE_S = 15
RESULT_TTL_S = 60
WINDOW_MS = 120_000
#: Tenants: one without quotas, one out of tokens after one start, one capped
#: at one job in flight, one whose bucket a writer broke.
FREE, RATED, CAPPED, BROKEN = "acme", "rated", "capped", "broken"
POLICIES = {
    RATED: TenantPolicy(rate_per_s=0.001, burst=1),
    CAPPED: TenantPolicy(max_in_flight=1),
    BROKEN: TenantPolicy(rate_per_s=10, burst=10),
}


@pytest.fixture(scope="module")
def valkey() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Backend:
    """Two connections to one server (workers a and b); ``fresh`` gives an empty one."""

    r: redis.Redis
    other: redis.Redis


@pytest.fixture(params=["fakeredis", "valkey"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backend]]:
    opened: list[redis.Redis] = []

    def fresh() -> Backend:
        if request.param == "fakeredis":
            server = fakeredis.FakeServer()
            pair: list[redis.Redis] = [fakeredis.FakeRedis(server=server) for _ in range(2)]
        else:
            # One database a backend (16 on the server): tests flush only their own.
            url = request.getfixturevalue("valkey").url.rsplit("/", 1)[0]
            pair = [redis.Redis.from_url(f"{url}/{len(opened) // 2 + 1}") for _ in range(2)]
            pair[0].flushdb()
        opened.extend(pair)
        return Backend(*pair)

    yield fresh
    for client in opened:
        client.close()


@pytest.fixture
def backend(make_backend: Callable[[], Backend]) -> Backend:
    return make_backend()


def _guard(client: redis.Redis, holder: str = "worker-a") -> JobGuard:
    return JobGuard(client, lease_s=LEASE_S, holder=holder)


def _request(tenant: str, job_id: str) -> ClaimRequest:
    policy = POLICIES.get(tenant)
    admission = (
        None
        if policy is None
        else (admission_keys(tenant), admission_args(job_id, policy, now_ms() + 3_600_000))
    )
    return ClaimRequest(tenant, job_id, WINDOW_MS, admission)


def _mixed_batch(be: Backend) -> list[tuple[ClaimRequest, str]]:
    """A batch with every outcome, the state that makes each, and the outcome expected."""
    r, b = be.r, _guard(be.other, "worker-b")
    assert b.claim(FREE, "busy") == "claimed"
    b.store_result(FREE, "done", b"first", result_ttl_s=RESULT_TTL_S, replay_window_ms=WINDOW_MS)
    r.set(keyspace.attempts(FREE, "exhausted"), "3")
    r.set(keyspace.cancel(FREE, "cancelled"), "token-1")
    # Keys of the job's own that a writer left with another type: read as absent.
    r.rpush(keyspace.claim(FREE, "listclaim"), "x")
    r.hset(keyspace.cancel(FREE, "hashcancel"), "f", "v")
    r.rpush(keyspace.attempts(FREE, "listcount"), "9")
    r.rpush(keyspace.result(FREE, "listresult"), "x")  # a result of any type: replayed
    # The tenant's quota key of another type: that job's claim fails, alone.
    r.rpush(keyspace.bucket(BROKEN), "not a hash")
    expected = [
        (FREE, "new", "claimed"),
        (FREE, "busy", "busy"),
        (FREE, "done", "replayed"),
        (FREE, "exhausted", "exhausted"),
        (BROKEN, "broken", "error"),
        (FREE, "cancelled", "cancelled"),
        (RATED, "rated-1", "claimed"),
        (RATED, "rated-2", "rate_limited"),  # the first took the only token
        (CAPPED, "capped-1", "claimed"),
        (CAPPED, "capped-2", "rate_limited"),  # over the in-flight cap
        (FREE, "listclaim", "claimed"),
        (FREE, "hashcancel", "claimed"),
        (FREE, "listcount", "claimed"),
        (FREE, "listresult", "replayed"),
        (FREE, "new", "busy"),  # the same job twice in a batch: the second finds it held
        (CAPPED, "capped-1", "busy"),  # ...not charged a second time either
    ]
    return [(_request(t, j), outcome) for t, j, outcome in expected]


def _state(r: redis.Redis) -> dict[bytes, Any]:
    """Every key's type and value (TTLs aside; the bucket's floats and clock as present)."""
    out: dict[bytes, Any] = {}
    for name in sorted(r.keys("*")):
        key = name if isinstance(name, bytes) else name.encode()
        kind = r.type(key)
        if kind == b"string":
            out[key] = r.get(key)
        elif kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        elif kind == b"hash":
            out[key] = sorted(r.hgetall(key)) if key.endswith(b":bucket") else r.hgetall(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1)
        else:
            out[key] = kind
    return out


def test_a_mixed_batch_has_every_outcome(backend: Backend) -> None:
    batch = _mixed_batch(backend)
    r = backend.r
    a = _guard(r)
    claims = a.claim_many([req for req, _ in batch])
    assert [c.outcome for c in claims] == [outcome for _, outcome in batch]
    by_job = {(req.tenant, req.job_id): c for (req, _), c in zip(batch, claims, strict=True)}
    assert by_job[FREE, "cancelled"].cancel_token == "token-1"
    wait_s = by_job[RATED, "rated-2"].retry_after_s
    assert wait_s is not None and wait_s > 0
    assert by_job[CAPPED, "capped-2"].retry_after_s is None
    broken = by_job[BROKEN, "broken"]
    assert isinstance(broken.error, redis.ResponseError)
    assert "WRONGTYPE" in str(broken.error)
    # Claimed and exhausted jobs are held (leased, renewed); nothing else is.
    assert sorted(a.held()) == sorted(
        [
            (FREE, "new"),
            (FREE, "exhausted"),
            (RATED, "rated-1"),
            (CAPPED, "capped-1"),
            (FREE, "listclaim"),
            (FREE, "hashcancel"),
            (FREE, "listcount"),
        ]
    )
    for tenant, job in a.held():
        assert r.get(keyspace.claim(tenant, job)) == b"worker-a"
        assert 0 < r.pttl(keyspace.claim(tenant, job)) <= LEASE_S * 1000
    assert r.get(keyspace.attempts(FREE, "exhausted")) == b"4"
    # Refused, cancelled and failed jobs: no claim written, no attempt counted.
    for tenant, job in [
        (FREE, "cancelled"),
        (RATED, "rated-2"),
        (CAPPED, "capped-2"),
        (BROKEN, "broken"),
    ]:
        assert not r.exists(keyspace.claim(tenant, job)), job
        assert not r.exists(keyspace.attempts(tenant, job)), job
    # The quota charges: one token, one in-flight entry, counted once.
    assert float(r.hget(keyspace.bucket(RATED), "tokens") or -1) < 1
    assert r.zrange(keyspace.in_flight(CAPPED), 0, -1) == [b"capped-1"]
    assert a.claim(FREE, "busy") == "busy"  # still worker-b's


def test_a_batch_decides_and_writes_what_one_claim_at_a_time_does(
    make_backend: Callable[[], Backend],
) -> None:
    batched, single = make_backend(), make_backend()
    batch = _mixed_batch(batched)
    _mixed_batch(single)
    claims = _guard(batched.r).claim_many([req for req, _ in batch])
    one = _guard(single.r)
    each = []
    for req, _ in batch:
        try:
            each.append(
                one.claim_job(
                    req.tenant, req.job_id, window_ms=req.window_ms, admission=req.admission
                )
            )
        except redis.ResponseError as exc:
            each.append(Claim(ClaimOutcome.ERROR, error=exc))
    assert [(c.outcome, c.cancel_token, c.retry_after_s is None) for c in claims] == [
        (c.outcome, c.cancel_token, c.retry_after_s is None) for c in each
    ]
    assert _state(batched.r) == _state(single.r)


def test_the_quota_keys_of_a_tenant_are_sent_once(backend: Backend) -> None:
    a = _guard(backend.r)
    keys, _ = a._claim_batch_call([_request(CAPPED, f"j{n}") for n in range(3)])
    assert keys[12:] == admission_keys(CAPPED)
    assert len(keys) == 15
    claims = a.claim_many([_request(CAPPED, f"j{n}") for n in range(3)])
    assert [c.outcome for c in claims] == ["claimed", "rate_limited", "rate_limited"]


def test_a_failing_batch_script_fails_each_job_and_claims_nothing(backend: Backend) -> None:
    """The script as a whole refused (here: not a number of jobs): every job gets the error."""
    a = _guard(backend.r)
    keys, args = a._claim_batch_call([_request(FREE, "j1"), _request(FREE, "j2")])
    args[3] = "not a number"
    with pytest.raises(redis.ResponseError):
        backend.r.evalsha(a._claim_batch.sha, len(keys), *keys, *args)
    assert not backend.r.exists(keyspace.claim(FREE, "j1"))


def test_an_empty_batch_is_no_round_trip(backend: Backend) -> None:
    a = _guard(backend.r)
    assert a.claim_many([]) == []
    assert a.store_many([], result_ttl_s=RESULT_TTL_S) == []


def test_a_flushed_script_cache_is_reloaded(backend: Backend) -> None:
    a = _guard(backend.r)
    assert [c.outcome for c in a.claim_many([_request(FREE, "j1")])] == ["claimed"]
    assert a.store_many([(FREE, "j1", b"r1", WINDOW_MS)], result_ttl_s=RESULT_TTL_S) == [True]
    backend.r.script_flush()  # a Redis restart empties the script cache
    assert [c.outcome for c in a.claim_many([_request(FREE, "j2")])] == ["claimed"]
    assert a.store_many([(FREE, "j2", b"r2", WINDOW_MS)], result_ttl_s=RESULT_TTL_S) == [True]


# -- results ------------------------------------------------------------------------------------
def test_a_batch_of_results_is_stored_write_once_per_job(backend: Backend) -> None:
    r, a = backend.r, _guard(backend.r)
    jobs = ["first", "again", "spoilt", "unclaimed"]
    for job in jobs[:3]:
        assert a.claim(FREE, job) == "claimed"
    r.set(keyspace.payload(FREE, "first"), b"claim-checked request")
    a.store_result(FREE, "again", b"kept", result_ttl_s=RESULT_TTL_S, replay_window_ms=WINDOW_MS)
    r.set(keyspace.done(FREE, "spoilt"), "not a list")  # a client's key: RPUSH fails, ignored
    stored = a.store_many(
        [(FREE, job, f"r-{job}".encode(), WINDOW_MS) for job in jobs],
        result_ttl_s=RESULT_TTL_S,
    )
    assert stored == [True, False, True, True]
    assert r.get(keyspace.result(FREE, "again")) == b"kept"
    for job in ("first", "spoilt", "unclaimed"):
        assert r.get(keyspace.result(FREE, job)) == f"r-{job}".encode()
        assert 0 < r.pttl(keyspace.result(FREE, job)) <= RESULT_TTL_S * 1000
    for job in jobs:
        assert r.get(keyspace.claim(FREE, job)) == b"done"
        assert 0 < r.pttl(keyspace.claim(FREE, job)) <= WINDOW_MS
        assert a.claim(FREE, job) == "replayed"
    assert not r.exists(keyspace.payload(FREE, "first"))
    assert r.lrange(keyspace.done(FREE, "first"), 0, -1) == [b"1"]
    assert r.lrange(keyspace.done(FREE, "again"), 0, -1) == [b"1"]  # once, by the first store
    assert r.get(keyspace.done(FREE, "spoilt")) == b"not a list"
    assert a.held() == []


def test_a_batch_of_results_writes_what_one_store_at_a_time_does(
    make_backend: Callable[[], Backend],
) -> None:
    batched, single = make_backend(), make_backend()
    results = [(FREE, f"j{n}", f"r{n}".encode(), WINDOW_MS) for n in range(4)]
    results.append((CAPPED, "j0", b"other tenant", WINDOW_MS * 2))
    results.append((FREE, "j1", b"second copy", WINDOW_MS))
    for be in (batched, single):
        be.r.set(keyspace.result(FREE, "j3"), b"stored before")
    many = _guard(batched.r).store_many(results, result_ttl_s=RESULT_TTL_S)
    one = _guard(single.r)
    each = [
        one.store_result(t, j, s, result_ttl_s=RESULT_TTL_S, replay_window_ms=w)
        for t, j, s, w in results
    ]
    assert many == each == [True, True, True, False, True, False]
    assert _state(batched.r) == _state(single.r)


def test_one_job_s_failed_store_leaves_the_others_stored(backend: Backend) -> None:
    """Called directly with a bad argument for one job: its error in place, the rest stored.

    (The bad claim TTL fails j2's second command, after its result was written:
    as with store.lua, a failed job's store is not undone, and its job is retried.)
    """
    r = backend.r
    script = scripts.register(r, "store_batch")
    keys = [
        k
        for job in ("j1", "j2", "j3")
        for k in (
            keyspace.result(FREE, job),
            keyspace.claim(FREE, job),
            keyspace.done(FREE, job),
            keyspace.payload(FREE, job),
        )
    ]
    reply = script(keys=keys, args=[60_000, b"r1", 60_000, b"r2", "not a ttl", b"r3", 60_000])
    assert reply[0] == 1 and reply[2] == 1
    assert isinstance(reply[1], bytes) and b"not an integer" in reply[1]
    assert r.get(keyspace.result(FREE, "j1")) == b"r1"
    assert r.get(keyspace.result(FREE, "j3")) == b"r3"
