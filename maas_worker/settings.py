"""Settings: one frozen value built from the environment, once, never at import.

Every ``MAAS_*`` variable is read here and nowhere else; docs/configuration.md
lists them all. Command-line flags override by passing keyword arguments to
`Settings.from_env`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT_S = 600
DEFAULT_JOB_TTL_S = 3600
DEFAULT_RESULT_TTL_S = 3600
DEFAULT_MAX_INPUT_BYTES = 1024 * 1024
DEFAULT_MAX_RESULT_BYTES = 4 * 1024 * 1024
DEFAULT_CLOCK_SKEW_S = 30
#: A claim holder is presumed dead when its liveness key is this old.
DEFAULT_LEASE_S = 15
DEFAULT_AUDIT_MAXLEN = 10_000
#: Longest lifetime a client may ask for; bounds how long replay state is kept.
MAX_JOB_TTL_S = 7 * 24 * 3600

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
QUEUE_PREFIX = "maas."


def queue_for(priority: str) -> str:
    """Return the Celery queue name that carries jobs of ``priority``."""
    if priority not in PRIORITIES:
        raise ConfigError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")
    return QUEUE_PREFIX + priority


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


def _check_url(name: str, url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in {"redis", "rediss", "redis+socket", "unix"}:
        what = "broker" if name == "MAAS_BROKER_URL" else "result backend"
        raise ConfigError(f"the {what} URL ({name}) must be redis://, rediss:// or "
                          "redis+socket://")
    return url


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Deployment settings; build with `Settings.from_env`."""

    broker_url: str = field(default=DEFAULT_BROKER_URL, repr=False)
    result_backend: str = field(default=DEFAULT_BROKER_URL, repr=False)
    flower_basic_auth: str | None = field(default=None, repr=False)
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
        )
        overrides.pop("broker_url", None)
        overrides.pop("result_backend", None)
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **clean) if clean else settings

    @property
    def max_envelope_chars(self) -> int:
        """Largest request a worker accepts: base64 of the input plus header and tags."""
        return (self.max_input_bytes + 1024) * 4 // 3 + 4
