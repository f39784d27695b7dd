"""Least-privilege Redis ACL users, one per role, written as a Redis ACL file.

``maas-worker acl`` writes ``users.acl`` from the keyring's tenants: the
``default`` user off, and one user per role (docs/operations.md, "Redis
roles"; the guarantees are in docs/security.md, "Redis roles"):

``producer-<tenant>`` (one per tenant), ``gateway`` (the HTTP gateway: a
producer of every tenant), ``worker``, ``beat``, ``monitor``, ``flower`` and
``operator``, each allowed what its process does and no
more (the ``*_rules`` functions below say what).

Rules use Redis 7 key permissions (``%R~`` read, ``%W~`` write) and
selectors (``(...)``: a command allowed only on the keys of its selector).
Commands that a library function runs are checked against the caller's
rules too, so ``+fcall`` grants nothing a user could not do itself.

Each user gets a random 256-bit password, kept in a file of its own (mode
0600) in the passwords folder; the ACL file holds only its SHA-256. Existing
password files are kept, so running it again after adding a tenant adds that
tenant's user and changes no one else's password.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import secrets
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from maas_worker.backend import keyspace
from maas_worker.broker import fetch, shards
from maas_worker.errors import ConfigError, connection_cause
from maas_worker.files import write_atomic
from maas_worker.protocol import PRIORITIES, TENANT_RE, queue_for
from maas_worker.settings import Settings, is_sentinel_url, sentinel_hosts

#: The fixed roles, in the order they are written (producers follow, by tenant).
ROLES = ("operator", "worker", "beat", "monitor", "flower")
PRODUCER_PREFIX = "producer-"
#: The HTTP gateway's user (docs/gateway.md): a producer of every tenant it serves.
GATEWAY = "gateway"
#: What every user needs to connect: redis-py's handshake (HELLO, CLIENT SETINFO on
#: Redis 7.2+, named through its category: Redis 7.0 refuses the unknown
#: subcommand), PING, SELECT, MULTI/EXEC; no key tracking (its broadcast mode
#: would report other tenants' key names) and nothing administrative.
_CONNECT = (
    "+@connection",
    "-@admin",
    "-@dangerous",
    "-client|tracking",
    "-client|caching",
    "-client|trackinginfo",
    "-client|getredir",
    "+select",
    "+multi",
    "+exec",
    "+discard",
)
_JOB_QUEUES = tuple(queue_for(p) for p in PRIORITIES)
#: Celery's remote-control (pidbox) exchange and kombu's keys around it.
_PIDBOX = "celery.pidbox"
_REPLY_KEYS = (
    "~*.reply.celery.pidbox*",
    "~_kombu.binding.reply.celery.pidbox",
    "~_kombu.binding_permanent.reply.celery.pidbox",
)


@dataclass(frozen=True)
class ShardLayout:
    """The deployment's queue shards as the roles see them (docs/security.md, "Roles
    with queue shards"): ``count`` shards (MAAS_QUEUE_SHARDS), and whether broker keys
    carry their shard's prefix (`shards.prefix`: with more than one shard, or on a
    Redis Cluster, ``cluster``). The default, one unprefixed shard, is an unsharded
    deployment."""

    count: int = 1
    sharded: bool = False
    #: On a Redis Cluster every client asks where the slots are (``CLUSTER SLOTS``).
    cluster: bool = False

    @classmethod
    def of(cls, settings: Settings) -> ShardLayout:
        """The layout of ``settings`` (MAAS_QUEUE_SHARDS, MAAS_REDIS_CLUSTER)."""
        ha = settings.redis_ha
        return cls(ha.queue_shards, ha.sharded, ha.cluster)

    @property
    def prefixes(self) -> list[str]:
        """Every shard's key prefix (``[""]`` when not sharded)."""
        return [shards.prefix(k, sharded=self.sharded) for k in range(self.count)]

    def prefix_of(self, tenant: str) -> str:
        """The key prefix of the one shard ``tenant``'s jobs go to (`shards.shard_of`)."""
        return shards.prefix(shards.shard_of(tenant, self.count), sharded=self.sharded)


#: One shard, keys unprefixed: the rules name broker keys as they are.
UNSHARDED = ShardLayout()


def _connect(layout: ShardLayout) -> tuple[str, ...]:
    """`_CONNECT`, and on a Redis Cluster ``CLUSTER SLOTS``: the shard connections and
    redis-py's cluster client ask any node where each slot is served."""
    return (*_CONNECT, "+cluster|slots") if layout.cluster else _CONNECT


def producer(tenant: str) -> str:
    """The ACL user name of ``tenant``'s producers."""
    return PRODUCER_PREFIX + tenant


def _sel(*rules: str) -> str:
    """A selector: its commands are allowed on its own keys and channels only."""
    return "(" + " ".join(rules) + ")"


def _channels(dbs: Sequence[int], prefixes: Sequence[str], *names: str) -> list[str]:
    """Channel rules for kombu's fanout topics (``<prefix>/<db>.<exchange>...``) in each
    database and shard (kombu puts its ``global_keyprefix`` before the channel names it
    publishes and subscribes to, e.g. ``{maas-q1}/0.celeryev/worker.heartbeat``).

    ``PSUBSCRIBE`` needs its pattern listed literally, so the subscribed
    patterns are rules of their own.
    """
    return [f"&{p}/{db}.{name}" for p in prefixes for db in dbs for name in names]


def _keys(prefixes: Sequence[str], *patterns: str) -> list[str]:
    """``patterns`` (key rules such as ``~x*`` or ``%R~x*``) for each shard's keys."""
    out = []
    for p in prefixes:
        for rule in patterns:
            perm, tilde, key = rule.partition("~")
            out.append(f"{perm}{tilde}{p}{key}")
    return out


def producer_rules(tenant: str, layout: ShardLayout = UNSHARDED) -> list[str]:
    """What `Client`/`Job` and ``submit``, ``status``, ``result``, ``cancel`` do for ``tenant``.

    Write its queued markers, payloads, cancel requests, public CKKS contexts, pending
    set and durability barrier (keyspace.py), pop its ``done`` lists, read its own
    keys, push to its own list of each job queue (no pop, trim, delete or read beyond their length;
    no other tenant's list, nor the queue's own), add its name to the queues'
    arrivals (`fetch.push`: nothing else on them), ring the
    wake-up list, read the catalogue (live and durable) and the node list
    (whether a worker is live), call the library (no EVAL, no FUNCTION
    LOAD); no Pub/Sub, no other tenant's key. With queue shards, the broker keys
    are those of ``tenant``'s own shard only (`ShardLayout.prefix_of`).
    """
    t = keyspace.tenant_prefix(tenant)
    p = layout.prefix_of(tenant)
    return [
        *_connect(layout),
        "+time",
        # Read its own keys (status, results, the cancel and quota scripts'
        # reads), the model catalogue and the node list.
        f"%R~{t}*",
        f"%R~{keyspace.CATALOG}",
        f"%R~{keyspace.MODELS}",
        f"%R~{keyspace.NODES}",
        "+get",
        "+mget",  # the async client reads a batch of jobs in one round trip
        "+exists",
        "+hmget",
        "+zcount",
        "+zrangebyscore",
        "+smembers",
        # Its own list of each job queue only (fair share, broker/fetch.py): the
        # length (backpressure) and push; its name to the arrivals (add only).
        _sel("+llen", *(f"%R~{p}{fetch.tenant_queue(q, tenant)}" for q in _JOB_QUEUES)),
        _sel("+lpush", *(f"%W~{p}{fetch.tenant_queue(q, tenant)}" for q in _JOB_QUEUES)),
        _sel("+sadd", *(f"%W~{p}{fetch.arrivals_key(q)}" for q in _JOB_QUEUES)),
        _sel("+lpush", "+ltrim", f"~{p}{fetch.WAKE_KEY}"),
        # Its public CKKS contexts (private inference): registered once, refreshed.
        # ... and the durability barrier on a Redis Cluster (keyspace.barrier).
        _sel(
            "+set",
            f"~{t}job:*",
            f"~{t}payload:*",
            f"~{t}cancel:*",
            f"~{t}ckks:*",
            f"~{keyspace.barrier(tenant)}",
        ),
        _sel("+ttl", f"%R~{t}ckks:*"),
        _sel("+blpop", "+rpush", "+pexpire", f"~{t}done:*"),
        _sel(
            "+zadd",
            "+zrem",
            "+zremrangebyscore",
            "+zcard",
            "+pttl",
            "+pexpire",
            f"~{keyspace.pending(tenant)}",
        ),
        # The library's functions on its own keys; what they run is checked
        # against the rules above (the in-flight set and bucket: read only).
        _sel("+fcall", f"~{t}*"),
    ]


def gateway_rules(tenants: Sequence[str], layout: ShardLayout = UNSHARDED) -> list[str]:
    """What ``maas-worker gateway`` does: what each tenant's producer does, for every
    tenant, plus its idempotency records (``SET NX GET``, ``DEL`` on
    ``maas:{<tenant>}:gateway:*``), ``MGET`` of a tenant's keys (its waiter), and
    appending to the audit stream. Nothing a producer may not do beyond that (with
    queue shards: each tenant's lists on that tenant's shard)."""
    connect = _connect(layout)
    rules = list(connect)
    for tenant in tenants:
        t = keyspace.tenant_prefix(tenant)
        rules += [r for r in producer_rules(tenant, layout) if r not in connect]
        rules += [_sel("+mget", f"%R~{t}*"), _sel("+set", "+del", f"~{t}gateway:*")]
    rules.append(_sel("+xadd", f"%W~{keyspace.AUDIT_STREAM}"))
    return list(dict.fromkeys(rules))  # one copy of the rules every tenant shares


def worker_rules(dbs: Sequence[int], layout: ShardLayout = UNSHARDED) -> list[str]:
    """What ``maas-worker worker`` (and its consumers, advertiser, samples) may do.

    With queue shards: every shard's broker keys and channels. One role serves the
    deployment's every node, whichever shards it consumes (``--shards`` is a node's
    choice, not a permission).
    """
    broker = _keys(
        layout.prefixes,
        "~maas:*",
        "~maas.*",
        f"~{fetch.UNACKED_KEY}",
        f"~{fetch.UNACKED_INDEX_KEY}",
        "~unacked_mutex",
        "~_kombu.binding.*",
        "~_kombu.binding_permanent.*",
        "~_kombu.binding_deadlines",
        f"~*.{_PIDBOX}*",
        "~celeryev.*",
    )
    channels = _channels(
        dbs,
        layout.prefixes,
        _PIDBOX,
        "celeryev/*",
        "celeryev/worker.*",
        "maas.monitor/maas.monitor",
    )
    # The result store's keys (maas:...) first, unprefixed; one copy when not sharded.
    return [
        *dict.fromkeys(["~maas:*", *broker]),
        *channels,
        "+@all",
        "-@admin",
        "-@dangerous",
        # Nothing that drops or kills other clients' scripts and functions.
        "-script|flush",
        "-script|kill",
        "-function|flush",
        "-function|delete",
        "-function|restore",
        "-function|kill",
    ]


def beat_rules(dbs: Sequence[int], layout: ShardLayout = UNSHARDED) -> list[str]:
    """What ``maas-worker beat`` may do: publish the sample request (it sends no task
    event), on every shard."""
    return [
        *_connect(layout),
        "+publish",
        *_channels(dbs, layout.prefixes, "maas.monitor/maas.monitor"),
    ]


def monitor_rules(layout: ShardLayout = UNSHARDED) -> list[str]:
    """Read-only: the fleet exporter, ``stats``, ``scale``, a KEDA list scaler (every shard)."""
    return [
        *_connect(layout),
        *_keys(
            layout.prefixes,
            *(f"%R~{q}*" for q in _JOB_QUEUES),  # their own lists and the tenants'
            f"%R~{fetch.RING_PREFIX}*",
            f"%R~{fetch.ARRIVALS_PREFIX}*",
            f"%R~{fetch.WAKE_KEY}",  # a KEDA list scaler's wake from zero (operations.md)
        ),
        f"%R~{keyspace.NODES}",
        f"%R~{keyspace.SAMPLES}",
        f"%R~{keyspace.PREFIX}sample:*",
        f"%R~{keyspace.CATALOG}",
        "+llen",
        "+lindex",
        "+lrange",
        "+smembers",
        "+fcall_ro",
        "+get",
        "+mget",
        "+exists",
        "+zrange",
        "+zrangebyscore",
        "+zcard",
        "+zcount",
        "+zscore",
    ]


def flower_rules(dbs: Sequence[int], layout: ShardLayout = UNSHARDED) -> list[str]:
    """Flower: events, queue lengths, and inspect commands with a reply queue (on every
    shard: Flower follows the first shard of its MAAS_WORKER_SHARDS, which may be any)."""
    ps = layout.prefixes
    return [
        *_connect(layout),
        "+psubscribe",
        "+punsubscribe",
        *_channels(dbs, ps, "celeryev/*"),
        *_keys(ps, "%R~maas.*"),
        "+llen",
        # The tenants with work (the Broker page counts their lists), never a message.
        _sel("+lrange", *_keys(ps, f"%R~{fetch.RING_PREFIX}*")),
        _sel("+smembers", *_keys(ps, f"%R~{fetch.ARRIVALS_PREFIX}*")),
        _sel("+publish", *_channels(dbs, ps, _PIDBOX)),
        _sel(
            "+sadd",
            "+srem",
            "+smembers",
            "+llen",
            "+rpop",
            "+brpop",
            "+del",
            "+exists",
            *_keys(
                ps,
                *_REPLY_KEYS,
                "~celeryev.*",
                "~_kombu.binding.celeryev",
                "~_kombu.binding_permanent.celeryev",
            ),
        ),
    ]


def operator_rules() -> list[str]:
    """The administrator: every key and channel; no dangerous command but ACL LOAD."""
    return [
        "~*",
        "&*",
        "+@all",
        "-@admin",
        "-@dangerous",
        "+acl|load",
        "+acl|log",
        "+acl|whoami",
        "+info",
    ]


def role_rules(
    role: str,
    *,
    dbs: Sequence[int] = (0,),
    tenants: Sequence[str] = (),
    layout: ShardLayout = UNSHARDED,
) -> list[str]:
    """The rules of ``role`` (a fixed role, ``gateway`` serving ``tenants``, or
    ``producer-<tenant>``) in a deployment with the queue shards of ``layout``."""
    if role == GATEWAY:
        return gateway_rules(tenants, layout)
    if role.startswith(PRODUCER_PREFIX):
        return producer_rules(role[len(PRODUCER_PREFIX) :], layout)
    if role in ("worker", "beat", "flower"):
        per_db = {"worker": worker_rules, "beat": beat_rules, "flower": flower_rules}[role]
        return per_db(dbs, layout)
    if role in ("operator", "monitor"):
        return operator_rules() if role == "operator" else monitor_rules(layout)
    raise ConfigError(f"unknown role {role!r}")


def password_digest(password: str) -> str:
    """SHA-256 of a password, as Redis ACL files hold it (``#<hex>``)."""
    return hashlib.sha256(password.encode()).hexdigest()


#: The ``default`` user: off (no connection is ever logged in as it, and it has no
#: password to log in with), yet allowed every command. The server replays its
#: append-only file as ``default`` and re-checks each MULTI/EXEC against that
#: user's rules: with none (``reset off`` alone), every transaction in the file
#: (a producer's submit, a worker's claim) is dropped silently on a restart, and
#: queued jobs vanish (valkey-io/valkey#3983, redis/redis#14541; seen with
#: Redis 7.0 by `make compose-test`).
DEFAULT_USER = "user default reset off ~* &* +@all"


def acl_text(
    passwords: dict[str, str], *, dbs: Sequence[int] = (0,), layout: ShardLayout = UNSHARDED
) -> str:
    """The ACL file for ``passwords`` (role -> password): ``default`` off, then each role."""
    lines = [DEFAULT_USER]
    tenants = sorted(r[len(PRODUCER_PREFIX) :] for r in passwords if r.startswith(PRODUCER_PREFIX))

    # Fixed roles first, in `ROLES` order, then producers by tenant, then the gateway
    # (its line names every tenant: last, so a new tenant changes no line before it).
    def rank(r: str) -> tuple[int, str]:
        return (ROLES.index(r) if r in ROLES else 100 if r == GATEWAY else 99, r)

    for role in sorted(passwords, key=rank):
        rules = " ".join(role_rules(role, dbs=dbs, tenants=tenants, layout=layout))
        lines.append(f"user {role} reset on #{password_digest(passwords[role])} {rules}")
    return "\n".join(lines) + "\n"


def roles_for(tenants: Iterable[str]) -> list[str]:
    """Every role of a deployment whose keyring holds ``tenants``."""
    for t in tenants:
        if not TENANT_RE.fullmatch(t):
            raise ConfigError(f"invalid tenant name {t!r}")
    producers = [producer(t) for t in sorted(tenants)]
    return [*ROLES, *producers, *([GATEWAY] if producers else [])]


# -- files ---------------------------------------------------------------------------------
def write_private(path: Path, data: str) -> None:
    """Write ``path`` atomically (`files.write_atomic`), mode 0600; `ConfigError` if it cannot."""
    try:
        write_atomic(path, data.encode(), private=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def _read_password(path: Path) -> str:
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"password file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
            )
        password = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from None
    if len(password) < 32 or any(c.isspace() for c in password):
        raise ConfigError(
            f"password file {path} holds no usable password (at least 32 "
            "characters, no spaces); delete it to get a new one"
        )
    return password


def ensure_passwords(folder: Path, roles: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Each role's password, read from ``folder/<role>`` or made (and written, 0600).

    Returns (role -> password, the roles whose password was made now).
    """
    passwords: dict[str, str] = {}
    made: list[str] = []
    for role in roles:
        path = folder / role
        if path.exists():
            passwords[role] = _read_password(path)
            continue
        passwords[role] = secrets.token_hex(32)  # 256 bits
        write_private(path, passwords[role] + "\n")
        made.append(role)
    return passwords, made


@dataclass(frozen=True)
class Written:
    """What `generate` did."""

    acl_file: Path
    passwords_dir: Path
    roles: list[str]
    #: Roles whose password was created by this run (the others were kept).
    new: list[str]
    changed: bool


def generate(
    tenants: Iterable[str],
    *,
    acl_file: Path,
    passwords_dir: Path,
    dbs: Sequence[int] = (0,),
    layout: ShardLayout = UNSHARDED,
) -> Written:
    """Write the ACL file and any missing password file for ``tenants``' deployment
    (with the queue shards of ``layout``: `ShardLayout.of` its settings)."""
    roles = roles_for(tenants)
    passwords, new = ensure_passwords(passwords_dir, roles)
    text = acl_text(passwords, dbs=dbs, layout=layout)
    try:
        unchanged = acl_file.read_text() == text
    except OSError:
        unchanged = False
    if not unchanged:
        write_private(acl_file, text)
    return Written(acl_file, passwords_dir, roles, new, not unchanged)


# -- URLs ----------------------------------------------------------------------------------
def server_url(url: str) -> str:
    """``url`` without its user and password (the server each role's URL points at);
    each part of a ``sentinel://...;sentinel://...`` URL."""
    if ";" in url:
        return ";".join(server_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def database(url: str) -> int:
    """The database number of a Redis URL (0 when it names none)."""
    if is_sentinel_url(url):
        return sentinel_hosts(url, name=server_url(url)).db
    path = urlsplit(url).path.strip("/")
    if not path:
        return 0
    if not path.isdigit():
        raise ConfigError(f"cannot tell the database number of {server_url(url)}")
    return int(path)


def role_url(server: str, role: str, password: str | None) -> str:
    """The URL ``role`` connects with; ``****`` in place of the password if it is None.

    For a ``sentinel://`` URL the user and password go on every part (kombu reads them
    from the sentinel it connects through); they are the data nodes' user, not the
    sentinels'.
    """
    if ";" in server:
        return ";".join(role_url(part, role, password) for part in server.split(";"))
    parts = urlsplit(server_url(server))
    secret = "****" if password is None else quote(password, safe="")
    netloc = f"{quote(role, safe='')}:{secret}@{parts.netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


# -- the command -----------------------------------------------------------------------------
def data_nodes(server: str, settings: Settings) -> list[str]:
    """The URL (no user) of each Redis server ``server`` stands for: itself, or, for a
    ``sentinel://`` URL, the primary and every replica its sentinels know of.

    ACL changes are not replicated (each server reads its own ACL file), so the
    ACL is loaded on every data node: a replica promoted by a failover must
    know the same users.
    """
    if not is_sentinel_url(server):
        return [server_url(server)]
    from maas_worker.backend.redis import sentinel_nodes

    name = settings.redis_ha.sentinel_master
    try:
        nodes = sentinel_nodes(server, tls=settings.redis_tls, ha=settings.redis_ha)
    except redis.RedisError as exc:
        raise ConfigError(
            f"the sentinels of {server_url(server)} name no primary for {name!r}: "
            f"{connection_cause(exc)}"
        ) from None
    scheme = "rediss" if settings.redis_ha.sentinel_tls else "redis"
    db = database(server)
    return [f"{scheme}://{host}:{port}/{db}" for host, port in nodes]


def cluster_data_nodes(url: str, settings: Settings) -> list[str]:
    """The URL (no user) of every node, primaries and replicas, of the Redis Cluster that
    ``url`` (a node of it, with the operator's user and password) belongs to.

    As with Sentinel, ACL changes are not replicated, and on a cluster not shared
    either: every node reads its own file, and a replica promoted by a failover
    must know the same users.
    """
    from maas_worker.backend.redis import redis_client

    scheme = urlsplit(url).scheme
    try:
        client: Any = redis_client(url, tls=settings.redis_tls, ha=settings.redis_ha)
        with contextlib.closing(client):
            nodes = [(n.host, n.port) for n in client.get_nodes()]
    except redis.RedisError as exc:
        raise ConfigError(
            f"cannot list the nodes of the Redis Cluster at {server_url(url)}: "
            f"{connection_cause(exc)}"
        ) from None
    return [f"{scheme}://{host}:{port}/0" for host, port in sorted(set(nodes))]


def apply(server: str, password: str, roles: dict[str, str], settings: Settings) -> None:
    """As the operator: ``ACL LOAD`` on ``server`` (on every data node of a ``sentinel://``
    URL: `data_nodes`; of a Redis Cluster: `cluster_data_nodes`), check every role's
    password there, load the function library (on the primary, on a cluster on every
    primary; replicas receive it). Raises `ConfigError` with one line if any
    step fails."""
    from maas_worker.backend import functions
    from maas_worker.backend.redis import redis_client

    url = role_url(server, "operator", password)
    nodes = (
        cluster_data_nodes(url, settings)
        if settings.redis_ha.cluster
        else data_nodes(server, settings)
    )
    for node in nodes:
        _load_acl(node, password, roles, settings)
    try:
        client: Any = redis_client(url, tls=settings.redis_tls, ha=settings.redis_ha)
        with contextlib.closing(client):
            functions.load(client)
    except redis.RedisError as exc:
        raise ConfigError(
            f"cannot load the function library on {server_url(server)} as the operator: "
            f"{connection_cause(exc)}"
        ) from None


def _load_acl(node: str, password: str, roles: dict[str, str], settings: Settings) -> None:
    """``ACL LOAD`` on one server, then check that it knows every role's password."""
    from maas_worker.backend.redis import redis_client

    url = role_url(node, "operator", password)
    where = server_url(node)
    try:
        loader: Any = redis_client(url, tls=settings.redis_tls)
        # Redis 7.0 then drops every connection (Valkey keeps those whose user
        # is unchanged): clients reconnect, and so do we.
        with contextlib.closing(loader), contextlib.suppress(redis.ConnectionError):
            loader.execute_command("ACL", "LOAD")
        client: Any = redis_client(url, tls=settings.redis_tls)
        # The server read ITS file: make sure it is the one just written.
        with contextlib.closing(client):
            for role, secret in roles.items():
                try:
                    client.execute_command("AUTH", role, secret)
                except redis.AuthenticationError:
                    raise ConfigError(
                        f"{where} reloaded an ACL file without user {role} (or with another "
                        "password): is --acl-file the file the server was started with "
                        "(--aclfile)? With Sentinel, every data node needs the same file"
                    ) from None
    except redis.RedisError as exc:
        raise ConfigError(
            f"cannot apply the ACL on {where} as the operator: {connection_cause(exc)}"
        ) from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``maas-worker acl``: write the files, print each role's URL, optionally apply."""
    from maas_worker.backend import functions
    from maas_worker.backend.redis import redis_client
    from maas_worker.tenancy.keyring import load_keyring

    if args.load_functions:
        client = redis_client(settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha)
        try:
            functions.load(client)
        finally:
            client.close()
        print(
            f"loaded the function libraries {', '.join(functions.VERSIONS)} on "
            f"{server_url(settings.broker_url)}",
            file=sys.stderr,
        )
        return 0
    server = args.server or settings.broker_url
    known = set(load_keyring(settings.keyring_path).tenants)
    tenants = args.tenant or sorted(known)
    unknown = sorted(set(tenants) - known)
    if unknown:
        raise ConfigError(
            f"unknown tenant {unknown[0]!r} (the keyring "
            f"{settings.keyring_path} has: {', '.join(sorted(known)) or 'none'})"
        )
    dbs = sorted(set(args.db or [database(server)]))
    done = generate(
        tenants,
        acl_file=Path(args.acl_file),
        passwords_dir=Path(args.passwords),
        dbs=dbs,
        layout=ShardLayout.of(settings),
    )
    passwords, _ = ensure_passwords(done.passwords_dir, done.roles)
    print(
        f"{'wrote' if done.changed else 'kept (unchanged)'} {done.acl_file}: "
        f"{len(done.roles)} users, default off; passwords in {done.passwords_dir}/<user> "
        f"(mode 0600; new: {', '.join(done.new) or 'none'})",
        file=sys.stderr,
    )
    for role in done.roles:
        print(f"{role:<24} {role_url(server, role, passwords[role] if args.urls else None)}")
    if args.apply:
        apply(server, passwords["operator"], passwords, settings)
        nodes = ", ".join(data_nodes(server, settings))
        print(f"applied on {nodes}: ACL LOAD, function library loaded", file=sys.stderr)
    return 0
