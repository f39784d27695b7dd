"""Redis Cluster clients for the result store (`redis.redis_client` with
``MAAS_REDIS_CLUSTER``): redis-py's cluster clients, made to ride through a failover,
and the helpers that cut a many-tenant batch into one call per hash slot.

Every job-state key is ``maas:{<tenant>}:...`` (keyspace.py): one tenant, one slot,
so each job's scripts run on one node. A batch of many tenants' jobs (the batch
consumer's claims and stores, reads of many jobs' keys) is one call per slot
(`by_slot`), all in one pipeline. docs/scaling.md, "The result store on a Redis
Cluster".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NoReturn, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from maas_worker.errors import ConfigError
from maas_worker.settings import RedisHA, RedisTLS, is_tls_url

#: Redis Cluster: how long a command that met a dead node or a cluster that is down
#: is tried again (the slot map refreshed each time) before its connection error is
#: raised: as long as a client waits for one silent server (`redis.BACKEND_SOCKET_TIMEOUT_S`),
#: longer than a replica takes to replace a killed primary with a short
#: ``cluster-node-timeout`` (its 15 s default makes a failover an outage for callers).
CLUSTER_FAILOVER_S = 10.0
#: The first pause between those tries, doubled each time up to the cap (s).
CLUSTER_BACKOFF_BASE_S = 0.05
CLUSTER_BACKOFF_CAP_S = 1.0


class ClusterUnavailable(redis.ConnectionError):
    """Raised when a Redis Cluster could not serve a command after every retry: no node
    reachable, a slot without a primary, or the cluster down (a failover longer than the
    retries). A connection error, so every caller treats it as the outage it is."""


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (from a cluster client) is the cluster being unavailable, not a
    mistake in the command. redis-py raises some of these as `RedisClusterException`,
    which is not even a `redis.RedisError`: callers would take it for a bug."""
    if isinstance(exc, ClusterError | TryAgainError | SlotNotCoveredError):
        return True  # CLUSTERDOWN, MASTERDOWN, TRYAGAIN, a slot nobody serves
    # NodesManager.initialize when no startup node answers.
    return type(exc) is RedisClusterException and "cannot be connected" in str(exc)


def _outage(exc: BaseException) -> redis.ConnectionError:
    cause = exc.__cause__
    if isinstance(cause, redis.AuthenticationError | redis.exceptions.NoPermissionError):
        # No node would let us in: wrong credentials (`check_credentials`), not an outage.
        return redis.AuthenticationError(str(cause))
    return ClusterUnavailable(f"Redis Cluster unavailable: {str(exc)[:120]}")


def _retry_outage(exc: BaseException) -> bool:
    """Whether a cluster call that raised ``exc`` may be sent again after a pause: a
    node that refused or dropped the connection, the cluster down or moving; never
    credentials refused, never a timeout (the command may be running, and the caller
    waited a socket timeout already)."""
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(exc, redis.TimeoutError):
        return False
    return isinstance(exc, redis.ConnectionError) or _is_outage(exc)


class _Backoff:
    """The pauses between the tries of one call through a failover (`CLUSTER_FAILOVER_S`)."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + CLUSTER_FAILOVER_S
        self.delay = CLUSTER_BACKOFF_BASE_S

    def next(self) -> float | None:
        """The pause before the next try, or None when the time is up."""
        delay, self.delay = self.delay, min(self.delay * 2, CLUSTER_BACKOFF_CAP_S)
        return delay if time.monotonic() + delay < self.deadline else None


def _raise(exc: BaseException) -> NoReturn:
    if _is_outage(exc):
        raise _outage(exc) from exc
    raise exc


#: Commands whose keys follow their third word (``numkeys``): scripts and functions.
_NUMKEYS_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


def _numkeys_keys(command: Any, numkeys: Any, rest: Sequence[Any]) -> list[Any] | None:
    """The keys of a script or function call, read from its arguments (None for others)."""
    if str(command).upper() not in _NUMKEYS_COMMANDS:
        return None
    return list(rest[: int(numkeys)])


class _FailoverRetry:
    """Retries a cluster command with pauses while a failover runs.

    redis-py retries a command that met a dead node at once, ten
    times, refreshing its slot map each time; but until a replica is promoted
    (``cluster-node-timeout`` and an election, a second or two at best) the map
    still names the dead primary, so those tries all fail within milliseconds.
    This retries them for up to `CLUSTER_FAILOVER_S`, pausing between tries, as a
    client of one server waits for it. A pipeline's commands that met the dead node
    come here too (redis-py sends them again one by one), the others not again.
    """

    def _get_command_keys(self, *args: Any) -> Any:
        # redis-py asks the default node (``COMMAND GETKEYS``: a round trip per call)
        # for the keys of commands like FCALL, and of EVALSHA in a pipeline; a dead
        # default node then fails every such call until it is replaced, which
        # redis-py does not do on this path. The keys are in the arguments.
        if len(args) >= 3:
            keys = _numkeys_keys(args[0], args[2], args[3:])
            if keys is not None:
                return keys
        return super()._get_command_keys(*args)  # type: ignore[misc]

    def _internal_execute_command(self, *args: Any, **kwargs: Any) -> Any:
        backoff = _Backoff()
        while True:
            try:
                return super()._internal_execute_command(*args, **kwargs)  # type: ignore[misc]
            except (redis.RedisError, RedisClusterException) as exc:
                pause = backoff.next() if _retry_outage(exc) else None
                if pause is None:
                    _raise(exc)
                time.sleep(pause)


class _ClusterPipeline(_FailoverRetry, redis.cluster.ClusterPipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        strategy: Any = self._execution_strategy
        stack = list(strategy.command_queue)
        backoff = _Backoff()
        while True:
            try:
                return super().execute(raise_on_error)
            except (redis.RedisError, RedisClusterException) as exc:
                # Sent again only if no command was (no node's connection could be had:
                # redis-py raises before writing any); else the error is the caller's.
                unsent = all(c.result is None for c in stack)
                pause = backoff.next() if unsent and _retry_outage(exc) else None
                if pause is None:
                    _raise(exc)
                time.sleep(pause)
                strategy.command_queue = list(stack)


class _Cluster(_FailoverRetry, redis.cluster.RedisCluster):
    """redis-py's cluster client that waits through a failover (`_FailoverRetry`) and
    whose outages are connection errors (`ClusterUnavailable`)."""

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        # redis-py builds its own ClusterPipeline here; ours adds only the retries.
        pipe.__class__ = _ClusterPipeline
        return pipe


class _AsyncClusterPipeline(redis.asyncio.cluster.ClusterPipeline):
    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except (redis.RedisError, RedisClusterException) as exc:
            _raise(exc)


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """`_Cluster` for ``redis.asyncio`` (a pipeline's commands that met a dead node are
    sent again through `execute_command`)."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # As `_FailoverRetry._get_command_keys`: FCALL's keys from its arguments.
        keys = _numkeys_keys(command, args[1], args[2:]) if len(args) >= 2 else None
        if keys:
            slots = {self.keyslot(key) for key in keys}
            if len(slots) != 1:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        backoff = _Backoff()
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except (redis.RedisError, RedisClusterException) as exc:
                pause = backoff.next() if _retry_outage(exc) else None
                if pause is None:
                    _raise(exc)
                await asyncio.sleep(pause)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _AsyncClusterPipeline  # type: ignore[type-abstract]
        return pipe


def cluster_options(
    url: str, *, tls: RedisTLS, ha: RedisHA, common: dict[str, Any] | None = None
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(startup nodes, client options) of a Redis Cluster whose node ``url`` names:
    the URL's node then those of ``MAAS_REDIS_CLUSTER_NODES``; the URL's user,
    password and TLS (``rediss://``) for every node; ``common`` (the timeouts of
    every client of ours, `redis._common`)."""
    parts = urlsplit(url)
    nodes = [(parts.hostname or "localhost", parts.port or 6379)]
    for seed in filter(None, (s.strip() for s in ha.cluster_nodes.split(","))):
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"MAAS_REDIS_CLUSTER_NODES: {seed!r} is not host:port")
        node = (host.strip("[]"), int(port))
        if node not in nodes:
            nodes.append(node)
    options: dict[str, Any] = dict(common or {})
    if parts.password is not None:
        options["username"] = unquote(parts.username) if parts.username else None
        options["password"] = unquote(parts.password)
    if is_tls_url(url):
        options.update(ssl=True, **tls.options())
    return nodes, options


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (`redis_client` with ``ha.cluster``)."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def by_slot(client: Any, keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` grouped by hash slot on a Redis Cluster, each group in
    the order given and the groups in the order of their first key; on one server, one
    group of them all (a batch stays one call). A script call's keys must share a slot
    on a cluster: a batch of many tenants' jobs is one call per group."""
    if not is_cluster(client):
        return [list(range(len(keys)))] if keys else []
    groups: dict[int, list[int]] = {}
    for n, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(n)
    return list(groups.values())


def _mget_spans(client: Any, keys: Sequence[str], chunk: int) -> list[list[int]]:
    spans = []
    for group in by_slot(client, keys):
        step = chunk or len(group)
        spans += [group[start : start + step] for start in range(0, len(group), step)]
    return spans


def _mget_spread(keys: Sequence[str], spans: list[list[int]], replies: list[Any]) -> list[Any]:
    values: list[Any] = [None] * len(keys)
    for span, reply in zip(spans, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        for n, value in zip(span, reply, strict=True):
            values[n] = value
    return values


def mget_many(client: Any, keys: Sequence[str], *, chunk: int = 0) -> list[Any]:
    """The values of ``keys``, in order, in one round trip: ``MGET`` (of ``chunk`` keys at
    most if given), pipelined; on a Redis Cluster, one ``MGET`` per hash slot (an
    ``MGET`` across slots is refused there)."""
    spans = _mget_spans(client, keys, chunk)
    pipe = client.pipeline(transaction=False)
    for span in spans:
        # execute_command: a cluster pipeline refuses its ``mget`` method.
        pipe.execute_command("MGET", *(keys[n] for n in span))
    return _mget_spread(keys, spans, pipe.execute() if spans else [])


async def amget_many(client: Any, keys: Sequence[str], *, chunk: int = 0) -> list[Any]:
    """`mget_many` on a ``redis.asyncio`` client."""
    spans = _mget_spans(client, keys, chunk)
    pipe = client.pipeline(transaction=False)
    for span in spans:
        pipe.execute_command("MGET", *(keys[n] for n in span))
    return _mget_spread(keys, spans, await pipe.execute() if spans else [])


def cluster_client(
    url: str, *, tls: RedisTLS, ha: RedisHA, common: dict[str, Any] | None = None
) -> redis.Redis:
    """The synchronous client of the cluster ``url`` names (see `redis.redis_client`).

    redis-py's synchronous cluster client reads the slot map as it is made: a
    cluster that cannot be reached is waited for as a call would wait (`_Backoff`),
    then `ClusterUnavailable` (or `redis.AuthenticationError`: no node took the
    credentials)."""
    nodes, options = cluster_options(url, tls=tls, ha=ha, common=common)
    backoff = _Backoff()
    while True:
        try:
            client = _Cluster(
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],  # type: ignore[no-untyped-call]
                **options,
            )
            return cast("redis.Redis", client)
        except (redis.RedisError, RedisClusterException) as exc:
            if not _is_outage(exc) and not isinstance(exc, redis.ConnectionError):
                raise
            failure = _outage(exc) if _is_outage(exc) else exc
            pause = backoff.next() if _retry_outage(failure) else None
            if pause is None:
                raise failure from exc
            time.sleep(pause)


def async_cluster_client(
    url: str, *, tls: RedisTLS, ha: RedisHA, common: dict[str, Any] | None = None
) -> redis.asyncio.Redis:
    """`cluster_client` for ``redis.asyncio`` (it connects at its first command)."""
    nodes, options = cluster_options(url, tls=tls, ha=ha, common=common)
    client = _AsyncCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in nodes], **options
    )
    return cast("redis.asyncio.Redis", client)
