"""The model catalogue and the live node list in the result backend.

Each worker node advertises the models it serves (`advertise`, refreshed by
the worker's advertiser thread) and withdraws itself on a clean stop; a
client reads the catalogue (`advertised`) to refuse an unknown model before
it enqueues anything. Entries older than `CATALOG_TTL_S` are pruned.
"""

from __future__ import annotations

import time

import redis

from maas_worker.backend import keyspace

#: A catalogue entry older than this is no longer offered to clients.
CATALOG_TTL_S = 3600.0


def advertise(client: redis.Redis, node: str, refs: list[str]) -> None:
    """Record that ``node`` is alive and serves ``refs``."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keyspace.NODES, {node: now})
    if refs:
        pipe.zadd(keyspace.CATALOG, dict.fromkeys(refs, now))
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
