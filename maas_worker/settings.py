"""Settings: one frozen value holding every ``MAAS_*`` variable.

Each field is declared once, with its variable, parser, bounds and doc
(`options.Option`, in the field's metadata); docs/configuration.md's table is
generated from those declarations (``scripts/settings_docs.py``).

Invariants: a `Settings` is built once per process, at an entry point, by
`Settings.from_env`, never at import, and passed down; every value is checked
on the type, so ``Settings(...)``, `dataclasses.replace` and ``from_env``
overrides are validated alike, an invalid value raising `ConfigError` with
one line naming its variable; secrets (URLs, Flower credentials) stay out of
``repr``.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from maas_worker.errors import ConfigError
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.options import (
    Option,
    are_paths,
    declared,
    group,
    int_in,
    is_bool,
    is_number,
    is_optional_str,
    is_path,
    is_str,
    mapping_of,
    number_in,
    one_of,
    pairs,
    parse_flag,
    parse_float,
    parse_int,
    parse_lower,
    parse_path,
    parse_paths,
    parse_text,
    read,
    require,
    setting,
    validate,
)
from maas_worker.protocol import PRIORITIES

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT_S = 600
#: Values of MAAS_REMOTE_CONTROL; the first is the default.
REMOTE_CONTROL_MODES = ("inspect", "operator")
DEFAULT_REMOTE_CONTROL = REMOTE_CONTROL_MODES[0]
DEFAULT_JOB_TTL_S = 3600
DEFAULT_RESULT_TTL_S = 3600
DEFAULT_MAX_INPUT_BYTES = 1024 * 1024
DEFAULT_MAX_RESULT_BYTES = 4 * 1024 * 1024
DEFAULT_PRIVATE_CONTEXT_TTL_S = 7 * 24 * 3600
DEFAULT_PRIVATE_MAX_CONTEXT_BYTES = 64 * 1024 * 1024
DEFAULT_PRIVATE_CONTEXT_CACHE = 4
DEFAULT_CLOCK_SKEW_S = 30
#: A claim holder is presumed dead when its liveness key is this old.
DEFAULT_LEASE_S = 15
DEFAULT_AUDIT_MAXLEN = 10_000
#: Per-job time limits unless the model or MAAS_TIME_LIMITS says otherwise.
DEFAULT_SOFT_TIME_LIMIT_S = 300.0
DEFAULT_HARD_TIME_LIMIT_S = 330.0
DEFAULT_MAX_QUEUE_DEPTH = 10_000
#: A worker does not start a job while host memory use is above this.
DEFAULT_MEMORY_HIGH_WATER_PCT = 90.0
#: A pool child is replaced after a job leaves it above this resident size.
DEFAULT_MAX_MEMORY_PER_CHILD_MB = 2048
#: Share of fetches guaranteed to normal and to low jobs while they wait.
DEFAULT_LOW_PRIORITY_SHARE = 0.05
#: Values of MAAS_WORKER_MODE, named like the ``maas-worker worker`` flags that
#: choose them; the first is the default: batch consumer processes take the
#: job queues (docs/operations.md, "The batch consumer"), or one Celery task
#: per job in Celery's pool.
WORKER_MODES = ("batch-consumer", "celery-tasks")
DEFAULT_WORKER_MODE = WORKER_MODES[0]
#: Batch consumer (the default worker mode): most jobs taken and run per
#: batch, and how long a batch that is not full waits for more (0: no wait).
DEFAULT_CONSUMER_BATCH = 64
DEFAULT_CONSUMER_WAIT_MS = 0.0
#: Longest lifetime a client may ask for; bounds how long replay state is kept.
MAX_JOB_TTL_S = 7 * 24 * 3600
#: Beat asks every worker node for a resource sample this often (docs/monitoring.md).
DEFAULT_SAMPLE_INTERVAL_S = 15.0
#: Prometheus endpoints: each worker's own, and the fleet exporter (`maas-worker metrics`).
DEFAULT_METRICS_PORT = 9540
DEFAULT_FLEET_METRICS_PORT = 9541
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_GATEWAY_ADDRESS = "127.0.0.1"
DEFAULT_GATEWAY_PORT = 9550
DEFAULT_GATEWAY_MAX_BATCH = 1000
DEFAULT_GATEWAY_MAX_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_GATEWAY_BODY_TIMEOUT_S = 10.0
DEFAULT_GATEWAY_MAX_WAIT_S = 60.0


def _default_keyring(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "keyring.json"


def _default_private_keys(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "private"


def _default_model_keys(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "model-keys.json"


# -- the settings' own syntaxes: parsers (variable, text) and checks (variable, value) ---
_LIMITS_USAGE = "model=SOFT:HARD,... (seconds, 0 < SOFT <= HARD)"


def _parse_time_limits(name: str, raw: str) -> dict[str, tuple[float, float]]:
    """``sleep=5:10,digits=2:4``: model -> (soft, hard) seconds (hard: soft + 30 if left out)."""

    def limits(_: str, text: str) -> tuple[float, float]:
        soft, _, hard = text.partition(":")
        soft_s = float(soft)
        return soft_s, float(hard) if hard else soft_s + 30

    return pairs(name, raw, limits, _LIMITS_USAGE)


def _limits_ok(_: str, value: Any) -> bool:
    soft, hard = value
    return is_number(soft) and is_number(hard) and 0 < soft <= hard


_BATCH_USAGE = "model=MAX_BATCH:MAX_WAIT_MS,... (1..4096 jobs, 0..1000 ms)"


def _parse_batching(name: str, raw: str) -> dict[str, tuple[int, float]]:
    """``digits=32:5``: model -> (largest batch, longest wait in ms; 2 if left out)."""

    def spec(_: str, text: str) -> tuple[int, float]:
        size, _, wait = text.partition(":")
        return int(size), float(wait or 2)

    return pairs(name, raw, spec, _BATCH_USAGE)


def _batch_ok(_: str, value: Any) -> bool:
    batch, wait_ms = value
    return (
        isinstance(batch, int)
        and not isinstance(batch, bool)
        and is_number(wait_ms)
        and 1 <= batch <= 4096
        and 0 <= wait_ms <= 1000
    )


_DEPTH_USAGE = "a number or high=N,normal=N,low=N"


def _parse_depth(name: str, raw: str) -> dict[str, int]:
    """``1000`` (every priority) or ``high=100,normal=1000,low=10000`` (the rest: default)."""
    if "=" not in raw:
        try:
            return dict.fromkeys(PRIORITIES, max(1, int(raw)))
        except ValueError:
            raise ConfigError(f"{name} must look like {_DEPTH_USAGE}") from None

    def count(priority: str, text: str) -> int:
        if priority not in PRIORITIES:
            raise ValueError
        return max(1, int(text))

    return {
        **dict.fromkeys(PRIORITIES, DEFAULT_MAX_QUEUE_DEPTH),
        **pairs(name, raw, count, _DEPTH_USAGE),
    }


def _check_depth(name: str, value: Any) -> None:
    mapping_of(
        _DEPTH_USAGE,
        lambda priority, n: (
            priority in PRIORITIES and isinstance(n, int) and not isinstance(n, bool) and n >= 1
        ),
    )(name, value)
    if set(value) != set(PRIORITIES):
        raise ConfigError(f"{name} must look like {_DEPTH_USAGE}")


_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to print or log).

    Covers the userinfo part and redis-py's ``?password=`` query parameter, in
    each part of a ``sentinel://...;sentinel://...`` URL.
    """
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.query:
        parts = parts._replace(query=_QUERY_PASSWORD.sub(r"\1\2***", parts.query))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    return (
        urlunsplit(parts)
        if parts.query or parts.password is not None or "***" in parts.netloc
        else url
    )


#: TLS options in a URL's query (redis-py and kombu read them) would bypass MAAS_REDIS_TLS_*.
_QUERY_TLS = re.compile(r"(?i)(^|&)ssl[a-z_]*=")


def _check_url(name: str, url: Any) -> None:
    require(name, url, str, "a string")
    parts = urlsplit(url)
    what = "broker" if name == "MAAS_BROKER_URL" else "result backend"
    if parts.scheme == "sentinel":
        sentinel_hosts(url, name=name)
    elif parts.scheme not in {"redis", "rediss", "redis+socket", "unix"}:
        raise ConfigError(
            f"the {what} URL ({name}) must be redis://, rediss://, redis+socket:// or sentinel://"
        )
    if _QUERY_TLS.search(parts.query):
        raise ConfigError(
            f"the {what} URL ({name}) must not carry ssl_* options: "
            "set MAAS_REDIS_TLS_CA, _CERT, _KEY and _VERIFY instead"
        )


def is_tls_url(url: str) -> bool:
    """True for a ``rediss://`` URL (Redis over TLS)."""
    return urlsplit(url).scheme == "rediss"


def url_db(url: str) -> int:
    """The database number a ``redis://``/``rediss://`` URL names (0 when none)."""
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def is_sentinel_url(url: str) -> bool:
    """True for a ``sentinel://`` URL (the primary found through Redis Sentinel)."""
    return url.startswith("sentinel://")


@dataclass(frozen=True)
class SentinelURL:
    """A ``sentinel://[user:password@]host:port[/db];sentinel://...`` URL, read.

    The sentinels are asked which server is the primary of the master name
    (`RedisHA.sentinel_master`); ``username`` and ``password`` are the data
    nodes' ACL user, and ``db`` the database number on them (the same in
    every part: `sentinel_hosts`).
    """

    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def sentinel_hosts(url: str, *, name: str = "the URL") -> SentinelURL:
    """Read a ``sentinel://`` URL (`SentinelURL`); `ConfigError` naming ``name`` if malformed.

    Every part must carry the same user, password and database (none: no
    password, database 0): kombu takes them from whichever part it is
    connected through, and moves to the next part when a sentinel is down.
    """
    hosts: list[tuple[str, int]] = []
    seen: set[tuple[str | None, str | None, int]] = set()
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        try:
            port = parts.port or 26379
        except ValueError:
            port = -1
        if parts.scheme != "sentinel" or not parts.hostname or port < 1:
            raise ConfigError(
                f"{name} must look like sentinel://host:port/db;sentinel://host:port/db "
                "(every part a sentinel:// address)"
            )
        hosts.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"{name}: the database must be a number, got {path[:16]!r}")
        seen.add((parts.username or None, parts.password, int(path or 0)))
    if len(seen) != 1:
        raise ConfigError(
            f"{name}: every sentinel:// part must give the same user, password and "
            "database (kombu reads them from the sentinel it connects through): "
            "sentinel://user:password@h1:26379/0;sentinel://user:password@h2:26379/0"
        )
    username, password, db = seen.pop()
    return SentinelURL(tuple(hosts), username, password, db)


#: ``MAAS_REDIS_TLS_VERIFY`` values: check the server's certificate chain and
#: host name (the default), or check nothing (encrypted, but open to a
#: man in the middle: for tests only).
TLS_VERIFY_MODES: tuple[str, ...] = ("required", "none")


def _parse_verify(name: str, raw: str) -> bool:
    mode = raw.strip().lower()
    if mode not in TLS_VERIFY_MODES:
        raise ConfigError(f"{name} must be required or none, got {mode!r}")
    return mode == "required"


def _optional_path(name: str, value: Any) -> None:
    """Check: a Path or None."""
    if value is not None:
        is_path(name, value)


def _existing_file(name: str, value: Any) -> None:
    if value is None:
        return
    is_path(name, value)
    if not value.is_file():
        raise ConfigError(f"{name}: {value} is not a readable file")


def options() -> Iterator[Option]:
    """Every declared setting, the groups' included, in order (the docs table's rows)."""
    return declared(Settings)


def markdown_table() -> str:
    """The variables table of docs/configuration.md, generated from the declarations."""
    lines = ["| variable | meaning | accepted | default |", "| --- | --- | --- | --- |"]
    lines += [f"| `{o.env}` | {o.doc} | {o.accepted} | {o.default_doc} |" for o in options()]
    return "\n".join(lines) + "\n"


# -- the settings ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RedisTLS:
    """TLS for every ``rediss://`` connection: Celery's broker and each redis-py client.

    The server's certificate is checked against ``ca`` (the system's CAs
    when None) and its name against the URL's host, unless ``verify`` is
    False. ``cert`` and ``key`` present a client certificate (for a
    server started with ``tls-auth-clients yes``). The ACL user and password
    travel in the URL (``rediss://user:password@host:port/db``).
    """

    ca: Path | None = setting(
        None,
        env="MAAS_REDIS_TLS_CA",
        parse=parse_path,
        check=_existing_file,
        shown="the system's CAs",
        doc="CA bundle (PEM) the Redis server's certificate must chain to, for every "
        "`rediss://` connection (Celery's broker, Flower, every redis-py client)",
    )
    cert: Path | None = setting(
        None,
        env="MAAS_REDIS_TLS_CERT",
        parse=parse_path,
        check=_existing_file,
        shown="none",
        doc="client certificate (PEM), for a server with `tls-auth-clients yes`",
    )
    key: Path | None = setting(
        None,
        env="MAAS_REDIS_TLS_KEY",
        parse=parse_path,
        check=_existing_file,
        shown="none",
        doc="the client certificate's private key (PEM); needs `MAAS_REDIS_TLS_CERT`",
    )
    verify: bool = setting(
        True,
        env="MAAS_REDIS_TLS_VERIFY",
        parse=_parse_verify,
        check=is_bool,
        accepted=", ".join(f"`{mode}`" for mode in TLS_VERIFY_MODES),
        shown="`required`",
        doc="`required`: check the server's certificate chain and host name; `none`: "
        "encrypt without checking (tests only). Setting any `MAAS_REDIS_TLS_*` while no "
        "URL is `rediss://` is an error, and so are `ssl_*` options in a URL. The ACL "
        "user and password go in the URL: `rediss://user:password@host:port/db`",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.key is not None and self.cert is None:
            raise ConfigError(
                "MAAS_REDIS_TLS_KEY needs MAAS_REDIS_TLS_CERT (the client "
                "certificate it belongs to)"
            )

    @property
    def configured(self) -> bool:
        """True when any TLS option differs from the defaults."""
        return self != RedisTLS()

    def options(self) -> dict[str, Any]:
        """Connection options for a ``rediss://`` URL.

        They are redis-py keyword arguments and, as they are, Celery's
        ``broker_use_ssl`` (kombu and Flower hand them to redis-py).
        """
        opts: dict[str, Any] = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE,
            "ssl_check_hostname": self.verify,
        }
        if self.ca is not None:
            opts["ssl_ca_certs"] = str(self.ca)
        if self.cert is not None:
            opts["ssl_certfile"] = str(self.cert)
        if self.key is not None:
            opts["ssl_keyfile"] = str(self.key)
        return opts


_HA = "Redis high availability ([scaling.md](scaling.md)): "


@dataclass(frozen=True, kw_only=True)
class RedisHA:
    """Redis Sentinel discovery and replicated writes (docs/scaling.md).

    ``sentinel_master`` names the primary a ``sentinel://`` URL's sentinels
    are asked for. ``wait_replicas`` > 0 makes every acknowledged submit and
    every stored result wait (``WAIT``) until that many replicas hold it, or
    fail after ``wait_timeout_ms``.
    """

    sentinel_master: str = setting(
        "",
        env="MAAS_REDIS_SENTINEL_MASTER",
        parse=parse_text,
        check=is_str,
        shown="none",
        doc=_HA + "master name the sentinels of a `sentinel://` URL are asked for (their "
        "`sentinel monitor NAME ...`); needed when a URL is `sentinel://`",
    )
    sentinel_password: str | None = setting(
        None,
        env="MAAS_REDIS_SENTINEL_PASSWORD",
        parse=parse_text,
        check=is_optional_str,
        secret=True,
        shown="none",
        doc=_HA + "password of the sentinels themselves (their `requirepass`); the data "
        "nodes' user and password go in the URL: `sentinel://user:password@host:26379;...`",
    )
    sentinel_tls: bool = setting(
        False,
        env="MAAS_REDIS_SENTINEL_TLS",
        parse=parse_flag,
        check=is_bool,
        accepted="`1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`",
        shown="off",
        doc=_HA + "`1`: a `sentinel://` URL's sentinels and data nodes are reached over TLS, "
        "with the `MAAS_REDIS_TLS_*` options",
    )
    wait_replicas: int = setting(
        0,
        env="MAAS_REDIS_WAIT_REPLICAS",
        parse=parse_int,
        check=int_in(0, 16),
        shown="`0` (no wait)",
        doc=_HA + "a submit is acknowledged, and a worker acknowledges a job's message, only "
        "once this many replicas hold the jobs (the result): `WAIT` after the writes (on a Redis "
        "Cluster after a barrier write on each primary written to, docs/scaling.md); fewer "
        "within the timeout is an error (`ServiceUnavailable` at the client, a job handed "
        "back at the worker). `0` on a single node",
    )
    wait_timeout_ms: int = setting(
        1000,
        env="MAAS_REDIS_WAIT_TIMEOUT_MS",
        parse=parse_int,
        check=int_in(1, 60_000),
        doc=_HA + "longest a `WAIT` for `MAAS_REDIS_WAIT_REPLICAS` replicas blocks",
    )

    cluster: bool = setting(
        False,
        env="MAAS_REDIS_CLUSTER",
        parse=parse_flag,
        check=is_bool,
        accepted="`1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`",
        shown="off",
        doc=_HA + "`1`: the broker and result-store URLs name a node of a Redis Cluster "
        "(any node: the client finds the others); the queues are sharded "
        "(`MAAS_QUEUE_SHARDS`), each shard's keys under one hash tag",
    )
    cluster_nodes: str = setting(
        "",
        env="MAAS_REDIS_CLUSTER_NODES",
        parse=parse_text,
        check=is_str,
        shown="none",
        doc=_HA + "more Redis Cluster nodes to start from, `host:port,host:port` (the URL's "
        "user, password and TLS apply): a client still starts when the URL's node is down",
    )
    queue_shards: int = setting(
        1,
        env="MAAS_QUEUE_SHARDS",
        parse=parse_int,
        check=int_in(1, 1024),
        doc=_HA + "queue shards: tenant T's jobs go to shard `crc32(T) mod N`; every broker "
        "key of shard K is under the hash tag `{maas-qK}` (one Redis Cluster slot). Every "
        "producer and worker of a deployment must use the same N",
    )

    def __post_init__(self) -> None:
        validate(self)

    @property
    def sharded(self) -> bool:
        """Whether broker keys carry a shard's hash tag (a cluster, or more than one shard)."""
        return self.cluster or self.queue_shards > 1

    def wait_command(self) -> tuple[str, int, int] | None:
        """``("WAIT", replicas, timeout ms)``, or None when no replica is waited for."""
        return ("WAIT", self.wait_replicas, self.wait_timeout_ms) if self.wait_replicas else None


_AUTOSCALE = "`worker --autoscale`: "


def _default_gateway_keyring(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "gateway-keyring.json"


_GATEWAY = "`maas-worker gateway` ([gateway.md](gateway.md)): "


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """The HTTP gateway (`maas-worker gateway`, docs/gateway.md)."""

    keyring_path: Path = setting(
        factory=lambda: _default_gateway_keyring(os.environ),
        env_default=_default_gateway_keyring,
        env="MAAS_GATEWAY_KEYRING",
        parse=parse_path,
        check=is_path,
        shown="`$XDG_CONFIG_HOME/maas-worker/gateway-keyring.json`",
        doc=_GATEWAY + "its keyring: MAC keys and bearer-token hashes only, written by "
        "`maas-worker keys export --mac-only` (mode 0600)",
    )
    address: str = setting(
        DEFAULT_GATEWAY_ADDRESS,
        env="MAAS_GATEWAY_ADDRESS",
        parse=parse_text,
        check=is_str,
        doc=_GATEWAY + "address it listens on (`0.0.0.0` in a container)",
    )
    port: int = setting(
        DEFAULT_GATEWAY_PORT,
        env="MAAS_GATEWAY_PORT",
        parse=parse_int,
        check=int_in(0, 65535),
        doc=_GATEWAY + "TCP port it listens on",
    )
    tls_cert: Path | None = setting(
        None,
        env="MAAS_GATEWAY_TLS_CERT",
        parse=parse_path,
        check=_existing_file,
        shown="none (plain HTTP)",
        doc=_GATEWAY + "server certificate chain (PEM; may hold the key too): it serves HTTPS",
    )
    tls_key: Path | None = setting(
        None,
        env="MAAS_GATEWAY_TLS_KEY",
        parse=parse_path,
        check=_existing_file,
        shown="none",
        doc=_GATEWAY + "the server certificate's private key (PEM); needs `MAAS_GATEWAY_TLS_CERT`",
    )
    max_batch: int = setting(
        DEFAULT_GATEWAY_MAX_BATCH,
        env="MAAS_GATEWAY_MAX_BATCH",
        parse=parse_int,
        check=int_in(1, 100_000),
        doc=_GATEWAY + "most envelopes in one `POST /v1/jobs:batch`",
    )
    max_batch_bytes: int = setting(
        DEFAULT_GATEWAY_MAX_BATCH_BYTES,
        env="MAAS_GATEWAY_MAX_BATCH_BYTES",
        parse=parse_int,
        check=int_in(1024),
        doc=_GATEWAY + "largest `POST /v1/jobs:batch` body (bytes; `413` beyond, enforced "
        "while it streams in): what one request may make the gateway hold in memory",
    )
    body_timeout_s: float = setting(
        DEFAULT_GATEWAY_BODY_TIMEOUT_S,
        env="MAAS_GATEWAY_BODY_TIMEOUT_S",
        parse=parse_float,
        check=number_in(0.1, 3600),
        doc=_GATEWAY + "a request body must arrive whole within this long (`408` otherwise)",
    )
    max_wait_s: float = setting(
        DEFAULT_GATEWAY_MAX_WAIT_S,
        env="MAAS_GATEWAY_MAX_WAIT_S",
        parse=parse_float,
        check=number_in(0, 3600),
        doc=_GATEWAY + "longest long-poll `GET /v1/jobs/{id}?wait=S` holds a request",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigError(
                "MAAS_GATEWAY_TLS_KEY needs MAAS_GATEWAY_TLS_CERT (the certificate it belongs to)"
            )


@dataclass(frozen=True, kw_only=True)
class AutoscalePolicy:
    """How ``worker --autoscale MAX,MIN`` sizes its pool (autoscale.py)."""

    interval_s: float = setting(
        1.0,
        env="MAAS_AUTOSCALE_INTERVAL_S",
        parse=parse_float,
        check=number_in(0.05, 60),
        doc=_AUTOSCALE + "how often the backlog and host headroom are read and the pool size "
        "decided",
    )
    keepalive_s: float = setting(
        30.0,
        env="MAAS_AUTOSCALE_KEEPALIVE_S",
        parse=parse_float,
        check=number_in(0.1, 86400),
        doc=_AUTOSCALE + "the pool shrinks only after this long with no job waiting",
    )
    grow_after_s: float = setting(
        1.0,
        env="MAAS_AUTOSCALE_GROW_AFTER_S",
        parse=parse_float,
        check=number_in(0, 3600),
        doc=_AUTOSCALE + "grow only for a queued job that has waited this long (jobs already "
        "reserved by the worker always count)",
    )
    max_memory_pct: float = setting(
        85.0,
        env="MAAS_AUTOSCALE_MAX_MEMORY_PCT",
        parse=parse_float,
        check=number_in(0, 100),
        doc=_AUTOSCALE + "no growing while host memory use is above this percentage",
    )
    max_cpu_pct: float = setting(
        90.0,
        env="MAAS_AUTOSCALE_MAX_CPU_PCT",
        parse=parse_float,
        check=number_in(0, 100),
        doc=_AUTOSCALE + "no growing while host CPU use is above this percentage",
    )

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class FleetPolicy:
    """How ``maas-worker scale`` sizes the fleet of worker nodes (fleet.py)."""

    min_nodes: int = setting(
        1,
        env="MAAS_FLEET_MIN_NODES",
        parse=parse_int,
        check=int_in(0),
        doc="`scale` / `maas_fleet_desired_nodes`: fewest worker nodes recommended (`0` "
        "allows scaling to zero)",
    )
    max_nodes: int = setting(
        20,
        env="MAAS_FLEET_MAX_NODES",
        parse=parse_int,
        check=int_in(1),
        doc="most worker nodes recommended",
    )
    target_wait_s: float = setting(
        30.0,
        env="MAAS_FLEET_TARGET_WAIT_S",
        parse=parse_float,
        check=number_in(0.1, 86400),
        doc="the backlog should drain within this many seconds; an older oldest job asks for "
        "one more node",
    )
    backlog_per_node: int = setting(
        10,
        env="MAAS_FLEET_BACKLOG_PER_NODE",
        parse=parse_int,
        check=int_in(1),
        doc="jobs one node is assumed to clear per target wait until throughput has been measured",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.min_nodes > self.max_nodes:
            raise ConfigError("MAAS_FLEET_MIN_NODES must be <= MAAS_FLEET_MAX_NODES")


_CONSUMER = "batch consumer (`worker`'s default mode): "
_URLS = "`redis://`, `rediss://`, `redis+socket://`, `unix://`, `sentinel://` (with `;`)"
_FLAG = "`1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Deployment settings: build once with `Settings.from_env` and pass them down."""

    broker_url: str = setting(
        DEFAULT_BROKER_URL,
        env="MAAS_BROKER_URL",
        parse=parse_text,
        check=_check_url,
        secret=True,
        accepted=_URLS,
        doc="Redis URL of the broker",
    )
    #: ``""`` (the default) means the broker URL.
    result_backend: str = setting(
        "",
        env="MAAS_RESULT_BACKEND",
        parse=parse_text,
        check=_check_url,
        secret=True,
        accepted=_URLS,
        shown="the broker URL",
        doc="Redis URL for sealed results, job claims, the audit log and the model catalogue",
    )
    redis_tls: RedisTLS = group(RedisTLS)
    redis_ha: RedisHA = group(RedisHA)
    keyring_path: Path = setting(
        factory=lambda: _default_keyring(os.environ),
        env_default=_default_keyring,
        env="MAAS_KEYRING",
        parse=parse_path,
        check=is_path,
        shown="`$XDG_CONFIG_HOME/maas-worker/keyring.json`, i.e. "
        "`~/.config/maas-worker/keyring.json`",
        doc="keyring file (JSON, mode 0600, refused if group/others can access it)",
    )
    # Not type-checked: `maas-worker acl` passes its --tenant list here (cli/, being
    # rewritten); a client checks the name against the keyring.
    tenant: str | None = setting(
        None,
        env="MAAS_TENANT",
        parse=parse_text,
        check=lambda name, value: None,
        shown="none (a client needs one)",
        doc="tenant a client submits as",
    )
    model_dir: Path = setting(
        BUNDLED_MODEL_DIR,
        env="MAAS_MODEL_DIR",
        parse=parse_path,
        check=is_path,
        shown="the repository bundled in the package, `maas_worker/models/bundled` (the "
        "signed `digits` model)",
        doc="model repository folder: `<name>/<version>/` with the artifact, `manifest.json` "
        "and `manifest.sig` ([models.md](models.md)); rescanned every 2 s, so new "
        "versions need no restart",
    )
    trusted_signers: tuple[Path, ...] = setting(
        (BUNDLED_SIGNERS_DIR,),
        env="MAAS_TRUSTED_SIGNERS",
        parse=lambda name, raw: parse_paths(name, raw) or (BUNDLED_SIGNERS_DIR,),
        check=are_paths,
        shown="the bundled key, `maas_worker/models/trusted_signers`",
        doc="Ed25519 public keys (PEM) models may be signed with: files, or folders whose "
        "`*.pub`/`*.pem` are read, separated by `:`; re-read when they change (removing a "
        "key revokes its models). A worker refuses to start if one is missing or holds a "
        "private key",
    )
    model_keys_path: Path = setting(
        factory=lambda: _default_model_keys(os.environ),
        env_default=_default_model_keys,
        env="MAAS_MODEL_KEYS",
        parse=parse_path,
        check=is_path,
        shown="`$XDG_CONFIG_HOME/maas-worker/model-keys.json`",
        doc="model encryption keys (JSON, mode 0600, refused if group/others can access it); "
        "needed only by workers serving encrypted models",
    )
    private_key_dir: Path = setting(
        factory=lambda: _default_private_keys(os.environ),
        env_default=_default_private_keys,
        env="MAAS_PRIVATE_KEY_DIR",
        parse=parse_path,
        check=is_path,
        shown="`$XDG_CONFIG_HOME/maas-worker/private`",
        doc="the client's CKKS keys for private inference, `<tenant>.ckks` (secret, 0600) and "
        "`<tenant>.ckks.pub` ([private-inference.md](private-inference.md)); never on a worker",
    )
    private_context_ttl_s: int = setting(
        DEFAULT_PRIVATE_CONTEXT_TTL_S,
        env="MAAS_PRIVATE_CONTEXT_TTL_S",
        parse=parse_int,
        check=int_in(60, MAX_JOB_TTL_S * 2),
        doc="how long a registered public CKKS context is kept in Redis; the client "
        "registers it again when it is gone, and refreshes it when it has less than a job's "
        "lifetime left",
    )
    private_max_context_bytes: int = setting(
        DEFAULT_PRIVATE_MAX_CONTEXT_BYTES,
        env="MAAS_PRIVATE_MAX_CONTEXT_BYTES",
        parse=parse_int,
        check=int_in(1),
        doc="largest public CKKS context a worker loads (the default parameters need ~19 MB)",
    )
    private_context_cache: int = setting(
        DEFAULT_PRIVATE_CONTEXT_CACHE,
        env="MAAS_PRIVATE_CONTEXT_CACHE",
        parse=parse_int,
        check=int_in(1, 1024),
        doc="public CKKS contexts each worker process keeps loaded (least recently used "
        "first out; each is about 12 MB in memory)",
    )
    visibility_timeout_s: int = setting(
        DEFAULT_VISIBILITY_TIMEOUT_S,
        env="MAAS_VISIBILITY_TIMEOUT_S",
        parse=parse_int,
        check=int_in(1),
        doc="seconds after which a message taken by a worker that never acknowledged it (it "
        "died) is delivered again; also scales kombu's restore sweep (every "
        "`min(10, T/4)` s)",
    )
    diagnostic_models: bool = setting(
        False,
        env="MAAS_DIAGNOSTIC_MODELS",
        parse=parse_flag,
        check=is_bool,
        accepted=_FLAG,
        shown="off (on in `demo`)",
        doc="`1` registers the `echo` and `sleep` models",
    )
    job_ttl_s: int = setting(
        DEFAULT_JOB_TTL_S,
        env="MAAS_JOB_TTL_S",
        parse=parse_int,
        check=int_in(1, MAX_JOB_TTL_S),
        doc="default lifetime of a submitted job; a worker refuses it (`expired`) after that "
        "(at most 7 days)",
    )
    result_ttl_s: int = setting(
        DEFAULT_RESULT_TTL_S,
        env="MAAS_RESULT_TTL_S",
        parse=parse_int,
        check=int_in(1),
        doc="how long a sealed result (and a `rejected` marker) is kept",
    )
    max_input_bytes: int = setting(
        DEFAULT_MAX_INPUT_BYTES,
        env="MAAS_MAX_INPUT_BYTES",
        parse=parse_int,
        check=int_in(1),
        doc="largest job input (compact JSON) accepted, at the client and at the worker "
        "(`oversize`)",
    )
    max_result_bytes: int = setting(
        DEFAULT_MAX_RESULT_BYTES,
        env="MAAS_MAX_RESULT_BYTES",
        parse=parse_int,
        check=int_in(1),
        doc="largest result; a bigger one fails the job with `oversize`",
    )
    clock_skew_s: int = setting(
        DEFAULT_CLOCK_SKEW_S,
        env="MAAS_CLOCK_SKEW_S",
        parse=parse_int,
        check=int_in(0),
        doc="clock difference tolerated between clients and workers in the time-window check",
    )
    lease_s: int = setting(
        DEFAULT_LEASE_S,
        env="MAAS_LEASE_S",
        parse=parse_int,
        check=int_in(3),
        doc="a running job's claim lapses this long after its worker stops renewing it (crash)",
    )
    audit_maxlen: int = setting(
        DEFAULT_AUDIT_MAXLEN,
        env="MAAS_AUDIT_MAXLEN",
        parse=parse_int,
        check=int_in(100),
        doc="audit records kept (a capped Redis stream)",
    )
    soft_time_limit_s: float = setting(
        DEFAULT_SOFT_TIME_LIMIT_S,
        env="MAAS_SOFT_TIME_LIMIT_S",
        parse=parse_float,
        check=number_in(0.001, 86400),
        doc="default per-job soft time limit: the job is interrupted (reason `timeout`)",
    )
    hard_time_limit_s: float = setting(
        DEFAULT_HARD_TIME_LIMIT_S,
        env="MAAS_HARD_TIME_LIMIT_S",
        parse=parse_float,
        check=number_in(0.001, 86400),
        doc="default per-job hard time limit: the job's process is ended",
    )
    time_limits: dict[str, tuple[float, float]] = setting(
        factory=dict,
        env="MAAS_TIME_LIMITS",
        parse=_parse_time_limits,
        check=mapping_of(_LIMITS_USAGE, _limits_ok),
        shown="none",
        accepted="`model=SOFT:HARD,...` (seconds, 0 < SOFT <= HARD; HARD: SOFT + 30 if left out)",
        doc="per-model time limits, instead of the default ones",
    )
    max_queue_depth: dict[str, int] = setting(
        factory=lambda: dict.fromkeys(PRIORITIES, DEFAULT_MAX_QUEUE_DEPTH),
        env="MAAS_MAX_QUEUE_DEPTH",
        parse=_parse_depth,
        check=_check_depth,
        shown=f"`{DEFAULT_MAX_QUEUE_DEPTH}`",
        accepted="`N` or `high=N,normal=N,low=N` (N >= 1; a priority left out: the default)",
        doc="backpressure: submit refuses (`QueueFull`) at this many queued jobs of its tenant, "
        "for every priority or for each",
    )
    memory_high_water_pct: float = setting(
        DEFAULT_MEMORY_HIGH_WATER_PCT,
        env="MAAS_MEMORY_HIGH_WATER_PCT",
        parse=parse_float,
        check=number_in(1, 100),
        doc="a worker does not start a job while host memory use is above this (the job is "
        "retried 5 s later)",
    )
    max_memory_per_child_mb: int = setting(
        DEFAULT_MAX_MEMORY_PER_CHILD_MB,
        env="MAAS_MAX_MEMORY_PER_CHILD_MB",
        parse=parse_int,
        check=int_in(0),
        doc="a pool process is replaced after its job if its resident memory grew past this "
        "(`0` = never)",
    )
    low_priority_share: float = setting(
        DEFAULT_LOW_PRIORITY_SHARE,
        env="MAAS_LOW_PRIORITY_SHARE",
        parse=parse_float,
        check=number_in(0, 0.5),
        doc="share of fetches guaranteed to normal and to low jobs under a steady high load "
        "(`0` = strict priority)",
    )
    crypto_backend: str = setting(
        "auto",
        env="MAAS_CRYPTO_BACKEND",
        parse=parse_lower,
        check=one_of(("auto", "pycryptodome", "openssl")),
        doc="AES-GCM implementation of a client's or worker's envelopes, chosen once when it "
        "starts: `auto` (OpenSSL via `cryptography`), `pycryptodome`, `openssl`; the wire "
        "format is identical",
    )
    batching: dict[str, tuple[int, float]] = setting(
        factory=dict,
        env="MAAS_BATCH",
        parse=_parse_batching,
        check=mapping_of(_BATCH_USAGE, _batch_ok),
        shown="none",
        accepted="`model=MAX_BATCH:MAX_WAIT_MS,...` (1 to 4096 jobs, 0 to 1000 ms; "
        "MAX_WAIT_MS: 2 if left out)",
        doc="dynamic batching for models that support it (workers started with `--pool threads`)",
    )
    worker_mode: str = setting(
        DEFAULT_WORKER_MODE,
        env="MAAS_WORKER_MODE",
        parse=parse_lower,
        check=one_of(WORKER_MODES),
        doc="what `maas-worker worker` runs on the job queues when no flag says: "
        "`batch-consumer` (batch consumer processes, many jobs per round trip and per model "
        "call) or `celery-tasks` (one Celery task per job in Celery's pool); `--batch-consumer` "
        "or `--celery-tasks` override it, and `--autoscale` or `--pool` select `celery-tasks` "
        "([operations.md](operations.md#worker-modes))",
    )
    worker_shards: str = setting(
        "",
        env="MAAS_WORKER_SHARDS",
        parse=parse_text,
        check=is_str,
        shown="all shards",
        doc="the queue shards a worker node consumes (`MAAS_QUEUE_SHARDS`), e.g. `0,2-3`; "
        "`worker --shards` overrides it. Batch consumer process i consumes the i-th of them "
        "(round robin); a `--celery-tasks` node exactly one "
        "([scaling.md](scaling.md#sharding-on-redis-cluster))",
    )
    consumer_batch: int = setting(
        DEFAULT_CONSUMER_BATCH,
        env="MAAS_CONSUMER_BATCH",
        parse=parse_int,
        check=int_in(1),
        doc=_CONSUMER + "most jobs a consumer process takes and runs as one batch "
        "([operations.md](operations.md#the-batch-consumer))",
    )
    consumer_wait_ms: float = setting(
        DEFAULT_CONSUMER_WAIT_MS,
        env="MAAS_CONSUMER_WAIT_MS",
        parse=parse_float,
        check=number_in(0, 1000),
        doc=_CONSUMER + "how long a batch that is not full keeps gathering jobs (`0`: run what "
        "is there at once; a busy consumer's batches fill by themselves)",
    )
    flower_basic_auth: str | None = setting(
        None,
        env="MAAS_FLOWER_BASIC_AUTH",
        parse=parse_text,
        check=is_optional_str,
        secret=True,
        shown="none",
        doc="`user:password` for `maas-worker flower`, which refuses to start without it",
    )
    remote_control: str = setting(
        DEFAULT_REMOTE_CONTROL,
        env="MAAS_REMOTE_CONTROL",
        parse=parse_lower,
        check=one_of(REMOTE_CONTROL_MODES),
        doc="Celery remote control on workers and Flower: `inspect` answers read-only "
        "commands only; `operator` also obeys shutdown, pool, consumer, rate- and "
        "time-limit commands (docs/security.md#remote-control). `revoke` and "
        "unconfigured queues are refused either way",
    )
    sample_interval_s: float = setting(
        DEFAULT_SAMPLE_INTERVAL_S,
        env="MAAS_SAMPLE_INTERVAL_S",
        parse=parse_float,
        check=number_in(0.2, 3600),
        doc="beat asks every worker node for a resource sample this often; a sample older "
        "than 3 intervals is no longer current ([monitoring.md](monitoring.md)); set the "
        "same value for beat and workers",
    )
    beat_alive_file: Path | None = setting(
        None,
        env="MAAS_BEAT_ALIVE_FILE",
        parse=parse_path,
        check=_optional_path,
        shown="none",
        doc="beat writes here, after each tick, the unix time by which it will have ticked "
        "again: a liveness check passes while that time is ahead (the compose `beat` "
        "service's health check); unset: no file",
    )
    metrics_port: int = setting(
        DEFAULT_METRICS_PORT,
        env="MAAS_METRICS_PORT",
        parse=parse_int,
        check=int_in(0),
        doc="each worker's Prometheus endpoint (its jobs and autoscaler); `0` turns it off; a "
        "port in use only logs a warning",
    )
    fleet_metrics_port: int = setting(
        DEFAULT_FLEET_METRICS_PORT,
        env="MAAS_FLEET_METRICS_PORT",
        parse=parse_int,
        check=int_in(0),
        doc="port of the fleet exporter, `maas-worker metrics` (backlog, samples, desired nodes)",
    )
    metrics_address: str = setting(
        DEFAULT_METRICS_ADDRESS,
        env="MAAS_METRICS_ADDRESS",
        parse=parse_text,
        check=is_str,
        doc="address both metrics endpoints bind to (`0.0.0.0` in a container)",
    )
    autoscale: AutoscalePolicy = group(AutoscalePolicy)
    gateway: GatewaySettings = group(GatewaySettings)
    fleet: FleetPolicy = group(FleetPolicy)

    def __post_init__(self) -> None:
        if self.result_backend == "":
            object.__setattr__(self, "result_backend", self.broker_url)
        validate(self)
        if self.redis_tls.configured and not (
            self.uses_tls(self.broker_url) or self.uses_tls(self.result_backend)
        ):
            # Certificates configured for plain connections: the operator
            # believes the traffic is protected and it is not.
            raise ConfigError(
                "MAAS_REDIS_TLS_* is set but neither MAAS_BROKER_URL nor "
                "MAAS_RESULT_BACKEND is rediss:// (or sentinel:// with MAAS_REDIS_SENTINEL_TLS)"
            )
        sentinel = [u for u in (self.broker_url, self.result_backend) if is_sentinel_url(u)]
        if sentinel and not self.redis_ha.sentinel_master:
            raise ConfigError(
                "a sentinel:// URL needs MAAS_REDIS_SENTINEL_MASTER (the master name the "
                "sentinels monitor)"
            )
        if self.redis_ha.sentinel_tls and not sentinel:
            raise ConfigError("MAAS_REDIS_SENTINEL_TLS is set but no URL is sentinel://")
        if self.redis_ha.cluster:
            for url in (self.broker_url, self.result_backend):
                if is_sentinel_url(url) or url.startswith("redis+socket://"):
                    raise ConfigError(
                        "MAAS_REDIS_CLUSTER needs redis:// or rediss:// URLs (a node of the "
                        "cluster), not sentinel:// or a unix socket"
                    )
                if url_db(url) != 0:
                    raise ConfigError("a Redis Cluster has database 0 only: end the URL with /0")
        elif self.redis_ha.cluster_nodes:
            raise ConfigError("MAAS_REDIS_CLUSTER_NODES is set but MAAS_REDIS_CLUSTER is not")

    def uses_tls(self, url: str) -> bool:
        """Whether connections for ``url`` use TLS (rediss://, or sentinel:// with
        MAAS_REDIS_SENTINEL_TLS)."""
        return is_tls_url(url) or (is_sentinel_url(url) and self.redis_ha.sentinel_tls)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``MAAS_*`` variable (of ``os.environ`` by default); keyword arguments
        (flags) win over the environment, and None means "not given".

        Raises `ConfigError` with one clear line for an invalid value, overrides
        included; `TypeError` for an unknown keyword.
        """
        env = os.environ if env is None else env
        given = {name: value for name, value in overrides.items() if value is not None}
        # A variable a flag overrides is not read: a broken value cannot stop the flag.
        return cls(**{**read(cls, env, skip=given), **given})

    def redis_ssl(self, url: str) -> dict[str, Any] | None:
        """TLS options for a connection to ``url`` (`RedisTLS.options`); None unless it
        uses TLS (`uses_tls`)."""
        return self.redis_tls.options() if self.uses_tls(url) else None

    def limits_for(self, model: str) -> tuple[float, float]:
        """(soft, hard) time limit in seconds for ``model`` (``name`` or ``name@version``)."""
        name = model.split("@", 1)[0]
        soft, hard = (
            self.time_limits.get(model)
            or self.time_limits.get(name)
            or (self.soft_time_limit_s, self.hard_time_limit_s)
        )
        return soft, max(hard, soft)

    @property
    def max_envelope_chars(self) -> int:
        """Largest request a worker accepts: base64 of the input plus header and tags."""
        return (self.max_input_bytes + 1024) * 4 // 3 + 4

    @property
    def max_retry_delay_s(self) -> float:
        """Longest a worker holds a message back before retrying it: half the visibility
        timeout (held longer, kombu's sweep would put a second copy back)."""
        return self.visibility_timeout_s / 2
