"""Queue shards: which shard a tenant's jobs go to, and the key prefix of each shard.

With one shard on one Redis (the default) broker keys carry no prefix. With
``MAAS_QUEUE_SHARDS`` = N > 1, or on a Redis Cluster (``MAAS_REDIS_CLUSTER``),
every broker key of shard K (its queue lists, the tenants' lists and rings,
kombu's ``unacked`` hash and index, the wake-up list, the bindings and the
fan-out channels) starts with the hash tag ``{maas-qK}``: Redis Cluster keeps
them in one slot, so the take script, which reads and writes many of them at
once, runs on the one node that serves that slot (docs/scaling.md, "Sharding
on Redis Cluster").

The placement rule, for producers in any language: tenant T's jobs go to shard
``crc32(utf8(T)) mod N`` (zlib's CRC-32, unsigned). A worker process consumes
one shard; a node consumes a set of them (`worker --shards`).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from maas_worker.settings import Settings

#: Shard K's hash tag (``{maas-q<K>}``), kombu's ``global_keyprefix`` for its keys.
TAG_FORMAT = "{{maas-q{}}}"


def shard_of(tenant: str, shards: int) -> int:
    """The shard tenant ``tenant``'s jobs go to: ``crc32(utf8(tenant)) mod shards``."""
    if shards <= 1:
        return 0
    return zlib.crc32(tenant.encode()) % shards


def prefix(shard: int, *, sharded: bool) -> str:
    """Shard ``shard``'s key prefix (its hash tag); ``""`` when the deployment is not sharded."""
    return TAG_FORMAT.format(shard) if sharded else ""


def parse_shards(text: str, shards: int) -> list[int]:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]``, each below ``shards``; ValueError otherwise."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first > last:
            raise ValueError(f"empty shard range {part!r}")
        out.extend(range(first, last + 1))
    if not out:
        raise ValueError("no shard named")
    bad = [k for k in out if not 0 <= k < shards]
    if bad:
        raise ValueError(
            f"shard {bad[0]} does not exist (MAAS_QUEUE_SHARDS={shards}: 0-{shards - 1})"
        )
    return sorted(set(out))


# -- connections to a shard -------------------------------------------------------------
# FOUNDATION STUBS (to be replaced by the pinned implementation): on a Redis
# Cluster a shard's connections must go to the node serving its hash tag's
# slot, and a MOVED/ASK/CLUSTERDOWN/TRYAGAIN reply must drop the connection
# (a reconnect finds the new owner). On one Redis these plain clients are right.


def broker_client(settings: Settings, shard: int) -> redis.Redis:
    """A client of the Redis that holds shard ``shard``'s broker keys (sync)."""
    from maas_worker.backend.redis import redis_client

    return redis_client(settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha)


def async_broker_client(settings: Settings, shard: int) -> redis.asyncio.Redis:
    """`broker_client` for asyncio code."""
    from maas_worker.backend.redis import async_redis_client

    return async_redis_client(settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha)


def key_prefix(settings: Settings, shard: int) -> str:
    """Shard ``shard``'s key prefix under ``settings`` (``""`` when not sharded)."""
    return prefix(shard, sharded=settings.redis_ha.sharded)
