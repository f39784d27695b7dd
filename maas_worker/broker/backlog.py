"""The real backlog: how many jobs wait in each priority queue, and for how long.

Read straight from the broker's lists (``LLEN``), not from what a worker has
reserved, so it counts what no worker has taken yet. A priority's jobs sit in
one list per tenant (fair share, fetch.py) plus the queue's own list (jobs from
before an upgrade): the tenants are those of the priority's ring and arrivals,
so a read costs two round trips and a command or two per tenant with work. The oldest job is the
tail of each list (kombu ``LPUSH``-es, workers pop from the right); its age comes from
the issued-at time in its envelope header, read WITHOUT verifying anything:
a forged message can only make the backlog look older, which an attacker who
can write Redis achieves anyway by flooding it. Only a prefix of the message
is fetched (a Lua ``string.sub``, run as the read-only library function
`functions.TAIL_PREFIX`), so a 1 MiB job costs a few KiB per read.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from maas_worker.backend import functions
from maas_worker.backend.redis import redis_client
from maas_worker.broker import fetch, shards
from maas_worker.crypto.envelope import TYPE_REQUEST, VERSION
from maas_worker.protocol import PRIORITIES, TENANT_RE, queue_for
from maas_worker.settings import Settings

#: Enough of a message to reach the envelope's fixed header through two layers
#: of base64 (kombu's body encoding, then the envelope argument itself).
_PREFIX_CHARS = 512
#: version:u8 type:u8 header_len:u16 key_version:u32 issued_at_ms:u64 (docs/envelope.md).
_FIXED_PREFIX = struct.Struct(">BBHIQ")
_BODY_RE = re.compile(r'"body"\s*:\s*"([A-Za-z0-9+/=]*)')
_ARG_RE = re.compile(r'^\[\s*\[\s*"([A-Za-z0-9+/=]*)')
#: An issued-at further in the future than this is not a clock difference but junk.
_MAX_FUTURE_S = 300.0


@dataclass(frozen=True)
class Backlog:
    """Queued jobs per priority and the age (seconds) of the oldest of each, in all and
    per tenant (priority -> tenant -> ...; only tenants with jobs queued)."""

    depth: Mapping[str, int]
    oldest_age_s: Mapping[str, float | None]
    tenant_depth: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    tenant_oldest_age_s: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)

    def by_tenant(self) -> dict[str, int]:
        """Jobs waiting per tenant, all priorities together."""
        out: dict[str, int] = {}
        for per in self.tenant_depth.values():
            for tenant, n in per.items():
                out[tenant] = out.get(tenant, 0) + n
        return out

    @property
    def total(self) -> int:
        """Jobs waiting in all priorities together."""
        return sum(self.depth.values())

    @property
    def oldest_s(self) -> float | None:
        """Age of the oldest waiting job of any priority (None if unknown or empty)."""
        ages = [a for a in self.oldest_age_s.values() if a is not None]
        return max(ages) if ages else None

    def to_json(self) -> dict[str, Any]:
        """``{"depth": {...}, "oldest_age_s": {...}, "total": n, "tenants": {priority:
        {tenant: {"depth": n, "oldest_age_s": s}}}}``."""
        return {
            "depth": dict(self.depth),
            "oldest_age_s": dict(self.oldest_age_s),
            "total": self.total,
            "tenants": {
                p: {
                    t: {"depth": n, "oldest_age_s": self.tenant_oldest_age_s.get(p, {}).get(t)}
                    for t, n in per.items()
                }
                for p, per in self.tenant_depth.items()
            },
        }


@dataclass(frozen=True)
class ShardBrokers:
    """The broker of every queue shard: ``(client, key prefix)`` each (shards.py).
    `read_backlog` sums over them."""

    shards: tuple[tuple[redis.Redis, str], ...]

    def close(self) -> None:
        """Close every shard's client."""
        for client, _ in self.shards:
            client.close()


def broker_client(settings: Settings) -> redis.Redis | ShardBrokers:
    """What `read_backlog` reads: a Redis client of the broker, or with queue shards
    (MAAS_QUEUE_SHARDS, a Redis Cluster) a client of each shard (`ShardBrokers`)."""
    if settings.redis_ha.sharded:
        return ShardBrokers(
            tuple(
                (shards.broker_client(settings, k), shards.key_prefix(settings, k))
                for k in shards.all_shards(settings)
            )
        )
    # The one factory (backend.redis): rediss:// gets MAAS_REDIS_TLS_*.
    return redis_client(settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha)


def _unverified_issued_at_ms(message_prefix: bytes) -> int | None:
    """The issued-at of the envelope inside a kombu message prefix; unverified.

    Returns None for anything that does not look like a request envelope.
    """
    try:
        text = message_prefix.decode("utf-8", "replace")
        body = _BODY_RE.search(text)
        if body is None:
            return None
        b64 = body.group(1)
        celery_body = base64.b64decode(b64[: len(b64) // 4 * 4]).decode("utf-8", "replace")
        arg = _ARG_RE.match(celery_body)
        if arg is None:
            return None
        env_b64 = arg.group(1)
        raw = base64.b64decode(env_b64[: len(env_b64) // 4 * 4])
        version, type_, _, _, issued_at_ms = _FIXED_PREFIX.unpack_from(raw, 0)
    except (binascii.Error, ValueError, struct.error):
        return None
    if version != VERSION or type_ != TYPE_REQUEST:
        return None
    return int(issued_at_ms)


def _age(tail: Any, now: float) -> float | None:
    issued = _unverified_issued_at_ms(tail) if isinstance(tail, bytes) else None
    age = None if issued is None else now - issued / 1000
    return None if age is None or age < -_MAX_FUTURE_S else max(0.0, age)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def tenants_named(ring: Iterable[Any], arrivals: Iterable[Any]) -> list[str]:
    """The tenants with work in a job queue, from its ring and arrivals (replies of
    ``LRANGE`` and ``SMEMBERS``), sorted. Whoever can push wrote the arrivals: names
    only, checked."""
    named = {_text(t) for t in [*ring, *arrivals]}
    return sorted(t for t in named if TENANT_RE.fullmatch(t))


def read_backlog(broker: Any, *, now: float | None = None) -> Backlog:
    """Queue lengths and oldest-job ages of every priority and tenant, in two round trips
    (per shard: ``broker`` a `ShardBrokers` sums the shards' backlogs)."""
    now = time.time() if now is None else now
    if isinstance(broker, ShardBrokers):
        return merge([read_shard_backlog(c, prefix, now=now) for c, prefix in broker.shards])
    return read_shard_backlog(broker, "", now=now)


def merge(backlogs: Iterable[Backlog]) -> Backlog:
    """The backlogs of several queue shards as one: depths summed, the oldest age kept
    (a tenant's jobs are in one shard, but a tenant placed by an older N may be in two)."""
    depth: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
    ages: dict[str, float | None] = dict.fromkeys(PRIORITIES, None)
    tenant_depth: dict[str, dict[str, int]] = {p: {} for p in PRIORITIES}
    tenant_ages: dict[str, dict[str, float | None]] = {p: {} for p in PRIORITIES}

    def older(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else max(a, b)

    for b in backlogs:
        for p in PRIORITIES:
            depth[p] += b.depth.get(p, 0)
            ages[p] = older(ages[p], b.oldest_age_s.get(p))
            for t, n in b.tenant_depth.get(p, {}).items():
                tenant_depth[p][t] = tenant_depth[p].get(t, 0) + n
                age = b.tenant_oldest_age_s.get(p, {}).get(t)
                tenant_ages[p][t] = older(tenant_ages[p].get(t), age)
    return Backlog(depth, ages, tenant_depth, tenant_ages)


def read_shard_backlog(broker: redis.Redis, prefix: str, *, now: float) -> Backlog:
    """`read_backlog` of one queue shard (its keys under ``prefix``)."""

    def build(pipe: Any) -> None:
        for priority in PRIORITIES:
            q = queue_for(priority)
            pipe.llen(prefix + q)
            pipe.fcall_ro(functions.TAIL_PREFIX, 1, prefix + q, _PREFIX_CHARS)
            pipe.lrange(prefix + fetch.ring_key(q), 0, -1)
            pipe.smembers(prefix + fetch.arrivals_key(q))

    replies = functions.execute(broker, build)
    depth: dict[str, int] = {}
    ages: dict[str, float | None] = {}
    tenants: dict[str, list[str]] = {}
    for i, priority in enumerate(PRIORITIES):
        depth[priority] = int(replies[4 * i])
        ages[priority] = _age(replies[4 * i + 1], now)
        tenants[priority] = tenants_named(replies[4 * i + 2], replies[4 * i + 3])

    def build_tenants(pipe: Any) -> None:
        for priority in PRIORITIES:
            for t in tenants[priority]:
                key = prefix + fetch.tenant_queue(queue_for(priority), t)
                pipe.llen(key)
                pipe.fcall_ro(functions.TAIL_PREFIX, 1, key, _PREFIX_CHARS)

    more = functions.execute(broker, build_tenants) if any(tenants.values()) else []
    tenant_depth: dict[str, dict[str, int]] = {}
    tenant_ages: dict[str, dict[str, float | None]] = {}
    k = 0
    for priority in PRIORITIES:
        per: dict[str, int] = {}
        per_age: dict[str, float | None] = {}
        for t in tenants[priority]:
            n, age = int(more[k]), _age(more[k + 1], now)
            k += 2
            if n:
                per[t], per_age[t] = n, age
                depth[priority] += n
                if age is not None and (ages[priority] is None or age > (ages[priority] or 0)):
                    ages[priority] = age
        tenant_depth[priority], tenant_ages[priority] = per, per_age
    return Backlog(depth, ages, tenant_depth, tenant_ages)


def empty_backlog() -> Backlog:
    """No job waiting anywhere."""
    return Backlog(dict.fromkeys(PRIORITIES, 0), dict.fromkeys(PRIORITIES, None))
