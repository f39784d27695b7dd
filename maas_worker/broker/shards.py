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

import threading
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.crc import key_slot

if TYPE_CHECKING:
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
# On a Redis Cluster a shard's connections go to the primary that serves its
# hash tag's slot, found when a connection is made. A plain connection rather
# than redis-py's RedisCluster: kombu's channel needs a plain pool (BRPOP on a
# connection of its own, pipelines, MULTI), and WAIT must follow the writes it
# vouches for on the same connection. A reply saying the slot is served
# elsewhere (or not at all, for now) drops the connection and raises a
# connection error, so every caller's outage handling retries, and the next
# connection asks the cluster again.

#: Replies that mean "this node does not (or cannot now) serve the shard's slot".
MOVED_REPLIES: tuple[type[Exception], ...] = (
    redis.exceptions.AskError,  # MovedError is one
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,
)
#: Our transport option (kombu keeps unknown options for the channel to read): the
#: Redis Cluster nodes to start from (``[(host, port), ...]``), set when the broker
#: is a Redis Cluster (`shard_transport_options`; transport.HardenedChannel pins).
CLUSTER_SEEDS_OPTION = "maas_cluster_seeds"
#: A seed that does not answer this fast is skipped for the next one.
SEED_TIMEOUT_S = 2.0


def tag_slot(shard: int) -> int:
    """The Redis Cluster hash slot of shard ``shard``'s keys."""
    return int(key_slot(TAG_FORMAT.format(shard).encode()))


def slot_of_prefix(key_prefix: str) -> int:
    """The hash slot of every key under ``key_prefix`` (a shard's hash tag)."""
    return int(key_slot(key_prefix.encode()))


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> ``[(host, port), ...]`` (MAAS_REDIS_CLUSTER_NODES)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            host, _, port = part.rpartition(":")
            out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def owner_in(reply: Any, slot: int, asked: tuple[str, int]) -> tuple[str, int] | None:
    """The primary serving ``slot`` in a ``CLUSTER SLOTS`` reply (from node ``asked``)."""
    for start, end, primary, *_ in reply or []:
        if int(start) <= slot <= int(end):
            host = _text(primary[0])
            # "" or "?": the node does not know its own address; it is the one asked.
            return (host if host not in ("", "?") else asked[0], int(primary[1]))
    return None


def nodes_in(reply: Any, asked: tuple[str, int]) -> list[tuple[str, int]]:
    """Every node a ``CLUSTER SLOTS`` reply names (more places to ask next time)."""
    out = []
    for _start, _end, *nodes in reply or []:
        for node in nodes:
            host = _text(node[0])
            out.append((host if host not in ("", "?") else asked[0], int(node[1])))
    return out


class SlotOwner:
    """Where one hash slot is served: asked of the cluster's nodes, remembered until
    a connection there fails or is told the slot moved (`forget`)."""

    def __init__(self, seeds: list[tuple[str, int]], slot: int) -> None:
        self.slot = slot
        self._known = list(dict.fromkeys(seeds))
        self._owner: tuple[str, int] | None = None
        self._lock = threading.Lock()
        #: How many times the owner was forgotten: unchanged between two reads, every
        #: connection made in between went to the same node (`epoch`).
        self.forgotten = 0

    def forget(self) -> None:
        """The remembered owner is wrong (or gone): ask again at the next connection."""
        self._owner = None
        self.forgotten += 1

    def candidates(self) -> list[tuple[str, int]]:
        """The nodes to ask, the last one that answered first."""
        return list(self._known)

    def learn(self, asked: tuple[str, int], reply: Any) -> tuple[str, int]:
        """Record a ``CLUSTER SLOTS`` reply from ``asked``; the slot's owner
        (`redis.ConnectionError` if no node serves it now)."""
        owner = owner_in(reply, self.slot, asked)
        with self._lock:
            known = [asked, *nodes_in(reply, asked), *self._known]
            self._known = list(dict.fromkeys(known))
            self._owner = owner
        if owner is None:
            raise redis.ConnectionError(f"no Redis Cluster node serves slot {self.slot} now")
        return owner

    def cached(self) -> tuple[str, int] | None:
        """The owner remembered, if any."""
        return self._owner

    def owner(self, connect: Callable[[str, int], Any]) -> tuple[str, int]:
        """The slot's owner now: the remembered one, or asked (``CLUSTER SLOTS``) of each
        known node in turn over ``connect(host, port)`` (a redis-py connection)."""
        if (found := self._owner) is not None:
            return found
        last: Exception | None = None
        for node in self.candidates():
            conn = connect(*node)
            try:
                conn.send_command("CLUSTER", "SLOTS")
                reply = conn.read_response()
            except (redis.RedisError, OSError) as exc:
                last = exc
                continue
            finally:
                conn.disconnect()
            return self.learn(node, reply)
        raise redis.ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS ({last})")

    async def async_owner(self, connect: Callable[[str, int], Any]) -> tuple[str, int]:
        """`owner` over ``redis.asyncio`` connections."""
        if (found := self._owner) is not None:
            return found
        last: Exception | None = None
        for node in self.candidates():
            conn = connect(*node)
            try:
                await conn.send_command("CLUSTER", "SLOTS")
                reply = await conn.read_response()
            except (redis.RedisError, OSError) as exc:
                last = exc
                continue
            finally:
                await conn.disconnect()
            return self.learn(node, reply)
        raise redis.ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS ({last})")


class _Pinned:
    """A connection to the node serving `SlotOwner` ``locator``'s slot (sync)."""

    locator: SlotOwner
    #: The connection class that asks the seeds (no pinning, same TLS and credentials).
    seed_class: type

    def _seed(self, host: str, port: int) -> Any:
        kwargs = {**self._seed_kwargs(), "host": host, "port": port}
        kwargs["socket_timeout"] = kwargs["socket_connect_timeout"] = SEED_TIMEOUT_S
        return self.seed_class(**kwargs)

    def _seed_kwargs(self) -> dict[str, Any]:
        return dict(self._pin_kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pin_kwargs = {k: v for k, v in kwargs.items() if k not in ("host", "port")}
        super().__init__(*args, **kwargs)

    def _connect(self) -> Any:
        self.host, self.port = self.locator.owner(self._seed)
        try:
            return super()._connect()  # type: ignore[misc]
        except OSError:
            self.locator.forget()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except MOVED_REPLIES as exc:
            self.locator.forget()
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(
                f"{type(exc).__name__}: shard slot {self.locator.slot} is not served here now"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError):
            self.locator.forget()
            raise


class _AsyncPinned(_Pinned):
    """`_Pinned` for ``redis.asyncio`` connections."""

    async def _connect(self) -> Any:
        self.host, self.port = await self.locator.async_owner(self._seed)
        try:
            return await super()._connect()
        except OSError:
            self.locator.forget()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super(_Pinned, self).read_response(*args, **kwargs)  # type: ignore[misc]
        except MOVED_REPLIES as exc:
            self.locator.forget()
            await self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(
                f"{type(exc).__name__}: shard slot {self.locator.slot} is not served here now"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError):
            self.locator.forget()
            raise


#: One locator per (seeds, slot) in a process: every pool of a shard shares what it learnt.
_locators: dict[tuple[tuple[tuple[str, int], ...], int], SlotOwner] = {}
_locators_lock = threading.Lock()


def locator(seeds: list[tuple[str, int]], slot: int) -> SlotOwner:
    """The process's `SlotOwner` of ``slot`` for a cluster reached through ``seeds``."""
    key = (tuple(seeds), slot)
    with _locators_lock:
        found = _locators.get(key)
        if found is None:
            found = _locators[key] = SlotOwner(seeds, slot)
        return found


def pinned_class(base: type, owner: SlotOwner, *, seed_class: type | None = None) -> type:
    """A subclass of connection class ``base`` whose connections go to ``owner``'s node
    (found at each connect) and turn MOVED/ASK/TRYAGAIN/CLUSTERDOWN/READONLY replies
    into a dropped connection and a `redis.ConnectionError`."""
    asynchronous = issubclass(base, redis.asyncio.Connection)
    mixin = _AsyncPinned if asynchronous else _Pinned
    return type(
        f"Pinned{base.__name__}",
        (mixin, base),
        {"locator": owner, "seed_class": seed_class or base},
    )


def seeds_of(settings: Settings) -> list[tuple[str, int]]:
    """The cluster nodes to start from: the broker URL's, then MAAS_REDIS_CLUSTER_NODES."""
    url = urlsplit(settings.broker_url)
    first = [(url.hostname or "127.0.0.1", url.port or 6379)]
    return list(dict.fromkeys([*first, *parse_nodes(settings.redis_ha.cluster_nodes)]))


def broker_client(settings: Settings, shard: int) -> redis.Redis:
    """A client of the Redis that holds shard ``shard``'s broker keys (sync).

    On one Redis (Sentinel included) the broker URL's plain client; on a Redis
    Cluster a client whose connections go to the primary serving the shard's
    hash tag (found at each new connection; a MOVED-like reply or a lost node
    is a `redis.ConnectionError` to retry).
    """
    from maas_worker.backend import redis as backend_redis

    if not settings.redis_ha.cluster:
        return backend_redis.redis_client(
            settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha
        )
    url, options = backend_redis._options(
        settings.broker_url, settings.redis_tls, asynchronous=False
    )
    base = options["connection_class"]
    options["connection_class"] = pinned_class(base, locator(seeds_of(settings), tag_slot(shard)))
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=backend_redis.MAX_CONNECTIONS,
        timeout=backend_redis.BACKEND_SOCKET_TIMEOUT_S,
        **options,
    )
    return redis.Redis(connection_pool=pool)


def async_broker_client(settings: Settings, shard: int) -> redis.asyncio.Redis:
    """`broker_client` for asyncio code."""
    from maas_worker.backend import redis as backend_redis

    if not settings.redis_ha.cluster:
        return backend_redis.async_redis_client(
            settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha
        )
    url, options = backend_redis._options(
        settings.broker_url, settings.redis_tls, asynchronous=True
    )
    base = options["connection_class"]
    pinned = pinned_class(base, locator(seeds_of(settings), tag_slot(shard)))
    client = redis.asyncio.Redis.from_url(url, **options)
    # redis.asyncio's from_url puts the class of the URL's scheme (SSLConnection for
    # rediss://) over the one given (the sync one keeps it): pin here, or TLS
    # connections would go to the URL's node, whatever it serves.
    client.connection_pool.connection_class = pinned
    return client


def key_prefix(settings: Settings, shard: int) -> str:
    """Shard ``shard``'s key prefix under ``settings`` (``""`` when not sharded)."""
    return prefix(shard, sharded=settings.redis_ha.sharded)


def consumed(settings: Settings, text: str | None = None) -> list[int]:
    """The shards a worker node consumes: ``text`` (``worker --shards``), else
    MAAS_WORKER_SHARDS, else every shard; `ConfigError` for a bad list."""
    from maas_worker.errors import ConfigError

    text = text or settings.worker_shards
    n = settings.redis_ha.queue_shards
    if not text:
        return list(range(n))
    try:
        return parse_shards(text, n)
    except ValueError as exc:
        raise ConfigError(f"shards {text!r}: {exc}") from None


def shard_transport_options(settings: Settings, shard: int | None = None) -> dict[str, Any]:
    """kombu transport options for a Celery connection to shard ``shard`` (default:
    the first shard the node consumes): the shard's ``global_keyprefix``, and on a
    Redis Cluster the nodes its channel asks where the shard's slot is. None when
    the deployment is not sharded (key names unchanged)."""
    if not settings.redis_ha.sharded:
        return {}
    k = consumed(settings)[0] if shard is None else shard
    options: dict[str, Any] = {"global_keyprefix": key_prefix(settings, k)}
    if settings.redis_ha.cluster:
        options[CLUSTER_SEEDS_OPTION] = seeds_of(settings)
    return options


def all_shards(settings: Settings) -> list[int]:
    """Every shard of the deployment: ``[0, ..., MAAS_QUEUE_SHARDS - 1]``."""
    return list(range(settings.redis_ha.queue_shards))


def epoch(client: Any) -> int | None:
    """How many times the node of a pinned broker client's shard was forgotten (a
    failover, a slot moved, a connection lost), None for a client of one server.

    ``WAIT`` on a shard's connection vouches for the writes made to the same node
    before it: the producer notes this before its send and checks it after its
    ``WAIT`` (client/core.py), so a send and a ``WAIT`` that went to two nodes are
    never taken for a confirmation."""
    owner = getattr(client.connection_pool.connection_class, "locator", None)
    return owner.forgotten if isinstance(owner, SlotOwner) else None
