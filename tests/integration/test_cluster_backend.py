"""The result store on a real Redis Cluster (docs/scaling.md, "The result store on a Redis
Cluster").

One `ClusterGroup` (3 primaries, a replica each) for the module. Every job-state key is
``maas:{<tenant>}:...``, one hash slot per tenant; the tenants here are picked so that
their slots are on three different primaries (checked with `ClusterGroup.owner`).
Checked: a job's claim, result, replay and cancel (a library function, ``FCALL``) for a
tenant on each primary; the batch consumer's batch scripts over tenants on every
primary decide and write what they do on one server (the single-node tests of
tests/unit/test_batch_scripts.py, run again with the batch on the cluster and the
one-at-a-time reference on a plain server); the queued markers, the audit stream, the
model catalogue and the fleet's samples; ``acl --apply``'s node list; and last (each
kills a primary, so they run after the others) a store sent just after its primary was
killed, a batch pipeline sent with one primary dead, and an async call through a
failover: each waits for the replica to take over and succeeds, without being told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from maas_worker.backend import catalog, functions, keyspace
from maas_worker.backend.audit import AuditLog
from maas_worker.backend.claims import ClaimOutcome, ClaimRequest, JobGuard
from maas_worker.backend.cluster import amget_many, is_cluster
from maas_worker.backend.redis import NotReplicated, async_redis_client, redis_client
from maas_worker.client import markers
from maas_worker.crypto.envelope import now_ms
from maas_worker.local.embedded import ClusterGroup, EmbeddedRedis
from maas_worker.monitoring.samples import SAMPLE_VERSION, SampleStore
from maas_worker.protocol import AuditReason
from maas_worker.settings import RedisHA, RedisTLS, Settings
from maas_worker.tenancy import acl
from tests.unit import test_batch_scripts as single
from tests.unit.test_batch_scripts import (  # noqa: F401 (collected here: run on the cluster)
    BROKEN,
    CAPPED,
    FREE,
    RATED,
    Backend,
    test_a_batch_decides_and_writes_what_one_claim_at_a_time_does,
    test_a_batch_of_results_is_stored_write_once_per_job,
    test_a_batch_of_results_writes_what_one_store_at_a_time_does,
    test_a_flushed_script_cache_is_reloaded,
    test_a_mixed_batch_has_every_outcome,
    test_one_job_s_failed_store_leaves_the_others_stored,
    test_the_quota_keys_of_a_tenant_are_sent_once,
)

pytestmark = pytest.mark.integration

LEASE_S = 15
RESULT_TTL_S = 60
WINDOW_MS = 120_000
#: Tenants whose slots are on three different primaries (the test below checks).
TENANTS = ("broken", "rated", "acme")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterGroup]:
    with ClusterGroup(primaries=3, replicas=1) as group:
        yield group


def _ha(cluster: ClusterGroup) -> RedisHA:
    return RedisHA(cluster=True, cluster_nodes=cluster.seeds)


def _client(cluster: ClusterGroup) -> redis.Redis:
    client = redis_client(cluster.url, tls=RedisTLS(), ha=_ha(cluster))
    # `single._state` lists keys with KEYS, which redis-py sends to every node,
    # replicas included (a replica a moment behind would list a deleted key).
    client.command_flags["KEYS"] = redis.cluster.RedisCluster.PRIMARIES  # type: ignore[attr-defined]
    return client


@pytest.fixture
def r(cluster: ClusterGroup) -> Iterator[redis.Redis]:
    client = _client(cluster)
    client.flushall()  # every primary (redis-py sends it to each); the functions stay
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def plain() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_backend(cluster: ClusterGroup, plain: EmbeddedRedis) -> Iterator[Callable[[], Backend]]:
    """The batch tests' backends: the first on the cluster (the batch under test), the
    next on one plain server (the one-at-a-time reference it must equal)."""
    opened: list[redis.Redis] = []

    def fresh() -> Backend:
        if not opened:
            pair = [_client(cluster), _client(cluster)]
            pair[0].flushall()
        else:
            url = plain.url.rsplit("/", 1)[0]
            pair = [redis.Redis.from_url(f"{url}/{len(opened) // 2}") for _ in range(2)]
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


def test_the_tenants_are_on_three_primaries(cluster: ClusterGroup) -> None:
    owners = {cluster.owner(keyspace.claim(t, "j")).port for t in TENANTS}
    assert len(owners) == 3
    # ...and so are the tenants of the batch tests run here.
    assert len({cluster.owner(keyspace.bucket(t)).port for t in (FREE, RATED, BROKEN)}) == 3
    assert (
        cluster.owner(keyspace.bucket(CAPPED)).port == cluster.owner(keyspace.bucket(RATED)).port
    )  # two tenants of one primary, in one call


def test_the_client_is_redis_py_s_cluster_client(r: redis.Redis) -> None:
    assert is_cluster(r)
    assert len(r.get_nodes()) == 6  # type: ignore[attr-defined]


def test_a_job_of_a_tenant_on_each_primary_is_claimed_stored_and_replayed(
    r: redis.Redis,
) -> None:
    guard = _guard(r)
    for tenant in TENANTS:
        assert guard.claim(tenant, "j1") == ClaimOutcome.CLAIMED
        assert r.get(keyspace.claim(tenant, "j1")) == b"worker-a"
        assert guard.store_result(
            tenant, "j1", f"sealed-{tenant}".encode(), result_ttl_s=60, replay_window_ms=WINDOW_MS
        )
        assert not guard.store_result(
            tenant, "j1", b"again", result_ttl_s=60, replay_window_ms=WINDOW_MS
        )
        assert r.get(keyspace.result(tenant, "j1")) == f"sealed-{tenant}".encode()
        assert r.lrange(keyspace.done(tenant, "j1"), 0, -1) == [b"1"]
        assert guard.claim(tenant, "j1") == ClaimOutcome.REPLAYED
        # Release, faults, suspect markers, payloads: single-key calls on the slot's node.
        assert guard.claim(tenant, "j2") == ClaimOutcome.CLAIMED
        guard.release(tenant, "j2")
        assert not r.exists(keyspace.claim(tenant, "j2"))
        assert guard.record_fault(tenant, "j2", window_ms=WINDOW_MS) == 1
        r.set(keyspace.payload(tenant, "j2"), b"request")
        assert guard.fetch_payloads([(tenant, "j2"), (tenant, "none")], 1024) == [
            b"request",
            None,
        ]
    assert guard.held() == []
    # Payloads of tenants on three primaries, one pipeline.
    for tenant in TENANTS:
        r.set(keyspace.payload(tenant, "p"), tenant.encode())
    assert guard.fetch_payloads([(t, "p") for t in TENANTS], 1024) == [t.encode() for t in TENANTS]


def test_the_function_library_answers_for_a_tenant_on_each_primary(
    cluster: ClusterGroup, r: redis.Redis
) -> None:
    """FCALL goes to the slot of its keys: cancel (a library function) on each primary,
    then the claim sees the cancel request there."""
    r.function_flush()  # every primary: the first call loads the library again
    _reset_stats(cluster)
    guard = _guard(r)
    for tenant in TENANTS:
        r.set(keyspace.submitted(tenant, "c1"), str(now_ms() + 60_000), px=60_000)
        keys = [
            keyspace.result(tenant, "c1"),
            keyspace.cancel(tenant, "c1"),
            keyspace.done(tenant, "c1"),
            keyspace.submitted(tenant, "c1"),
            keyspace.rejected(tenant, "c1"),
            keyspace.claim(tenant, "c1"),
            keyspace.pending(tenant),
        ]
        args = [f"token-{tenant}", 60_000, 60_000, "c1", keyspace.MAX_TTL_MS]
        assert int(functions.call(r, functions.CANCEL, keys, args)) >= 0
        claim = guard.claim_job(tenant, "c1")
        assert claim.outcome == ClaimOutcome.CANCELLED
        assert claim.cancel_token == f"token-{tenant}"
    # Loaded on every primary (FUNCTION LOAD went to each).
    for node in r.get_nodes():  # type: ignore[attr-defined]
        if node.server_type == "primary":
            libraries = node.redis_connection.function_list(library=functions.LIBRARY)
            assert len(libraries) == 1, node.name
    # The keys of FCALL and of pipelined EVALSHA come from their arguments, not from
    # COMMAND GETKEYS sent to one node (a round trip each, and failing while it is dead).
    assert _getkeys_calls(cluster) == 0


def _reset_stats(cluster: ClusterGroup) -> None:
    for node in cluster.running():
        with redis.Redis(port=node.port) as client:
            client.config_resetstat()


def _getkeys_calls(cluster: ClusterGroup) -> int:
    calls = 0
    for node in cluster.running():
        with redis.Redis(port=node.port) as client:
            stats: dict[str, Any] = client.info("commandstats")
            calls += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return calls


def test_a_client_waits_on_many_done_lists_of_its_tenant(r: redis.Redis) -> None:
    """A client's BLPOP names the done lists of its own tenant's jobs: one slot."""
    for tenant in TENANTS:
        keys = [keyspace.done(tenant, f"w{n}") for n in range(5)]
        r.rpush(keys[3], "1")
        popped = r.blpop(list(reversed(keys)), timeout=1)
        assert popped is not None and popped[0] == keys[3].encode()


def test_queued_markers_of_a_batch_per_tenant(r: redis.Redis) -> None:
    expires = now_ms() + 60_000
    for tenant in TENANTS:
        batch = markers.MarkerWrite(
            [keyspace.submitted(tenant, f"m{n}") for n in range(3)],
            [(expires, 60) for _ in range(3)],
            claim=False,
        )
        assert markers.write(r, batch) == markers.MARKED * 3
        assert r.get(keyspace.submitted(tenant, "m2")) == str(expires).encode()


def test_a_batch_over_tenants_on_three_primaries_fails_one_slot_alone(r: redis.Redis) -> None:
    """One call per slot: the tenant whose quota key a writer broke (its primary's call)
    gets errors, the jobs on the other primaries are claimed and stored, in order."""
    r.rpush(keyspace.bucket(BROKEN), "not a hash")
    requests = [
        single._request(t, f"b{n}") for n in range(3) for t in (FREE, BROKEN, RATED, "plain")
    ]
    claims = _guard(r).claim_many(requests)
    outcomes = [
        (req.tenant, req.job_id, c.outcome) for req, c in zip(requests, claims, strict=True)
    ]
    for tenant, job, outcome in outcomes:
        if tenant == BROKEN:
            assert outcome == ClaimOutcome.ERROR, job
        elif tenant == RATED:
            assert outcome == (ClaimOutcome.CLAIMED if job == "b0" else "rate_limited"), job
        else:
            assert outcome == ClaimOutcome.CLAIMED, (tenant, job)
    stored = _guard(r).store_many(
        [(req.tenant, req.job_id, b"r", WINDOW_MS) for req in requests], result_ttl_s=60
    )
    assert stored == [True] * len(requests)
    for req in requests:
        assert r.get(keyspace.claim(req.tenant, req.job_id)) == b"done"


def test_audit_catalog_and_samples(r: redis.Redis) -> None:
    log = AuditLog(r, maxlen=100)
    log.record(job_id="j1", tenant="acme", reason=AuditReason.REPLAYED, verified=True)
    assert [(a.job_id, a.reason) for a in log.latest(5)] == [("j1", "replayed")]
    catalog.advertise(r, "node-1", ["digits@1"])
    assert catalog.advertised(r) == {"digits@1"}
    assert catalog.offered(r) == ({"digits@1"}, True)
    assert catalog.live_nodes(r) == 1
    store = SampleStore(r, interval_s=5)
    nodes = [f"n{n}@host" for n in range(12)]  # their sample keys on every primary
    assert len({keyspace.sample(n) for n in nodes}) == 12
    now = time.time()
    for node in nodes:
        store.record({"node": node, "at": now, "v": SAMPLE_VERSION})
    assert sorted(store.latest(now=now)) == sorted(nodes)
    store.forget(nodes[0])
    assert nodes[0] not in store.latest(now=now)


def test_the_async_client_reads_and_calls_across_primaries(
    cluster: ClusterGroup, r: redis.Redis
) -> None:
    for tenant in TENANTS:
        r.set(keyspace.result(tenant, "a1"), tenant.encode())

    async def go() -> tuple[list[Any], Any]:
        client: Any = async_redis_client(cluster.url, tls=RedisTLS(), ha=_ha(cluster))
        try:
            values = await amget_many(
                client, [keyspace.result(t, "a1") for t in TENANTS] + ["maas:{x}:none"]
            )
            batch = markers.MarkerWrite([keyspace.submitted("acme", "a2")], [(1, 60)], claim=False)
            return values, await markers.awrite(client, batch)
        finally:
            await client.aclose()

    _reset_stats(cluster)
    values, marked = asyncio.run(go())
    assert _getkeys_calls(cluster) == 0
    assert values == [t.encode() for t in TENANTS] + [None]
    assert marked == markers.MARKED


def test_acl_apply_finds_every_node(cluster: ClusterGroup) -> None:
    env = {"MAAS_BROKER_URL": cluster.url, "MAAS_REDIS_CLUSTER": "1"}
    settings = Settings.from_env(env)
    nodes = acl.cluster_data_nodes(cluster.url, settings)
    assert nodes == sorted(f"redis://127.0.0.1:{n.port}/0" for n in cluster.nodes)


def test_wait_on_a_cluster_confirms_stores_on_every_primary(cluster: ClusterGroup) -> None:
    """``MAAS_REDIS_WAIT_REPLICAS`` is accepted on a cluster, and a batch of results of
    tenants on three primaries is confirmed by the barrier on each (backend/barrier.py);
    a replayed job is confirmed too before it is refused. Replicas that stop: the
    store raises `NotReplicated` (the job is handed back), and the replayed copy is
    ``busy`` (retried later), not acknowledged on an unconfirmed result."""
    env = {
        "MAAS_BROKER_URL": cluster.url,
        "MAAS_REDIS_CLUSTER": "1",
        "MAAS_REDIS_CLUSTER_NODES": cluster.seeds,
        "MAAS_REDIS_WAIT_REPLICAS": "1",
        "MAAS_REDIS_WAIT_TIMEOUT_MS": "300",
    }
    ha = Settings.from_env(env).redis_ha
    client = _client(cluster)
    try:
        guard = JobGuard(client, lease_s=LEASE_S, holder="w", ha=ha)
        requests = [ClaimRequest(t, "wait-1", WINDOW_MS) for t in TENANTS]
        assert [c.outcome for c in guard.claim_many(requests)] == [ClaimOutcome.CLAIMED] * 3
        stored = guard.store_many(
            [(t, "wait-1", b"r", WINDOW_MS) for t in TENANTS], result_ttl_s=60
        )
        assert stored == [True] * 3
        for tenant in TENANTS:  # the barrier key, in the tenant's slot, expiring
            assert 0 < client.pttl(keyspace.barrier(tenant)) <= 10_000
        assert [c.outcome for c in guard.claim_many(requests)] == [ClaimOutcome.REPLAYED] * 3
        primaries = {n.port for n in cluster.primaries()}
        replicas = [n for n in cluster.running() if n.port not in primaries]
        for node in replicas:
            node.freeze()
        try:
            with pytest.raises(NotReplicated, match="0 of 1 replica"):
                guard.store_result("acme", "wait-2", b"r", result_ttl_s=60, replay_window_ms=1)
            # Stored, not confirmed: its next copy is retried later, not acknowledged.
            assert guard.claim_job("acme", "wait-2").outcome == ClaimOutcome.BUSY
        finally:
            for node in replicas:
                node.thaw()
        cluster.wait_ok()
        assert guard.claim_job("acme", "wait-2").outcome == ClaimOutcome.REPLAYED
    finally:
        client.close()


# -- last: they kill primaries ---------------------------------------------------------------
def test_a_client_follows_a_primary_killed_mid_sequence(cluster: ClusterGroup) -> None:
    """Claim, kill the tenant's primary, store at once: the client retries through the
    failover (its replica promoted) and the store succeeds; batches over every primary
    work after it. Nothing is asserted kept: replication is asynchronous."""
    client = _client(cluster)
    try:
        guard = _guard(client)
        tenant = TENANTS[0]
        old = cluster.owner(keyspace.claim(tenant, "f1"))
        assert guard.claim(tenant, "f1") == ClaimOutcome.CLAIMED
        old.kill()
        started = time.monotonic()
        assert guard.store_result(
            tenant, "f1", b"after", result_ttl_s=60, replay_window_ms=WINDOW_MS
        )
        took = time.monotonic() - started
        cluster.wait_failover(old)
        assert cluster.owner(keyspace.claim(tenant, "f1")).port != old.port
        assert client.get(keyspace.result(tenant, "f1")) == b"after"
        requests = [ClaimRequest(t, "f2", WINDOW_MS) for t in TENANTS]
        # The promoted replica has no script cache: its call misses (NOSCRIPT) and is
        # sent again alone; the other primaries' claims ran once (not found busy).
        assert [c.outcome for c in guard.claim_many(requests)] == [ClaimOutcome.CLAIMED] * 3
        stored = guard.store_many([(t, "f2", b"r", WINDOW_MS) for t in TENANTS], result_ttl_s=60)
        assert stored == [True] * 3
        # The function library is on the promoted replica (FUNCTION LOAD is replicated).
        client.set(keyspace.submitted(tenant, "f3"), str(now_ms() + 60_000), px=60_000)
        assert int(functions.call(client, functions.CANCEL, *_cancel(tenant, "f3"))) >= 0
        assert took < 15, f"the store took {took:.1f} s through the failover"
    finally:
        client.close()


def test_a_batch_pipeline_rides_through_a_primary_killed_just_before(
    cluster: ClusterGroup,
) -> None:
    """A batch over every primary sent while one of them is dead: the pipeline cannot
    reach that node, sends nothing, waits and sends the batch once the replica has taken
    over (each job claimed once, none found busy by a second send)."""
    client = _client(cluster)
    try:
        guard = _guard(client)
        assert [
            c.outcome for c in guard.claim_many([ClaimRequest(t, "g0", WINDOW_MS) for t in TENANTS])
        ] == [ClaimOutcome.CLAIMED] * 3
        old = cluster.owner(keyspace.claim(TENANTS[1], "g1"))
        old.kill()
        claims = guard.claim_many([ClaimRequest(t, "g1", WINDOW_MS) for t in TENANTS])
        assert [c.outcome for c in claims] == [ClaimOutcome.CLAIMED] * 3
        assert (
            guard.store_many([(t, "g1", b"r", WINDOW_MS) for t in TENANTS], result_ttl_s=60)
            == [True] * 3
        )
        cluster.wait_failover(old)
    finally:
        client.close()


def test_the_async_client_rides_through_a_primary_killed(cluster: ClusterGroup) -> None:
    tenant = TENANTS[2]
    old = cluster.owner(keyspace.claim(tenant, "h1"))

    async def go() -> Any:
        client: Any = async_redis_client(cluster.url, tls=RedisTLS(), ha=_ha(cluster))
        try:
            await client.set(keyspace.submitted(tenant, "h1"), str(now_ms() + 60_000))
            old.kill()
            # A pipeline first (one MGET per primary, the dead one's sent again alone).
            values = await amget_many(client, [keyspace.submitted(t, "h1") for t in TENANTS])
            assert values[:2] == [None, None]
            return await functions.acall(client, functions.CANCEL, *_cancel(tenant, "h1"))
        finally:
            await client.aclose()

    assert int(asyncio.run(go())) >= 0
    cluster.wait_failover(old)


def _cancel(tenant: str, job: str) -> tuple[list[str], list[Any]]:
    keys = [
        keyspace.result(tenant, job),
        keyspace.cancel(tenant, job),
        keyspace.done(tenant, job),
        keyspace.submitted(tenant, job),
        keyspace.rejected(tenant, job),
        keyspace.claim(tenant, job),
        keyspace.pending(tenant),
    ]
    return keys, ["token", 60_000, 60_000, job, keyspace.MAX_TTL_MS]
