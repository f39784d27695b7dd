"""Settings: one frozen value built from the environment, once, never at import.

Every ``MAAS_*`` variable is read here and nowhere else; docs/configuration.md
lists them all. Command-line flags override by passing keyword arguments to
`Settings.from_env`.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from maas_worker.errors import ConfigError
from maas_worker.protocol import PRIORITIES

V = TypeVar("V")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT_S = 600
#: Values of MAAS_REMOTE_CONTROL; the first is the default.
REMOTE_CONTROL_MODES = ("inspect", "operator")
DEFAULT_REMOTE_CONTROL = REMOTE_CONTROL_MODES[0]
DEFAULT_JOB_TTL_S = 3600
DEFAULT_RESULT_TTL_S = 3600
DEFAULT_MAX_INPUT_BYTES = 1024 * 1024
DEFAULT_MAX_RESULT_BYTES = 4 * 1024 * 1024
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
#: Batch consumer (``worker --batch-consumer``): most jobs taken and run per
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

def _default_keyring(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "keyring.json"


#: The signed models that ship inside the package (the ``digits`` classifier).
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "bundled"
#: The public key(s) the bundled models are signed with.
BUNDLED_SIGNERS_DIR = Path(__file__).resolve().parent / "models" / "trusted_signers"


def _default_model_dir(env: Mapping[str, str]) -> Path:
    # The bundled repository, so `digits` is served out of the box.
    return BUNDLED_MODEL_DIR


def _default_model_keys(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maas-worker" / "model-keys.json"


def _paths(raw: str) -> tuple[Path, ...]:
    """``a:b:c`` (os.pathsep) as paths; empty parts are ignored."""
    return tuple(Path(p) for p in raw.split(os.pathsep) if p)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def _pairs(env: Mapping[str, str], name: str, value: Callable[[str, str], V],
           usage: str) -> dict[str, V]:
    """Parse ``key=VALUE,key=VALUE``; ``value(key, text)`` raises ValueError when wrong."""
    raw = env.get(name, "").strip()
    out: dict[str, V] = {}
    if not raw:
        return out
    try:
        for part in raw.split(","):
            key, _, text = part.partition("=")
            if not key.strip():
                raise ValueError
            out[key.strip()] = value(key.strip(), text)
    except ValueError:
        raise ConfigError(f"{name} must look like {usage}") from None
    return out


def _per_priority(env: Mapping[str, str], name: str, default: int) -> dict[str, int]:
    """``1000`` (every priority) or ``high=100,normal=1000,low=10000``."""
    raw = env.get(name, "").strip()
    usage = "a number or high=N,normal=N,low=N"
    if raw and "=" not in raw:
        try:
            return dict.fromkeys(PRIORITIES, max(1, int(raw)))
        except ValueError:
            raise ConfigError(f"{name} must look like {usage}") from None

    def count(priority: str, text: str) -> int:
        if priority not in PRIORITIES:
            raise ValueError
        return max(1, int(text))
    return {**dict.fromkeys(PRIORITIES, default), **_pairs(env, name, count, usage)}


def _time_limits(env: Mapping[str, str], name: str) -> dict[str, tuple[float, float]]:
    """``sleep=5:10,digits=2:4``: model -> (soft, hard) seconds."""
    def limits(_: str, text: str) -> tuple[float, float]:
        soft, _, hard = text.partition(":")
        soft_s = float(soft)
        hard_s = float(hard) if hard else soft_s + 30
        if not 0 < soft_s <= hard_s:
            raise ValueError
        return soft_s, hard_s
    return _pairs(env, name, limits, "model=SOFT:HARD,... (seconds, 0 < SOFT <= HARD)")


def _batching(env: Mapping[str, str], name: str) -> dict[str, tuple[int, float]]:
    """``digits=32:5``: model -> (largest batch, longest wait in ms)."""
    def spec(_: str, text: str) -> tuple[int, float]:
        size, _, wait = text.partition(":")
        batch, wait_ms = int(size), float(wait or 2)
        if not (1 <= batch <= 4096 and 0 <= wait_ms <= 1000):
            raise ValueError
        return batch, wait_ms
    return _pairs(env, name, spec,
                  "model=MAX_BATCH:MAX_WAIT_MS,... (1..4096 jobs, 0..1000 ms)")


def _choice(env: Mapping[str, str], name: str, options: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or options[0]
    if raw not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"", "0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to print or log).

    Covers the userinfo part and redis-py's ``?password=`` query parameter.
    """
    parts = urlsplit(url)
    if parts.query:
        parts = parts._replace(query=_QUERY_PASSWORD.sub(r"\1\2***", parts.query))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    return urlunsplit(parts) if parts.query or parts.password is not None \
        or "***" in parts.netloc else url


#: TLS options in a URL's query (redis-py and kombu read them) would bypass MAAS_REDIS_TLS_*.
_QUERY_TLS = re.compile(r"(?i)(^|&)ssl[a-z_]*=")


def _check_url(name: str, url: str) -> str:
    parts = urlsplit(url)
    what = "broker" if name == "MAAS_BROKER_URL" else "result backend"
    if parts.scheme not in {"redis", "rediss", "redis+socket", "unix"}:
        raise ConfigError(f"the {what} URL ({name}) must be redis://, rediss:// or "
                          "redis+socket://")
    if _QUERY_TLS.search(parts.query):
        raise ConfigError(f"the {what} URL ({name}) must not carry ssl_* options: "
                          "set MAAS_REDIS_TLS_CA, _CERT, _KEY and _VERIFY instead")
    return url


def is_tls_url(url: str) -> bool:
    """True for a ``rediss://`` URL (Redis over TLS)."""
    return urlsplit(url).scheme == "rediss"


#: ``MAAS_REDIS_TLS_VERIFY`` values: check the server's certificate chain and
#: host name (the default), or check nothing (encrypted, but open to a
#: man in the middle: for tests only).
TLS_VERIFY_MODES: tuple[str, ...] = ("required", "none")


def _existing_file(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}: {path} is not a readable file")
    return path


@dataclass(frozen=True, kw_only=True)
class RedisTLS:
    """TLS for every ``rediss://`` connection: Celery's broker and each redis-py client.

    The server's certificate is checked against ``ca`` (the system's CAs
    when None) and its name against the URL's host, unless ``verify`` is
    False. ``cert`` and ``key`` present a client certificate (for a
    server started with ``tls-auth-clients yes``). The ACL user and password
    travel in the URL (``rediss://user:password@host:port/db``).
    """

    #: CA bundle (PEM) the server's certificate must chain to.
    ca: Path | None = None
    #: Client certificate (PEM) and its private key, for mutual TLS.
    cert: Path | None = None
    key: Path | None = None
    verify: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisTLS:
        """Read ``MAAS_REDIS_TLS_CA``, ``_CERT``, ``_KEY`` and ``_VERIFY``."""
        verify = (env.get("MAAS_REDIS_TLS_VERIFY") or "required").strip().lower()
        if verify not in TLS_VERIFY_MODES:
            raise ConfigError("MAAS_REDIS_TLS_VERIFY must be required or none, "
                              f"got {verify!r}")
        tls = cls(ca=_existing_file(env, "MAAS_REDIS_TLS_CA"),
                  cert=_existing_file(env, "MAAS_REDIS_TLS_CERT"),
                  key=_existing_file(env, "MAAS_REDIS_TLS_KEY"),
                  verify=verify == "required")
        if tls.key is not None and tls.cert is None:
            raise ConfigError("MAAS_REDIS_TLS_KEY needs MAAS_REDIS_TLS_CERT (the client "
                              "certificate it belongs to)")
        return tls

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


@dataclass(frozen=True, kw_only=True)
class AutoscalePolicy:
    """How ``worker --autoscale MAX,MIN`` sizes its pool (autoscale.py)."""

    #: How often the backlog and the host's headroom are read.
    interval_s: float = 1.0
    #: A pool shrinks only after this long without a waiting job.
    keepalive_s: float = 30.0
    #: Grow only for a job that has waited at least this long (not for a blip).
    grow_after_s: float = 1.0
    #: Refuse to grow while host memory use (percent) is above this.
    max_memory_pct: float = 85.0
    #: Refuse to grow while host CPU use (percent, all cores) is above this.
    max_cpu_pct: float = 90.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AutoscalePolicy:
        """Read the ``MAAS_AUTOSCALE_*`` variables."""
        d = cls()
        return cls(
            interval_s=_float(env, "MAAS_AUTOSCALE_INTERVAL_S", d.interval_s, 0.05, 60),
            keepalive_s=_float(env, "MAAS_AUTOSCALE_KEEPALIVE_S", d.keepalive_s, 0.1, 86400),
            grow_after_s=_float(env, "MAAS_AUTOSCALE_GROW_AFTER_S", d.grow_after_s, 0, 3600),
            max_memory_pct=_float(env, "MAAS_AUTOSCALE_MAX_MEMORY_PCT", d.max_memory_pct,
                                  0, 100),
            max_cpu_pct=_float(env, "MAAS_AUTOSCALE_MAX_CPU_PCT", d.max_cpu_pct, 0, 100))


@dataclass(frozen=True, kw_only=True)
class FleetPolicy:
    """How ``maas-worker scale`` sizes the fleet of worker nodes (fleet.py)."""

    min_nodes: int = 1
    max_nodes: int = 20
    #: The longest a job should wait in the queue: the backlog is to drain within it.
    target_wait_s: float = 30.0
    #: Jobs one node is assumed to clear per target wait before any is measured.
    backlog_per_node: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FleetPolicy:
        """Read the ``MAAS_FLEET_*`` variables."""
        d = cls()
        policy = cls(
            min_nodes=_int(env, "MAAS_FLEET_MIN_NODES", d.min_nodes, minimum=0),
            max_nodes=_int(env, "MAAS_FLEET_MAX_NODES", d.max_nodes),
            target_wait_s=_float(env, "MAAS_FLEET_TARGET_WAIT_S", d.target_wait_s, 0.1, 86400),
            backlog_per_node=_int(env, "MAAS_FLEET_BACKLOG_PER_NODE", d.backlog_per_node))
        if policy.min_nodes > policy.max_nodes:
            raise ConfigError("MAAS_FLEET_MIN_NODES must be <= MAAS_FLEET_MAX_NODES")
        return policy


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Deployment settings; build with `Settings.from_env`."""

    broker_url: str = field(default=DEFAULT_BROKER_URL, repr=False)
    result_backend: str = field(default=DEFAULT_BROKER_URL, repr=False)
    flower_basic_auth: str | None = field(default=None, repr=False)
    #: Celery remote control on worker nodes (control.py): ``inspect`` answers
    #: the read-only commands only; ``operator`` also obeys shutdown, pool and
    #: consumer changes, rate and time limits.
    remote_control: str = DEFAULT_REMOTE_CONTROL
    soft_time_limit_s: float = DEFAULT_SOFT_TIME_LIMIT_S
    hard_time_limit_s: float = DEFAULT_HARD_TIME_LIMIT_S
    time_limits: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_queue_depth: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(PRIORITIES, DEFAULT_MAX_QUEUE_DEPTH))
    memory_high_water_pct: float = DEFAULT_MEMORY_HIGH_WATER_PCT
    max_memory_per_child_mb: int = DEFAULT_MAX_MEMORY_PER_CHILD_MB
    low_priority_share: float = DEFAULT_LOW_PRIORITY_SHARE
    crypto_backend: str = "auto"
    batching: dict[str, tuple[int, float]] = field(default_factory=dict)
    consumer_batch: int = DEFAULT_CONSUMER_BATCH
    consumer_wait_ms: float = DEFAULT_CONSUMER_WAIT_MS
    keyring_path: Path = field(default_factory=lambda: _default_keyring(os.environ))
    tenant: str | None = None
    model_dir: Path = field(default_factory=lambda: _default_model_dir(os.environ))
    trusted_signers: tuple[Path, ...] = (BUNDLED_SIGNERS_DIR,)
    model_keys_path: Path = field(default_factory=lambda: _default_model_keys(os.environ))
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    diagnostic_models: bool = False
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S
    lease_s: int = DEFAULT_LEASE_S
    audit_maxlen: int = DEFAULT_AUDIT_MAXLEN
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S
    metrics_port: int = DEFAULT_METRICS_PORT
    fleet_metrics_port: int = DEFAULT_FLEET_METRICS_PORT
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    autoscale: AutoscalePolicy = field(default_factory=AutoscalePolicy)
    fleet: FleetPolicy = field(default_factory=FleetPolicy)
    redis_tls: RedisTLS = field(default_factory=RedisTLS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``MAAS_*`` variable; keyword arguments (flags) win over the environment.

        Raises `ConfigError` with one clear line for an invalid value.
        """
        env = os.environ if env is None else env
        broker = _check_url("MAAS_BROKER_URL", overrides.get("broker_url")
                            or env.get("MAAS_BROKER_URL") or DEFAULT_BROKER_URL)
        backend = _check_url("MAAS_RESULT_BACKEND", overrides.get("result_backend")
                             or env.get("MAAS_RESULT_BACKEND") or broker)
        job_ttl = _int(env, "MAAS_JOB_TTL_S", DEFAULT_JOB_TTL_S)
        if job_ttl > MAX_JOB_TTL_S:
            raise ConfigError(f"MAAS_JOB_TTL_S must be <= {MAX_JOB_TTL_S}")
        tls = RedisTLS.from_env(env)
        if tls.configured and not (is_tls_url(broker) or is_tls_url(backend)):
            # Certificates configured for plain connections: the operator
            # believes the traffic is protected and it is not.
            raise ConfigError("MAAS_REDIS_TLS_* is set but neither MAAS_BROKER_URL nor "
                              "MAAS_RESULT_BACKEND is rediss://")
        settings = cls(
            broker_url=broker,
            result_backend=backend,
            keyring_path=Path(env["MAAS_KEYRING"]) if env.get("MAAS_KEYRING")
            else _default_keyring(env),
            tenant=env.get("MAAS_TENANT") or None,
            model_dir=Path(env["MAAS_MODEL_DIR"]) if env.get("MAAS_MODEL_DIR")
            else _default_model_dir(env),
            trusted_signers=_paths(env.get("MAAS_TRUSTED_SIGNERS", ""))
            or (BUNDLED_SIGNERS_DIR,),
            model_keys_path=Path(env["MAAS_MODEL_KEYS"]) if env.get("MAAS_MODEL_KEYS")
            else _default_model_keys(env),
            visibility_timeout_s=_int(env, "MAAS_VISIBILITY_TIMEOUT_S",
                                      DEFAULT_VISIBILITY_TIMEOUT_S),
            diagnostic_models=_flag(env, "MAAS_DIAGNOSTIC_MODELS"),
            job_ttl_s=job_ttl,
            result_ttl_s=_int(env, "MAAS_RESULT_TTL_S", DEFAULT_RESULT_TTL_S),
            max_input_bytes=_int(env, "MAAS_MAX_INPUT_BYTES", DEFAULT_MAX_INPUT_BYTES),
            max_result_bytes=_int(env, "MAAS_MAX_RESULT_BYTES", DEFAULT_MAX_RESULT_BYTES),
            clock_skew_s=_int(env, "MAAS_CLOCK_SKEW_S", DEFAULT_CLOCK_SKEW_S, minimum=0),
            lease_s=_int(env, "MAAS_LEASE_S", DEFAULT_LEASE_S, minimum=3),
            audit_maxlen=_int(env, "MAAS_AUDIT_MAXLEN", DEFAULT_AUDIT_MAXLEN, minimum=100),
            flower_basic_auth=env.get("MAAS_FLOWER_BASIC_AUTH") or None,
            remote_control=_choice(env, "MAAS_REMOTE_CONTROL", REMOTE_CONTROL_MODES),
            sample_interval_s=_float(env, "MAAS_SAMPLE_INTERVAL_S", DEFAULT_SAMPLE_INTERVAL_S,
                                     0.2, 3600),
            metrics_port=_int(env, "MAAS_METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0),
            fleet_metrics_port=_int(env, "MAAS_FLEET_METRICS_PORT", DEFAULT_FLEET_METRICS_PORT,
                                    minimum=0),
            metrics_address=env.get("MAAS_METRICS_ADDRESS") or DEFAULT_METRICS_ADDRESS,
            autoscale=AutoscalePolicy.from_env(env),
            fleet=FleetPolicy.from_env(env),
            redis_tls=tls,
            soft_time_limit_s=_float(env, "MAAS_SOFT_TIME_LIMIT_S", DEFAULT_SOFT_TIME_LIMIT_S,
                                     0.001, 86400),
            hard_time_limit_s=_float(env, "MAAS_HARD_TIME_LIMIT_S", DEFAULT_HARD_TIME_LIMIT_S,
                                     0.001, 86400),
            time_limits=_time_limits(env, "MAAS_TIME_LIMITS"),
            max_queue_depth=_per_priority(env, "MAAS_MAX_QUEUE_DEPTH", DEFAULT_MAX_QUEUE_DEPTH),
            memory_high_water_pct=_float(env, "MAAS_MEMORY_HIGH_WATER_PCT",
                                         DEFAULT_MEMORY_HIGH_WATER_PCT, 1, 100),
            max_memory_per_child_mb=_int(env, "MAAS_MAX_MEMORY_PER_CHILD_MB",
                                         DEFAULT_MAX_MEMORY_PER_CHILD_MB, minimum=0),
            low_priority_share=_float(env, "MAAS_LOW_PRIORITY_SHARE", DEFAULT_LOW_PRIORITY_SHARE,
                                      0, 0.5),
            crypto_backend=_choice(env, "MAAS_CRYPTO_BACKEND",
                                   ("auto", "pycryptodome", "openssl")),
            batching=_batching(env, "MAAS_BATCH"),
            consumer_batch=_int(env, "MAAS_CONSUMER_BATCH", DEFAULT_CONSUMER_BATCH),
            consumer_wait_ms=_float(env, "MAAS_CONSUMER_WAIT_MS", DEFAULT_CONSUMER_WAIT_MS,
                                    0, 1000),
        )
        overrides.pop("broker_url", None)
        overrides.pop("result_backend", None)
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **clean) if clean else settings

    def redis_ssl(self, url: str) -> dict[str, Any] | None:
        """TLS options for a connection to ``url`` (`RedisTLS.options`); None unless rediss://."""
        return self.redis_tls.options() if is_tls_url(url) else None

    def limits_for(self, model: str) -> tuple[float, float]:
        """(soft, hard) time limit in seconds for ``model`` (``name`` or ``name@version``)."""
        name = model.split("@", 1)[0]
        soft, hard = self.time_limits.get(model) or self.time_limits.get(name) or (
            self.soft_time_limit_s, self.hard_time_limit_s)
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
