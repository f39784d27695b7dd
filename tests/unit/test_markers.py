"""A batch's queued markers and the gateway's idempotency records (client/markers.py).

One library call (``mark_queued.lua``) on fakeredis, against the per-job
commands it replaces (the fallback for a server whose library is older):
the same keys, values, TTLs and answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
import redis

from maas_worker.backend import functions, keyspace
from maas_worker.client import markers
from maas_worker.crypto.envelope import Header

ISSUED = 1_700_000_000_000


def header(n: int, lifetime_ms: int = 600_000) -> Header:
    return Header(
        "request", 1, ISSUED, ISSUED + lifetime_ms, "normal", "acme",
        f"0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2{n:03d}", "maas.infer", "echo",
    )  # fmt: skip


class _Refusing(fakeredis.FakeRedis):
    """A Redis user that may not load the library (a producer role), library not loaded."""

    def function_load(self, *args: object, **kwargs: object) -> str:
        raise redis.exceptions.NoPermissionError("this user has no permissions")


def state(r: redis.Redis, keys: list[str]) -> list[tuple[Any, int]]:
    return [(r.get(k), r.ttl(k)) for k in keys]


@pytest.mark.parametrize("server", [fakeredis.FakeRedis, _Refusing])
def test_markers_hold_the_expiry_for_the_lifetime_plus_the_result_ttl(server: type) -> None:
    r = server()
    jobs = [header(1), header(2, lifetime_ms=1_500)]
    batch = markers.mark("acme", jobs, 3600)
    r.set(keyspace.submitted("acme", jobs[0].job_id), "stale")  # a producer overwrites
    assert markers.write(r, batch) == "qq"
    assert state(r, batch.keys) == [
        (str(jobs[0].expires_at_ms).encode(), 600 + 3600),
        (str(jobs[1].expires_at_ms).encode(), 1 + 3600),
    ]
    # One FCALL of the current library where it can be had (loaded by the call).
    assert bool(r.function_list(library=functions.LIBRARY)) == (server is fakeredis.FakeRedis)


@pytest.mark.parametrize("server", [fakeredis.FakeRedis, _Refusing])
def test_a_claim_answers_each_job_and_writes_only_for_new_ids(server: type) -> None:
    r = server()
    fresh, kept, same, other = header(1), header(2), header(3), header(4)
    r.set(keyspace.submitted("acme", kept.job_id), "1", ex=99)  # a producer's marker
    first = markers.claim("acme", [(same, "h3", 4200), (other, "h4", 4200)], 3600)
    assert markers.write(r, first) == "qq"
    before = state(r, first.keys)
    batch = markers.claim(
        "acme",
        [(fresh, "h1", 4201), (kept, "h2", 4202), (same, "h3", 4203), (other, "xx", 4204)],
        3600,
    )
    assert markers.write(r, batch) == "qksc"
    records = [keyspace.gateway_seen("acme", h.job_id) for h in (fresh, kept)]
    assert state(r, records) == [(b"h1", 4201), (b"h2", 4202)]
    assert state(r, [keyspace.submitted("acme", h.job_id) for h in (fresh, kept)]) == [
        (str(fresh.expires_at_ms).encode(), 4200),
        (b"1", 99),  # NX: kept
    ]
    assert state(r, first.keys) == before  # a repeat or a conflict writes nothing


def test_the_function_and_the_fallback_leave_the_same_keys() -> None:
    jobs = [(header(n, 1000 * n), f"h{n}", 1000 + n) for n in range(1, 6)]
    outcomes = []
    for server in (fakeredis.FakeRedis(), _Refusing()):
        server.set(keyspace.gateway_seen("acme", jobs[0][0].job_id), "h1")
        server.set(keyspace.gateway_seen("acme", jobs[1][0].job_id), "other")
        server.set(keyspace.submitted("acme", jobs[2][0].job_id), "1")
        batch = markers.claim("acme", jobs, 60)
        answer = markers.write(server, batch)
        outcomes.append((answer, state(server, batch.keys)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "sckqq"


class _AsyncRefusing(fakeredis.FakeAsyncRedis):
    async def function_load(self, *args: object, **kwargs: object) -> str:
        raise redis.exceptions.NoPermissionError("this user has no permissions")


@pytest.mark.parametrize("server", [fakeredis.FakeAsyncRedis, _AsyncRefusing])
def test_the_async_driver_answers_alike(server: type) -> None:
    r = server()
    batch = markers.claim("acme", [(header(1), "h1", 60), (header(2), "h2", 60)], 60)
    again = markers.claim("acme", [(header(1), "h1", 60), (header(2), "other", 60)], 60)

    async def both() -> tuple[str, str]:
        return await markers.awrite(r, batch), await markers.awrite(r, again)

    assert asyncio.run(both()) == ("qq", "sc")


def test_the_call_names_every_key_and_one_string_of_fields() -> None:
    h = header(7, lifetime_ms=90_000)
    batch = markers.claim("acme", [(h, "ab" * 32, 91)], 3600)
    assert batch.keys == [
        keyspace.submitted("acme", h.job_id),
        keyspace.gateway_seen("acme", h.job_id),
    ]
    assert batch.args == ["claim", f"{h.expires_at_ms} 3690 {'ab' * 32} 91"]
    assert markers.mark("acme", [h, h], 10).args == [
        "mark",
        f"{h.expires_at_ms} 100 {h.expires_at_ms} 100",
    ]


def test_fields_that_do_not_match_the_keys_are_refused() -> None:
    r = fakeredis.FakeRedis()
    functions.load(r)
    with pytest.raises(redis.ResponseError, match="fields do not match keys"):
        r.fcall(functions.MARK_QUEUED, 2, "maas:{acme}:job:a", "maas:{acme}:job:b", "mark", "1 2")
    with pytest.raises(redis.ResponseError, match="mode is mark or claim"):
        r.fcall(functions.MARK_QUEUED, 1, "maas:{acme}:job:a", "other", "1 2")
    assert not r.exists("maas:{acme}:job:a", "maas:{acme}:job:b")


def test_a_large_batch_goes_in_chunks_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = [(header(n), f"h{n}", 60 + n) for n in range(7)]
    whole = fakeredis.FakeRedis()
    expected = markers.write(whole, markers.claim("acme", jobs, 60))
    monkeypatch.setattr(markers, "CHUNK_JOBS", 3)
    batch = markers.claim("acme", jobs, 60)
    assert [len(c.fields) for c in batch.chunks()] == [3, 3, 1]
    assert [k for c in batch.chunks() for k in c.keys[: len(c.fields)]] == batch.keys[:7]
    r = fakeredis.FakeRedis()
    r.set(keyspace.gateway_seen("acme", jobs[4][0].job_id), "h4", ex=64)
    assert markers.write(r, batch) == "qqqqsqq"
    assert expected == "q" * 7
    assert (
        state(r, batch.keys)
        == [
            *state(whole, batch.keys[:4]),
            (None, -2),  # the repeat wrote no marker
            *state(whole, batch.keys[5:]),
        ]
    )
    assert asyncio.run(markers.awrite(fakeredis.FakeAsyncRedis(), batch)) == "q" * 7
