"""``MAAS_REDIS_WAIT_REPLICAS`` on a Redis Cluster: the durability barrier.

``WAIT`` counts the replicas holding every write *its own connection* made, and
a cluster client spreads a batch over one connection per primary, none of them
the caller's. But a node runs its commands one at a time: once our writes to a
node were answered, any later write to that node, on any connection, is past
them in its replication stream. So after the writes, for each primary they
touched, one pipeline on a connection to THAT node writes the tenant's barrier
key (`keyspace.barrier`, in the tenant's slot) and then ``WAIT``\\ s: the replicas
it confirms hold every earlier write to the node. The count is the least over
the nodes.

The barrier must go to the node the writes went to. `pin` notes, before the
writes, which node serves each tenant (the client's slot map: no I/O); `confirm`
refuses (`NotReplicated`) if the map has changed since (a failover, a slot that
moved: the writes may have gone to a node that is gone, or been sent again to
another), and a barrier refused by its node (``MOVED``: no longer the primary) or
cut off is not a confirmation either. On one server or Sentinel none of this runs:
the ``WAIT`` follows the writes in their own pipeline (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio.cluster

from maas_worker.backend import keyspace
from maas_worker.backend.cluster import is_cluster
from maas_worker.backend.redis import NotReplicated, wait_replicated
from maas_worker.settings import RedisHA

#: The barrier key's lifetime (ms): it only has to reach the replication stream.
BARRIER_PX_MS = 10_000

#: Tenant -> the ``host:port`` of the primary serving its slot when pinned.
Pin = dict[str, str]


def pin(client: Any, tenants: Iterable[str]) -> Pin | None:
    """The node serving each of ``tenants`` now, noted before the writes `confirm` will
    vouch for; None when ``client`` is not a Redis Cluster client (no barrier: the
    ``WAIT`` goes in the writes' own pipeline). No I/O: the client's slot map (an
    asyncio cluster client must have been initialized: `apin`)."""
    if not is_cluster(client):
        return None
    nodes: Pin = {}
    for tenant in tenants:
        try:
            nodes[tenant] = client.get_node_from_key(keyspace.barrier(tenant)).name
        except redis.RedisError as exc:  # a slot nobody serves in the map: an outage
            raise redis.ConnectionError(f"Redis Cluster slot map: {exc}") from exc
    return nodes


async def apin(client: Any, tenants: Iterable[str]) -> Pin | None:
    """`pin` for a ``redis.asyncio`` cluster client (read its slot map first if it has
    not yet: it connects at its first command)."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.initialize()
    return pin(client, tenants)


def _nodes(client: Any, pinned: Pin) -> dict[str, tuple[Any, str]]:
    """The node of each pinned tenant (one tenant per node, for its barrier key); refuses
    if the slot map no longer agrees with the pin."""
    out: dict[str, tuple[Any, str]] = {}
    for tenant, name in pinned.items():
        node = client.get_node_from_key(keyspace.barrier(tenant))
        if node.name != name:
            raise NotReplicated(
                f"the Redis Cluster node serving tenant {tenant!r} changed during the write "
                f"({name} -> {node.name}): not confirmed"
            )
        out.setdefault(name, (node, tenant))
    return out


def _commands(tenant: str, ha: RedisHA) -> list[tuple[Any, ...]]:
    wait = ha.wait_command()
    assert wait is not None
    return [("SET", keyspace.barrier(tenant), "1", "PX", BARRIER_PX_MS), wait]


def _check(node: str, replies: list[Any], ha: RedisHA, what: str) -> None:
    if isinstance(replies[0], Exception):
        # MOVED (no longer the slot's primary), READONLY, CLUSTERDOWN: not confirmed.
        raise NotReplicated(f"{what}: barrier refused by {node} ({str(replies[0])[:80]})")
    wait_replicated(replies[1], ha, f"{what} (on {node})")


def confirm(client: Any, pinned: Pin | None, ha: RedisHA, what: str) -> None:
    """Return once ``ha.wait_replicas`` replicas of every pinned node hold every write
    made to it before; `NotReplicated` (or the connection error) otherwise. Nothing
    when ``pinned`` is None (not a cluster). The first node short of it ends it."""
    if not pinned:
        return
    for name, (node, tenant) in _nodes(client, pinned).items():
        pipe = node.redis_connection.pipeline(transaction=False)
        for command in _commands(tenant, ha):
            pipe.execute_command(*command)
        _check(name, pipe.execute(raise_on_error=False), ha, what)


async def _aone(node: Any, name: str, tenant: str, ha: RedisHA, what: str) -> None:
    conn = node.acquire_connection()
    try:
        commands = _commands(tenant, ha)
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
    except BaseException:
        # A reply not read would be the next caller's: never reuse this connection.
        await conn.disconnect()
        raise
    finally:
        node.release(conn)
    _check(name, replies, ha, what)


async def aconfirm(client: Any, pinned: Pin | None, ha: RedisHA, what: str) -> None:
    """`confirm` on a ``redis.asyncio`` cluster client: the nodes' barriers at once."""
    if not pinned:
        return
    nodes = _nodes(client, pinned)
    await asyncio.gather(
        *(_aone(node, name, tenant, ha, what) for name, (node, tenant) in nodes.items())
    )
