"""Keyring: per-tenant root secrets with versions and states, and the keys derived from them.

A tenant has numbered key versions, each in one state:

``decrypt-only``
    accepted for opening, never used to seal a new job (step 1 of a rotation,
    and where the old primary goes after one, so jobs in flight still open);
``primary``
    the one version a client seals new jobs with (at most one per tenant);
``retired``
    kept only for the record; envelopes under it are refused (``unknown_key``).

Each version holds a 32-byte root secret from the OS RNG. HKDF-SHA256 derives
three independent keys from it (see docs/envelope.md), cached per process.

The file is JSON, written atomically with mode 0600 and refused when group or
others can read it. ``keys list`` and every ``repr`` here omit secrets.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from maas_worker.crypto import primitives
from maas_worker.errors import KeyringError, UnknownTenant
from maas_worker.files import write_atomic
from maas_worker.protocol import MAX_TENANT_WEIGHT, PRIORITIES, TENANT_RE

KeyState = Literal["decrypt-only", "primary", "retired"]
KEY_STATES: tuple[KeyState, ...] = ("decrypt-only", "primary", "retired")
SECRET_BYTES = 32
KEYRING_FORMAT = 1
#: A model signer's key id (see maas_worker.models.signing.key_id).
SIGNER_ID_RE = re.compile(r"[0-9a-f]{16,64}")
MAX_KEY_VERSION = 2**32 - 1  # a u32 in the envelope header
#: HKDF "info" labels: one per derived key, so no key is ever used for two jobs.
INFO_REQUEST_ENC = b"maas-worker/v1/request-enc"
INFO_RESULT_ENC = b"maas-worker/v1/result-enc"
INFO_MAC = b"maas-worker/v1/mac"
#: How often a long-running process looks at the keyring file for changes.
RELOAD_CHECK_S = 1.0


def check_tenant_name(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant name, else raise `KeyringError`."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise KeyringError(
            f"invalid tenant name {tenant!r}: use 1-63 of a-z 0-9 . _ - (starting alphanumeric)"
        )
    return tenant


@dataclass(frozen=True)
class DerivedKeys:
    """The three keys HKDF derives from one root secret."""

    request_enc: bytes = field(repr=False)
    result_enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)


def _info(label: bytes, tenant: str, version: int) -> bytes:
    return label + b"\x00" + tenant.encode() + b"\x00" + version.to_bytes(4, "big")


@lru_cache(maxsize=1024)
def derive_keys(secret: bytes, tenant: str, version: int) -> DerivedKeys:
    """Derive (and cache) the request, result and MAC keys of one key version."""

    def one(label: bytes) -> bytes:
        return primitives.DEFAULT.hkdf_sha256(secret, info=_info(label, tenant, version))

    return DerivedKeys(one(INFO_REQUEST_ENC), one(INFO_RESULT_ENC), one(INFO_MAC))


@dataclass(frozen=True)
class KeyVersion:
    """One numbered root secret of a tenant."""

    version: int
    state: KeyState
    secret: bytes = field(repr=False)
    created_at: str

    def keys(self, tenant: str) -> DerivedKeys:
        """The derived keys of this version (cached)."""
        return derive_keys(self.secret, tenant, self.version)


@dataclass(frozen=True)
class TenantPolicy:
    """What a tenant may ask for; kept beside its keys.

    ``allowed_models`` of ``None`` allows every model the workers serve.
    Quotas (0 = unlimited): ``rate_per_s`` jobs per second with bursts of up
    to ``burst`` jobs (a token bucket), and at most ``max_in_flight`` jobs
    running at once (workers enforce both as they start a job; a client's
    advisory check also counts its tenant's queued jobs, quota.py).
    """

    allowed_models: tuple[str, ...] | None = None
    max_priority: str = "high"
    rate_per_s: float = 0.0
    burst: int = 0
    max_in_flight: int = 0

    @property
    def limited(self) -> bool:
        """True if any quota applies (so admission must be checked in Redis)."""
        return self.rate_per_s > 0 or self.max_in_flight > 0

    @property
    def effective_burst(self) -> int:
        """The bucket size: ``burst``, or one second's worth of jobs (at least 1)."""
        return self.burst or max(1, int(self.rate_per_s))

    #: Key ids of the model signers whose (repository) models this tenant may
    #: run; ``None`` allows every trusted signer. Built-in models are unaffected.
    allowed_signers: tuple[str, ...] | None = None
    #: Fair share: takes per turn of the tenant ring while it has work, 1 to
    #: `MAX_TENANT_WEIGHT` (docs/compute.md, "Fair share across tenants").
    weight: int = 1

    def allows_model(self, model: str) -> bool:
        """True if the policy admits ``model`` (``name`` or ``name@version``)."""
        if self.allowed_models is None:
            return True
        name = model.split("@", 1)[0]
        return model in self.allowed_models or name in self.allowed_models

    def allows_priority(self, priority: str) -> bool:
        """True if ``priority`` is not above the tenant's highest allowed priority."""
        return PRIORITIES.index(priority) >= PRIORITIES.index(self.max_priority)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_priority": self.max_priority}
        if self.allowed_models is not None:
            out["allowed_models"] = list(self.allowed_models)
        if self.allowed_signers is not None:
            out["allowed_signers"] = list(self.allowed_signers)
        if self.rate_per_s:
            out["rate_per_s"] = self.rate_per_s
            out["burst"] = self.effective_burst
        if self.max_in_flight:
            out["max_in_flight"] = self.max_in_flight
        if self.weight != 1:
            out["weight"] = self.weight
        return out

    @classmethod
    def from_json(cls, raw: Any) -> TenantPolicy:
        """Parse a policy object; `KeyringError` if it is malformed."""
        policy = cls._from_json(raw)
        signers = raw.get("allowed_signers") if isinstance(raw, dict) else None
        if signers is None:
            return policy
        if not (
            isinstance(signers, list)
            and all(isinstance(s, str) and SIGNER_ID_RE.fullmatch(s) for s in signers)
        ):
            raise KeyringError("allowed_signers must be a list of signer key ids (hex)")
        return replace(policy, allowed_signers=tuple(signers))

    @classmethod
    def _from_json(cls, raw: Any) -> TenantPolicy:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise KeyringError("tenant policy must be an object")
        models = raw.get("allowed_models")
        max_priority = raw.get("max_priority", "high")
        if max_priority not in PRIORITIES:
            raise KeyringError(f"invalid max_priority {max_priority!r}")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise KeyringError("allowed_models must be a list of model names")
        quota: dict[str, Any] = {}
        for name, kind in (("rate_per_s", float), ("burst", int), ("max_in_flight", int)):
            value = raw.get(name, 0)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value < 0
                or (kind is int and not float(value).is_integer())
            ):
                raise KeyringError(f"{name} must be a non-negative {kind.__name__}")
            quota[name] = kind(value)
        weight = raw.get("weight", 1)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int)
            or not 1 <= weight <= MAX_TENANT_WEIGHT
        ):
            raise KeyringError(f"weight must be a whole number from 1 to {MAX_TENANT_WEIGHT}")
        return cls(
            tuple(models) if models is not None else None, max_priority, **quota, weight=weight
        )


@dataclass(frozen=True)
class Tenant:
    """A tenant's key versions and policy."""

    name: str
    versions: tuple[KeyVersion, ...]
    policy: TenantPolicy = TenantPolicy()

    def primary(self) -> KeyVersion:
        """The version new jobs are sealed with."""
        for kv in self.versions:
            if kv.state == "primary":
                return kv
        raise UnknownTenant(f"tenant {self.name!r} has no primary key")

    def usable(self, version: int) -> KeyVersion | None:
        """The version if it may open envelopes (primary or decrypt-only), else None."""
        for kv in self.versions:
            if kv.version == version:
                return kv if kv.state != "retired" else None
        return None


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Keyring:
    """All tenants known to this process. Immutable: changes return a new keyring."""

    tenants: dict[str, Tenant] = field(default_factory=dict)

    # -- lookups -----------------------------------------------------------
    def tenant(self, name: str) -> Tenant:
        """The tenant, or `UnknownTenant`."""
        try:
            return self.tenants[name]
        except KeyError:
            raise UnknownTenant(f"unknown tenant {name!r} (not in the keyring)") from None

    def usable(self, tenant: str, version: int) -> KeyVersion | None:
        """The key version that may open an envelope, or None (unknown/retired)."""
        t = self.tenants.get(tenant)
        return t.usable(version) if t is not None else None

    def summary(self) -> list[dict[str, Any]]:
        """One row per tenant and version, never a secret."""
        return [
            {
                "tenant": t.name,
                "version": kv.version,
                "state": kv.state,
                "created_at": kv.created_at,
            }
            for t in sorted(self.tenants.values(), key=lambda t: t.name)
            for kv in t.versions
        ]

    # -- changes -----------------------------------------------------------
    def with_new_tenant(self, name: str, policy: TenantPolicy | None = None) -> Keyring:
        """Add ``name`` with a fresh primary key version 1."""
        check_tenant_name(name)
        if name in self.tenants:
            raise KeyringError(f"tenant {name!r} already exists; use `keys rotate`")
        kv = KeyVersion(1, "primary", secrets.token_bytes(SECRET_BYTES), _now_iso())
        tenants = dict(self.tenants)
        tenants[name] = Tenant(name, (kv,), policy or TenantPolicy())
        return Keyring(tenants)

    def with_rotation(self, name: str, *, stage: bool = False) -> tuple[Keyring, int]:
        """Add a new version; unless ``stage``, promote it at once.

        Promoting demotes the old primary to decrypt-only, so jobs sealed
        under it (in flight) still open and their results still reach clients.
        """
        t = self.tenant(name)
        new_version = max(kv.version for kv in t.versions) + 1
        kv = KeyVersion(new_version, "decrypt-only", secrets.token_bytes(SECRET_BYTES), _now_iso())
        ring = self._replace_tenant(replace(t, versions=(*t.versions, kv)))
        if not stage:
            ring = ring.with_state(name, new_version, "primary")
        return ring, new_version

    def with_state(self, name: str, version: int, state: KeyState) -> Keyring:
        """Set one version's state (promote, demote, retire)."""
        if state not in KEY_STATES:
            raise KeyringError(f"invalid key state {state!r}")
        t = self.tenant(name)
        current = next((kv for kv in t.versions if kv.version == version), None)
        if current is None:
            raise KeyringError(f"tenant {name!r} has no key version {version}")
        if current.state == "retired" and state != "retired":
            # A retired secret may have been exposed since; never bring it back.
            raise KeyringError(
                f"tenant {name!r} key version {version} is retired for good; "
                "rotate to a new version instead"
            )
        versions = []
        for kv in t.versions:
            if kv.version == version:
                versions.append(replace(kv, state=state))
            elif state == "primary" and kv.state == "primary":
                versions.append(replace(kv, state="decrypt-only"))
            else:
                versions.append(kv)
        return self._replace_tenant(replace(t, versions=tuple(versions)))

    def with_policy(self, name: str, policy: TenantPolicy) -> Keyring:
        """Replace a tenant's policy."""
        return self._replace_tenant(replace(self.tenant(name), policy=policy))

    def only(self, name: str) -> Keyring:
        """A keyring holding just one tenant (what a client of that tenant needs)."""
        return Keyring({name: self.tenant(name)})

    def _replace_tenant(self, t: Tenant) -> Keyring:
        tenants = dict(self.tenants)
        tenants[t.name] = t
        return Keyring(tenants)

    # -- (de)serialisation ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The file's JSON document (contains secrets: never print it)."""
        return {
            "format": KEYRING_FORMAT,
            "tenants": {
                t.name: {
                    "policy": t.policy.to_json(),
                    "keys": [
                        {
                            "version": kv.version,
                            "state": kv.state,
                            "secret": base64.b64encode(kv.secret).decode(),
                            "created_at": kv.created_at,
                        }
                        for kv in t.versions
                    ],
                }
                for t in self.tenants.values()
            },
        }

    @classmethod
    def from_json(cls, doc: Any) -> Keyring:
        """Parse and validate a keyring document."""
        if not isinstance(doc, dict) or doc.get("format") != KEYRING_FORMAT:
            raise KeyringError(f"not a maas-worker keyring (format {KEYRING_FORMAT} expected)")
        tenants: dict[str, Tenant] = {}
        raw_tenants = doc.get("tenants")
        if not isinstance(raw_tenants, dict):
            raise KeyringError("keyring has no tenants object")
        for name, raw in raw_tenants.items():
            check_tenant_name(name)
            if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
                raise KeyringError(f"tenant {name!r}: keys must be a list")
            versions = []
            for k in raw["keys"]:
                try:
                    secret = base64.b64decode(k["secret"], validate=True)
                    kv = KeyVersion(
                        int(k["version"]), k["state"], secret, str(k.get("created_at", ""))
                    )
                except (KeyError, TypeError, ValueError):
                    raise KeyringError(f"tenant {name!r}: malformed key entry") from None
                if (
                    kv.state not in KEY_STATES
                    or len(secret) != SECRET_BYTES
                    or not 1 <= kv.version <= MAX_KEY_VERSION
                ):
                    raise KeyringError(f"tenant {name!r}: invalid key version {kv.version}")
                versions.append(kv)
            if not versions:
                raise KeyringError(f"tenant {name!r} has no keys")
            if sum(kv.state == "primary" for kv in versions) > 1:
                raise KeyringError(f"tenant {name!r} has more than one primary key")
            if len({kv.version for kv in versions}) != len(versions):
                raise KeyringError(f"tenant {name!r} has duplicate key versions")
            tenants[name] = Tenant(name, tuple(versions), TenantPolicy.from_json(raw.get("policy")))
        return cls(tenants)


# -- the file ---------------------------------------------------------------
def check_permissions(path: Path) -> os.stat_result:
    """Stat ``path`` and refuse it if group or others have any access."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyringError(
            f"keyring {path} not found: create one with `maas-worker keys init --tenant NAME` "
            "or set MAAS_KEYRING"
        ) from None
    except OSError as exc:
        raise KeyringError(f"keyring {path} unreadable: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):  # before the mode: no chmod makes a folder a keyring
        raise KeyringError(f"keyring {path} is a directory, not a keyring file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyringError(
            f"keyring {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
        )
    return st


def read_private_json(path: Path) -> Any:
    """The JSON document in key file ``path``, refused (`KeyringError`) unless the
    file is private to its owner. Every key file (keyring, gateway keyring) is read
    here."""
    check_permissions(path)
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise KeyringError(f"keyring {path} unreadable: {exc.strerror}") from None
    except ValueError:
        raise KeyringError(f"keyring {path} is not valid JSON") from None


def write_private_json(path: Path, doc: Any) -> None:
    """Write ``doc`` to key file ``path`` atomically (temp file + fsync + rename), mode 0600."""
    write_atomic(path, json.dumps(doc, indent=2).encode(), private=True)


def load_keyring(path: Path) -> Keyring:
    """Read the keyring file, refusing it if it is not private to its owner."""
    return Keyring.from_json(read_private_json(path))


def save_keyring(path: Path, ring: Keyring) -> None:
    """Write the keyring atomically (temp file + fsync + rename), mode 0600."""
    write_private_json(path, ring.to_json())


class KeyringEditor:
    """The keyring inside one `edit_keyring` block: assign a new `ring` to have it saved.

    Keyrings are immutable; an edit builds a new one (``with_rotation`` and so
    on) and puts it here.
    """

    def __init__(self, ring: Keyring) -> None:
        #: The keyring as loaded, until the caller replaces it.
        self.ring = ring
        self._loaded = ring

    @property
    def changed(self) -> bool:
        """True once `ring` was replaced (the block then ends by saving it)."""
        return self.ring is not self._loaded


@contextlib.contextmanager
def edit_keyring(path: Path, *, create: bool = False) -> Iterator[KeyringEditor]:
    """Lock, load, let the caller replace ``editor.ring``, then save it atomically.

    The lock file serialises concurrent ``keys`` commands on one host. Nothing is
    written when the ring is not replaced or the block raises.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        editor = KeyringEditor(load_keyring(path) if (path.exists() or not create) else Keyring())
        yield editor
        if editor.changed:
            save_keyring(path, editor.ring)
    finally:
        os.close(fd)


class KeyringSource:
    """The keyring of a long-running process, reloaded when the file changes.

    A worker keeps serving with the last good keyring if a reload fails (a
    half-edited file by hand, say) and retries on the next check.
    """

    def __init__(self, path: Path, *, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self._path = path
        self._interval = check_interval_s
        self._lock = threading.Lock()
        self._ring = load_keyring(path)
        self._stamp = self._stat_stamp()
        self._checked = time.monotonic()

    def _stat_stamp(self) -> tuple[int, int, int]:
        st = self._path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Check the file now, whatever the interval; True if a changed keyring loaded.

        For an envelope under a key this process does not hold: the operator
        may have added its tenant or rotated a moment ago (`keys init`, `keys
        rotate`), and a refusal is final, so the file is looked at before
        refusing. A ``stat`` each time (a flood of unknown keys costs that);
        the file is read only when it changed.
        """
        with self._lock:
            self._checked = time.monotonic()
            try:
                stamp = self._stat_stamp()
                if stamp == self._stamp:
                    return False
                self._ring = load_keyring(self._path)
                self._stamp = stamp
            except (OSError, KeyringError):
                return False  # keep the last good keyring
            return True

    def get(self) -> Keyring:
        """The current keyring (re-read at most every ``check_interval_s``)."""
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._ring
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat_stamp()
                if stamp != self._stamp:
                    self._ring = load_keyring(self._path)
                    self._stamp = stamp
            except (OSError, KeyringError):
                pass  # keep the last good keyring; the next check tries again
        return self._ring
