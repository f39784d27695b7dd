"""Flower's Broker page (and ``/api/queues/length``) counts the real backlog.

Flower counts a queue by the lists named after it (the queue's own list and
kombu's priority steps). Under fair share a job queue's jobs wait in one list
per tenant (``maas.normal.<tenant>``, broker/fetch.py), which Flower does not
know: it showed only jobs queued before an upgrade. `install` makes Flower's
Redis broker add them, finding the tenants as `backlog.read_backlog` does
(each job queue's ring and arrivals), in two round trips per page. Flower's
Redis role reads the ring and the arrivals for that, never a job list's
messages (tenancy/acl.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from maas_worker.broker import fetch
from maas_worker.broker.backlog import tenants_named
from maas_worker.protocol import PRIORITIES, queue_for

#: The job queues (their jobs sit in tenant lists); other queues Flower counts as it does.
_JOB_QUEUES = frozenset(queue_for(p) for p in PRIORITIES)


async def queue_lengths(broker: Any, names: Iterable[str]) -> list[dict[str, Any]]:
    """``[{"name": queue, "messages": n}, ...]`` as Flower's ``RedisBase.queues`` returns
    them, with each job queue's tenant lists counted; ``broker`` is Flower's Redis broker
    (its asyncio client ``redis``, ``broker_prefix``, ``priority_steps``, ``_q_for_pri``)."""
    counts = await count_queues(
        broker.redis, broker.broker_prefix, list(names), broker.priority_steps, broker._q_for_pri
    )
    return [{"name": name, "messages": n} for name, n in counts.items()]


async def count_queues(
    client: Any, prefix: str, names: list[str], steps: Iterable[int], q_for_pri: Any
) -> dict[str, int]:
    """Queue -> messages waiting, over the keys under ``prefix`` (one queue shard's)."""
    steps = list(steps)
    async with client.pipeline() as pipe:
        for name in names:
            for pri in steps:
                pipe.llen(prefix + q_for_pri(name, pri))
            if name in _JOB_QUEUES:
                pipe.lrange(prefix + fetch.ring_key(name), 0, -1)
                pipe.smembers(prefix + fetch.arrivals_key(name))
        replies = iter(await pipe.execute())
    counts: dict[str, int] = {}
    tenants: dict[str, list[str]] = {}
    for name in names:
        counts[name] = sum(int(next(replies)) for _ in steps)
        if name in _JOB_QUEUES:
            tenants[name] = tenants_named(next(replies), next(replies))
    if any(tenants.values()):
        async with client.pipeline() as pipe:
            for name, named in tenants.items():
                for t in named:
                    pipe.llen(prefix + fetch.tenant_queue(name, t))
            lengths = iter(await pipe.execute())
        for name, named in tenants.items():
            counts[name] += sum(int(next(lengths)) for _ in named)
    return counts


async def sharded_queue_lengths(
    settings: Any, broker: Any, names: Iterable[str]
) -> list[dict[str, Any]]:
    """`queue_lengths` summed over every queue shard (MAAS_QUEUE_SHARDS, a Redis Cluster):
    each shard's keys under its prefix, on its own client (shards.py)."""
    from maas_worker.broker import shards

    names = list(names)
    total = dict.fromkeys(names, 0)
    for k in shards.all_shards(settings):
        client = shards.async_broker_client(settings, k)
        try:
            counts = await count_queues(
                client,
                shards.key_prefix(settings, k),
                names,
                broker.priority_steps,
                broker._q_for_pri,
            )
        finally:
            await client.aclose()
        for name, n in counts.items():
            total[name] += n
    return [{"name": name, "messages": total[name]} for name in names]


def install(settings: Any = None) -> None:
    """Make Flower's Redis brokers (plain, TLS, socket, Sentinel) count tenant lists
    (idempotent; call before Flower starts); with queue shards (``settings``) every
    shard's."""
    from flower.utils import broker as flower_broker  # type: ignore[import-untyped]

    base = flower_broker.RedisBase
    if getattr(base.queues, "maas_fair", False):
        return

    async def queues(self: Any, names: Iterable[str]) -> list[dict[str, Any]]:
        try:
            if settings is not None and settings.redis_ha.sharded:
                return await sharded_queue_lengths(settings, self, names)
            return await queue_lengths(self, names)
        finally:
            # As Flower's own: each page makes a client and closes it.
            if hasattr(self.redis, "aclose"):
                await self.redis.aclose()
            else:
                await self.redis.close()

    queues.maas_fair = True  # type: ignore[attr-defined]
    base.queues = queues
