"""The model catalogue and the live node list in the result backend.

Each worker node advertises the models it serves (`advertise`, refreshed by
the worker's advertiser thread) and withdraws itself on a clean stop; a
client reads the catalogue (`advertised`) to refuse an unknown model before
it enqueues anything. Entries older than `CATALOG_TTL_S` are pruned.

Besides those live entries, every reference ever advertised is kept in a
durable set (`known`, no TTL), so a client still accepts a job for a model
of this deployment while no worker is up (the job waits in its queue), and
`live_nodes` tells whether any worker is consuming right now.
"""

from __future__ import annotations

import time

import redis

from maas_worker.backend import keyspace

#: A catalogue entry older than this is no longer offered to clients.
CATALOG_TTL_S = 3600.0
#: A node whose last heartbeat is older than this is not counted as live
#: (workers refresh theirs every 10 s: three missed refreshes).
NODE_LIVE_S = 30.0


def advertise(client: redis.Redis, node: str, refs: list[str]) -> None:
    """Record that ``node`` is alive and serves ``refs`` (also in the durable set)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keyspace.NODES, {node: now})
    if refs:
        pipe.zadd(keyspace.CATALOG, dict.fromkeys(refs, now))
        pipe.sadd(keyspace.MODELS, *refs)
    pipe.zremrangebyscore(keyspace.CATALOG, "-inf", now - CATALOG_TTL_S)
    pipe.zremrangebyscore(keyspace.NODES, "-inf", now - CATALOG_TTL_S)
    pipe.execute()


def withdraw(client: redis.Redis, node: str) -> None:
    """Remove ``node`` from the live node list (clean shutdown)."""
    client.zrem(keyspace.NODES, node)


def advertised(client: redis.Redis) -> set[str]:
    """Model references that workers advertised within the last `CATALOG_TTL_S`."""
    since = time.time() - CATALOG_TTL_S
    rows: list[bytes] = client.zrangebyscore(keyspace.CATALOG, since, "+inf")  # type: ignore[assignment]
    return {r.decode() for r in rows}


def offered(client: redis.Redis) -> tuple[set[str], bool]:
    """What a client may submit to: the references advertised within the last
    `CATALOG_TTL_S` and every one ever advertised (one round trip); and whether
    any worker of this deployment ever advertised a model."""
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keyspace.CATALOG, time.time() - CATALOG_TTL_S, "+inf")
    pipe.smembers(keyspace.MODELS)
    live, ever = pipe.execute()
    return {r.decode() for r in live} | {r.decode() for r in ever}, bool(ever)


def known(client: redis.Redis) -> set[str]:
    """Every model reference a worker of this deployment has ever advertised."""
    rows: set[bytes] = client.smembers(keyspace.MODELS)  # type: ignore[assignment]
    return {r.decode() for r in rows}


def live_nodes(client: redis.Redis) -> int:
    """How many worker nodes sent a heartbeat within the last `NODE_LIVE_S`."""
    return int(client.zcount(keyspace.NODES, time.time() - NODE_LIVE_S, "+inf"))
