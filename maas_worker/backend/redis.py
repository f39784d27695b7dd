"""The one factory of redis-py clients for our URLs (broker and result backend).

Producers, workers, monitors and the operator's tools all connect here, so a
``rediss://`` URL gets the same TLS options everywhere and no client can hang
on a server that stops answering.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

from maas_worker.errors import ConfigError
from maas_worker.settings import RedisTLS, Settings, is_tls_url

#: Longer than the longest blocking call (a client's 1 s BLPOP slice).
BACKEND_SOCKET_TIMEOUT_S = 10.0


def _options(url: str, tls: RedisTLS) -> tuple[str, dict[str, Any]]:
    """The URL redis-py reads and the options of every client of ours (sync or async)."""
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    ssl_options = tls.options() if is_tls_url(url) else {}
    return url, {
        "health_check_interval": 25,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "socket_timeout": BACKEND_SOCKET_TIMEOUT_S,
        **ssl_options,
    }


def redis_client(url: str, *, tls: RedisTLS) -> redis.Redis:
    """A redis-py client for one of our URLs; every client of a user URL is made here.

    ``redis+socket://`` is kombu's unix socket. A ``rediss://`` URL gets the
    TLS options of ``tls`` (certificate and host name checked by default);
    user and password come from the URL. Timeouts: a dead or unreachable
    server must become an error, not a hang.
    """
    url, options = _options(url, tls)
    return redis.Redis.from_url(url, **options)


def async_redis_client(url: str, *, tls: RedisTLS) -> redis.asyncio.Redis:
    """`redis_client` for asyncio code (``redis.asyncio``): the same URL handling and options."""
    url, options = _options(url, tls)
    return redis.asyncio.Redis.from_url(url, **options)


def backend_client(settings: Settings) -> redis.Redis:
    """A Redis client for the result backend (claims, results, audit)."""
    return redis_client(settings.result_backend, tls=settings.redis_tls)


def check_credentials(url: str, *, tls: RedisTLS, who: str) -> None:
    """Raise `ConfigError` if the Redis at ``url`` refuses the credentials it gives (one PING).

    A wrong password or user never gets better by retrying, so a process
    checks before it starts retrying connections (Celery retries a broker it
    cannot reach a hundred times). A server that is not reachable yet is
    left to those retries; ``sentinel://`` URLs are resolved by kombu, not here.
    The message is Redis's own refusal (``WRONGPASS ...``, ``NOAUTH ...``,
    ``NOPERM ...``), never the URL.
    """
    if url.startswith("sentinel://"):
        return
    client = redis_client(url, tls=tls)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        # WRONGPASS, NOAUTH (a password is needed) or NOPERM (a user without the rights).
        default = "NOPERM" if isinstance(exc, redis.exceptions.NoPermissionError) else "AUTH"
        code = getattr(exc, "status_code", None) or default
        raise ConfigError(f"Redis refused {who}'s credentials ({code} {str(exc)[:80]})") from None
    except redis.RedisError:
        return
    finally:
        client.close()
