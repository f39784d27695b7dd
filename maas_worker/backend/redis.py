"""The one factory of redis-py clients for our URLs (broker and result backend).

Producers, workers, monitors and the operator's tools all connect here, so a
``rediss://`` URL gets the same TLS options everywhere and no client can hang
on a server that stops answering.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.utils import HIREDIS_AVAILABLE

from maas_worker.backend import cluster, resp
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


def _packs_utf8(encoder: Any) -> bool:
    """True where `resp.pack` frames what this connection's encoder would (the default)."""
    return bool(encoder.encoding in ("utf-8", "utf8") and encoder.encoding_errors == "strict")


class _FastPacking:
    """Commands packed by `resp.pack` (redis-py's C packer, hiredis, where installed)."""

    def _construct_command_packer(self, packer: Any) -> Any:
        chosen = super()._construct_command_packer(packer)  # type: ignore[misc]
        if packer is None and not HIREDIS_AVAILABLE and _packs_utf8(self.encoder):  # type: ignore[attr-defined]
            return resp.Packer(chosen)
        return chosen


class _AsyncFastPacking:
    """`_FastPacking` for ``redis.asyncio`` connections (which pack by a method)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _packs_utf8(self.encoder):  # type: ignore[attr-defined]
            return resp.pack(args, super().pack_command)  # type: ignore[misc]
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]


class _Connection(_FastPacking, _ReadOnlyIsOutage, redis.Connection):
    pass


class _SSLConnection(_FastPacking, _ReadOnlyIsOutage, redis.SSLConnection):
    pass


class _UnixConnection(_FastPacking, _ReadOnlyIsOutage, redis.UnixDomainSocketConnection):
    pass


class _AsyncConnection(_AsyncFastPacking, _AsyncReadOnlyIsOutage, redis.asyncio.Connection):
    pass


class _AsyncSSLConnection(_AsyncFastPacking, _AsyncReadOnlyIsOutage, redis.asyncio.SSLConnection):
    pass


class _AsyncUnixConnection(
    _AsyncFastPacking, _AsyncReadOnlyIsOutage, redis.asyncio.UnixDomainSocketConnection
):
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
    `cluster.is_cluster` where they differ): it follows ``MOVED``/``ASK``, refreshes its
    slot map and retries through a failover (`cluster.CLUSTER_FAILOVER_S`), and raises
    a connection error (`cluster.ClusterUnavailable`) when the cluster stays unavailable.
    Every command and script call must then name keys of one hash slot (`cluster.by_slot`).
    """
    if ha is not None and ha.cluster:
        return cluster.cluster_client(url, tls=tls, ha=ha, common=_common())
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
        return cluster.async_cluster_client(url, tls=tls, ha=ha, common=_common())
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
    aclient = redis.asyncio.Redis.from_url(url, **options)
    # redis.asyncio's from_url puts the class of the URL's scheme (SSLConnection for
    # rediss://, the Unix one for unix://) over the one given (the sync one keeps it).
    aclient.connection_pool.connection_class = options["connection_class"]
    return aclient


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
