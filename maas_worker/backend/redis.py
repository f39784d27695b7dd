"""The one factory of redis-py clients for our URLs (broker and result backend).

Producers, workers, monitors and the operator's tools all connect here, so a
``rediss://`` URL gets the same TLS options everywhere and no client can hang
on a server that stops answering.
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
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from maas_worker.errors import ConfigError
from maas_worker.settings import (
    RedisHA,
    RedisTLS,
    Settings,
    is_sentinel_url,
    is_tls_url,
    sentinel_hosts,
)

#: Longer than the longest blocking call (a client's 1 s BLPOP slice).
BACKEND_SOCKET_TIMEOUT_S = 10.0
#: Connections one synchronous client opens at most, on demand (redis-py's own
#: default is 100); more threads wait for one to be free (`redis_client`). Each
#: thread blocked in a result wait holds one: for many jobs, `Client.results` and
#: `Client.as_completed` wait on a few connections for all of them.
MAX_CONNECTIONS = 1024
#: A sentinel that does not answer this fast is skipped for the next one.
SENTINEL_SOCKET_TIMEOUT_S = 2.0
#: Redis Cluster: how long a command that met a dead node or a cluster that is down
#: is tried again (the slot map refreshed each time) before its connection error is
#: raised: as long as a client waits for one silent server (`BACKEND_SOCKET_TIMEOUT_S`),
#: longer than a replica takes to replace a killed primary with a short
#: ``cluster-node-timeout`` (its 15 s default makes a failover an outage for callers).
CLUSTER_FAILOVER_S = BACKEND_SOCKET_TIMEOUT_S
#: The first pause between those tries, doubled each time up to the cap (s).
CLUSTER_BACKOFF_BASE_S = 0.05
CLUSTER_BACKOFF_CAP_S = 1.0


class _ReadOnlyIsOutage:
    """A ``READONLY`` reply drops the connection and raises a connection error.

    A server on a fixed address that answers READONLY is a primary demoted
    under us (a failover behind a DNS name or a virtual IP): every later write
    there fails, so the reply is an outage to retry on a new connection, not a
    bad command (issue #17: producers got ``ReadOnlyError`` on every submit).
    redis-py's Sentinel connections do the same (`redis.sentinel`).
    """

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ReadOnlyError:
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError("READONLY: the server is a replica now") from None


class _AsyncReadOnlyIsOutage:
    """`_ReadOnlyIsOutage` for ``redis.asyncio`` connections."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ReadOnlyError:
            await self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError("READONLY: the server is a replica now") from None


class _Connection(_ReadOnlyIsOutage, redis.Connection):
    pass


class _SSLConnection(_ReadOnlyIsOutage, redis.SSLConnection):
    pass


class _UnixConnection(_ReadOnlyIsOutage, redis.UnixDomainSocketConnection):
    pass


class _AsyncConnection(_AsyncReadOnlyIsOutage, redis.asyncio.Connection):
    pass


class _AsyncSSLConnection(_AsyncReadOnlyIsOutage, redis.asyncio.SSLConnection):
    pass


class _AsyncUnixConnection(_AsyncReadOnlyIsOutage, redis.asyncio.UnixDomainSocketConnection):
    pass


def _options(url: str, tls: RedisTLS, *, asynchronous: bool) -> tuple[str, dict[str, Any]]:
    """The URL redis-py reads and the options of every client of ours (sync or async)."""
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    ssl_options = tls.options() if is_tls_url(url) else {}
    kinds: tuple[type, type, type] = (
        (_AsyncUnixConnection, _AsyncSSLConnection, _AsyncConnection)
        if asynchronous
        else (_UnixConnection, _SSLConnection, _Connection)
    )
    unix, tls_class, plain = kinds
    connection_class = unix if url.startswith("unix://") else tls_class if ssl_options else plain
    return url, {**_common(), **ssl_options, "connection_class": connection_class}


def _common() -> dict[str, Any]:
    return {
        "health_check_interval": 25,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "socket_timeout": BACKEND_SOCKET_TIMEOUT_S,
    }


def sentinel_options(
    url: str, *, tls: RedisTLS, ha: RedisHA
) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, Any]]:
    """(sentinel addresses, the sentinels' own connection options, the primary's options)
    for a ``sentinel://`` URL: what ``redis.sentinel.Sentinel`` (sync or async) takes."""
    parsed = sentinel_hosts(url)
    ssl_options: dict[str, Any] = {"ssl": True, **tls.options()} if ha.sentinel_tls else {}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S,
        **ssl_options,
    }
    if ha.sentinel_password is not None:
        sentinel_kwargs["password"] = ha.sentinel_password
    primary: dict[str, Any] = {**_common(), **ssl_options, "db": parsed.db}
    if parsed.password is not None:
        primary.update(username=parsed.username, password=parsed.password)
    return list(parsed.hosts), sentinel_kwargs, primary


def _master_name(ha: RedisHA | None) -> str:
    if ha is None or not ha.sentinel_master:
        raise ConfigError(
            "a sentinel:// URL needs MAAS_REDIS_SENTINEL_MASTER (the master name the "
            "sentinels monitor)"
        )
    return ha.sentinel_master


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
    url: str, *, tls: RedisTLS, ha: RedisHA
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(startup nodes, client options) of a Redis Cluster whose node ``url`` names:
    the URL's node then those of ``MAAS_REDIS_CLUSTER_NODES``; the URL's user,
    password and TLS (``rediss://``) for every node; our timeouts and retries."""
    parts = urlsplit(url)
    nodes = [(parts.hostname or "localhost", parts.port or 6379)]
    for seed in filter(None, (s.strip() for s in ha.cluster_nodes.split(","))):
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"MAAS_REDIS_CLUSTER_NODES: {seed!r} is not host:port")
        node = (host.strip("[]"), int(port))
        if node not in nodes:
            nodes.append(node)
    options: dict[str, Any] = _common()
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


def redis_client(url: str, *, tls: RedisTLS, ha: RedisHA | None = None) -> redis.Redis:
    """A redis-py client for one of our URLs; every client of a user URL is made here.

    ``redis+socket://`` is kombu's unix socket. A ``rediss://`` URL gets the
    TLS options of ``tls`` (certificate and host name checked by default);
    user and password come from the URL. A ``sentinel://`` URL gives a client
    of the primary its sentinels name for ``ha.sentinel_master``: after a
    failover (or a ``READONLY`` reply from a demoted primary) its next
    connection goes to the new primary. Timeouts: a dead or unreachable
    server must become an error, not a hang.

    With ``ha.cluster`` it is redis-py's `redis.cluster.RedisCluster` (typed as
    `redis.Redis`: not a subclass, but it answers the same commands; test with
    `is_cluster` where they differ): it follows ``MOVED``/``ASK``, refreshes its
    slot map and retries through a failover (`CLUSTER_FAILOVER_S`), and raises a
    connection error (`ClusterUnavailable`) when the cluster stays unavailable.
    Every command and script call must then name keys of one hash slot.
    """
    if ha is not None and ha.cluster:
        nodes, options = cluster_options(url, tls=tls, ha=ha)
        # redis-py's sync cluster client reads the slot map as it is made: a cluster
        # that cannot be reached is waited for as a call would wait (`_Backoff`).
        backoff = _Backoff()
        while True:
            try:
                cluster = _Cluster(
                    startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],  # type: ignore[no-untyped-call]
                    **options,
                )
                return cast("redis.Redis", cluster)
            except (redis.RedisError, RedisClusterException) as exc:
                if not _is_outage(exc) and not isinstance(exc, redis.ConnectionError):
                    raise
                failure = _outage(exc) if _is_outage(exc) else exc
                pause = backoff.next() if _retry_outage(failure) else None
                if pause is None:
                    raise failure from exc
                time.sleep(pause)
    if is_sentinel_url(url):
        hosts, sentinel_kwargs, primary = sentinel_options(url, tls=tls, ha=ha or RedisHA())
        name = _master_name(ha)
        sentinel: Any = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_kwargs
        )
        client: redis.Redis = sentinel.master_for(name, redis_class=redis.Redis, **primary)
        return client
    url, options = _options(url, tls, asynchronous=False)
    # redis-py's own pool refuses a 101st connection ("Too many connections"):
    # a Client shared by more threads than that (each waiting for a result
    # holds one for a 1 s slice) failed jobs it should only have delayed. This
    # one opens up to MAX_CONNECTIONS, then makes a thread wait for a free
    # connection, up to the socket timeout (then the usual ServiceUnavailable).
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=BACKEND_SOCKET_TIMEOUT_S, **options
    )
    return redis.Redis(connection_pool=pool)


def sentinel_nodes(url: str, *, tls: RedisTLS, ha: RedisHA) -> list[tuple[str, int]]:
    """(host, port) of the primary, then of each replica, that the sentinels of a
    ``sentinel://`` URL know of now (`redis.RedisError` if none names a primary)."""
    hosts, sentinel_kwargs, _ = sentinel_options(url, tls=tls, ha=ha)
    name = _master_name(ha)
    sentinel: Any = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        hosts, sentinel_kwargs=sentinel_kwargs
    )
    try:
        primary = sentinel.discover_master(name)
        return [tuple(primary), *(tuple(r) for r in sentinel.discover_slaves(name))]
    finally:
        for client in sentinel.sentinels:
            client.close()


def async_redis_client(
    url: str, *, tls: RedisTLS, ha: RedisHA | None = None
) -> redis.asyncio.Redis:
    """`redis_client` for asyncio code (``redis.asyncio``): the same URL handling and options
    (with ``ha.cluster``, `redis.asyncio.cluster.RedisCluster`, typed as `redis.asyncio.Redis`)."""
    if ha is not None and ha.cluster:
        nodes, options = cluster_options(url, tls=tls, ha=ha)
        acluster = _AsyncCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in nodes], **options
        )
        return cast("redis.asyncio.Redis", acluster)
    if is_sentinel_url(url):
        hosts, sentinel_kwargs, primary = sentinel_options(url, tls=tls, ha=ha or RedisHA())
        name = _master_name(ha)
        asentinel: Any = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_kwargs
        )
        aclient: redis.asyncio.Redis = asentinel.master_for(
            name, redis_class=redis.asyncio.Redis, **primary
        )
        return aclient
    url, options = _options(url, tls, asynchronous=True)
    return redis.asyncio.Redis.from_url(url, **options)


def backend_client(settings: Settings) -> redis.Redis:
    """A Redis client for the result backend (claims, results, audit)."""
    return redis_client(settings.result_backend, tls=settings.redis_tls, ha=settings.redis_ha)


def check_credentials(url: str, *, tls: RedisTLS, who: str, ha: RedisHA | None = None) -> None:
    """Raise `ConfigError` if the Redis at ``url`` refuses the credentials it gives (one PING).

    A wrong password or user never gets better by retrying, so a process
    checks before it starts retrying connections (Celery retries a broker it
    cannot reach a hundred times). A server that is not reachable yet is
    left to those retries (and so is a ``sentinel://`` URL none of whose sentinels
    names a primary yet).
    The message is Redis's own refusal (``WRONGPASS ...``, ``NOAUTH ...``,
    ``NOPERM ...``), never the URL.
    """
    client: redis.Redis | None = None
    try:
        # (A cluster client connects as it is made: inside the try.)
        client = redis_client(url, tls=tls, ha=ha)
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        # WRONGPASS, NOAUTH (a password is needed) or NOPERM (a user without the rights).
        default = "NOPERM" if isinstance(exc, redis.exceptions.NoPermissionError) else "AUTH"
        code = getattr(exc, "status_code", None) or default
        raise ConfigError(f"Redis refused {who}'s credentials ({code} {str(exc)[:80]})") from None
    except redis.RedisError:
        return
    finally:
        if client is not None:
            client.close()


class NotReplicated(redis.ConnectionError):
    """``WAIT`` confirmed fewer replicas than ``MAAS_REDIS_WAIT_REPLICAS`` within
    ``MAAS_REDIS_WAIT_TIMEOUT_MS``: the writes before it are on the primary only, and a
    failover now could lose them. A connection error: retried as an outage is."""


def wait_replicated(reply: Any, ha: RedisHA, what: str) -> None:
    """Raise `NotReplicated` unless ``reply`` (a ``WAIT``'s) reaches ``ha.wait_replicas``.

    ``WAIT`` counts the replicas that hold every write *its own connection*
    made before it (Redis keeps the offset per connection), so it must follow
    the writes it vouches for on the same connection: the same pipeline.
    """
    if isinstance(reply, Exception):
        raise reply
    count = int(reply)
    if count < ha.wait_replicas:
        raise NotReplicated(
            f"{what}: {count} of {ha.wait_replicas} replica(s) confirmed within "
            f"{ha.wait_timeout_ms} ms (MAAS_REDIS_WAIT_REPLICAS)"
        )
