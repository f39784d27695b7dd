"""The gateway's keyring: MAC keys and bearer-token hashes, never an encryption key.

An HTTP gateway (``maas-worker gateway``, docs/gateway.md) authenticates
envelopes sealed by its callers, and must not be able to read them. It is
given a **gateway keyring**, written by ``maas-worker keys export --mac-only``
from the full keyring, that holds per tenant and key version only:

* the HMAC key ``mac`` (HKDF label ``maas-worker/v1/mac``, docs/envelope.md):
  it checks an envelope's outer MAC and signs cancel requests, and opens
  nothing: AES-GCM is keyed by ``request_enc``/``result_enc``, which HKDF
  derives from the root secret, not from ``mac``; HKDF-Expand is one-way, so
  neither they nor the root secret follow from ``mac``;
* the SHA-256 of the tenant's **bearer token** (`bearer_token`): the gateway
  compares hashes, so a copy of its keyring yields no credential to call it with.

Whoever takes a gateway host can therefore forge MACs (so a worker would still
refuse their messages at the GCM tag, ``tampered``) and cancel jobs, but
decrypts nothing, in flight or at rest, and learns no root secret.

The file is JSON like the full keyring (mode 0600, refused when group or others
may read it), with ``"kind": "gateway"`` so neither can be mistaken for the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_worker.crypto import primitives
from maas_worker.errors import KeyringError
from maas_worker.tenancy.keyring import (
    KEY_STATES,
    KEYRING_FORMAT,
    MAX_KEY_VERSION,
    RELOAD_CHECK_S,
    Keyring,
    KeyState,
    TenantPolicy,
    check_tenant_name,
    read_private_json,
    write_private_json,
)

#: HKDF label of the bearer token a tenant presents to the gateway (its own label:
#: the token is no key of the envelope, and knowing it opens nothing).
INFO_GATEWAY_BEARER = b"maas-worker/v1/gateway-bearer"
#: ``kind`` of a gateway keyring document.
GATEWAY_KIND = "gateway"
_TOKEN_BYTES = 32


def _info(label: bytes, tenant: str, version: int) -> bytes:
    return label + b"\x00" + tenant.encode() + b"\x00" + version.to_bytes(4, "big")


def bearer_secret(secret: bytes, tenant: str, version: int) -> bytes:
    """The 32 bytes of ``tenant``'s bearer token for key version ``version``.

    ``HKDF-SHA256(root secret, salt empty, info = "maas-worker/v1/gateway-bearer"
    || 0x00 || tenant || 0x00 || u32(version), L = 32)``: the envelope's
    derivation with its own label (docs/gateway.md has a test vector).
    """
    return primitives.DEFAULT.hkdf_sha256(secret, info=_info(INFO_GATEWAY_BEARER, tenant, version))


def bearer_token(secret: bytes, tenant: str, version: int) -> str:
    """The ``Authorization: Bearer`` value: ``<tenant>.<version>.<base64url, unpadded>``."""
    raw = bearer_secret(secret, tenant, version)
    return f"{tenant}.{version}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


def token_hash(token: str) -> bytes:
    """What the gateway keeps of a bearer token: the SHA-256 of its text."""
    return hashlib.sha256(token.encode()).digest()


class _NoEncryptionKey:
    """The encryption keys of a gateway key version: there are none."""

    @property
    def request_enc(self) -> bytes:
        raise KeyringError("a gateway keyring holds no encryption key")

    @property
    def result_enc(self) -> bytes:
        raise KeyringError("a gateway keyring holds no encryption key")


@dataclass(frozen=True)
class MacOnlyKeys(_NoEncryptionKey):
    """The keys an envelope check needs, of which only ``mac`` exists here."""

    mac: bytes = field(repr=False)


@dataclass(frozen=True)
class GatewayKey:
    """One key version of a tenant, as a gateway holds it."""

    version: int
    state: KeyState
    mac: bytes = field(repr=False)
    bearer_sha256: bytes = field(repr=False)
    _keys: MacOnlyKeys = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Made once: every envelope checked asks for them.
        object.__setattr__(self, "_keys", MacOnlyKeys(self.mac))

    def keys(self, tenant: str) -> MacOnlyKeys:
        """The keys of this version (``tenant`` is bound in already: the MAC key is derived)."""
        return self._keys


@dataclass(frozen=True)
class GatewayTenant:
    """A tenant's gateway key versions and its policy."""

    name: str
    versions: tuple[GatewayKey, ...]
    policy: TenantPolicy = field(default_factory=TenantPolicy)

    def primary(self) -> GatewayKey:
        """The version cancel requests are signed with."""
        for kv in self.versions:
            if kv.state == "primary":
                return kv
        raise KeyringError(f"tenant {self.name!r} has no primary key")

    def usable(self, version: int) -> GatewayKey | None:
        """The version if it may check envelopes (not retired), else None."""
        for kv in self.versions:
            if kv.version == version:
                return kv if kv.state != "retired" else None
        return None


@dataclass(frozen=True)
class GatewayKeyring:
    """Every tenant a gateway serves: MAC keys, bearer hashes, policies."""

    tenants: dict[str, GatewayTenant] = field(default_factory=dict)

    def usable(self, tenant: str, version: int) -> GatewayKey | None:
        """The key version an envelope names, or None (a `KeyLookup` for `verify`)."""
        t = self.tenants.get(tenant)
        return t.usable(version) if t is not None else None

    def bearer_tenant(self, token: str) -> str | None:
        """The tenant ``token`` authenticates, or None; constant time in the secret part.

        The tenant and version are read from the token's text; its hash is then
        compared with `hmac.compare_digest`, against a dummy when they name no
        key, so a wrong token costs the same whatever it names.
        """
        tenant, _, rest = token.partition(".")
        version_text, _, _ = rest.partition(".")
        kv = None
        if version_text.isascii() and version_text.isdigit() and len(version_text) <= 10:
            kv = self.usable(tenant, int(version_text))
        expected = kv.bearer_sha256 if kv is not None else b"\x00" * 32
        ok = hmac.compare_digest(expected, token_hash(token))
        return tenant if ok and kv is not None else None

    @classmethod
    def from_keyring(cls, ring: Keyring) -> GatewayKeyring:
        """Derive a gateway keyring from a full one (what ``keys export --mac-only`` writes)."""
        tenants = {}
        for t in ring.tenants.values():
            versions = tuple(
                GatewayKey(
                    kv.version,
                    kv.state,
                    kv.keys(t.name).mac,
                    token_hash(bearer_token(kv.secret, t.name, kv.version)),
                )
                for kv in t.versions
            )
            tenants[t.name] = GatewayTenant(t.name, versions, t.policy)
        return cls(tenants)

    def to_json(self) -> dict[str, Any]:
        """The file's document (MAC keys: keep it private, though it opens nothing)."""
        return {
            "format": KEYRING_FORMAT,
            "kind": GATEWAY_KIND,
            "tenants": {
                t.name: {
                    "policy": t.policy.to_json(),
                    "keys": [
                        {
                            "version": kv.version,
                            "state": kv.state,
                            "mac": base64.b64encode(kv.mac).decode(),
                            "bearer_sha256": kv.bearer_sha256.hex(),
                        }
                        for kv in t.versions
                    ],
                }
                for t in self.tenants.values()
            },
        }

    @classmethod
    def from_json(cls, doc: Any) -> GatewayKeyring:
        """Parse and validate a gateway keyring document; `KeyringError` if it is not one."""
        if (
            not isinstance(doc, dict)
            or doc.get("format") != KEYRING_FORMAT
            or doc.get("kind") != GATEWAY_KIND
        ):
            raise KeyringError(
                "not a gateway keyring (write one with `maas-worker keys export --mac-only`)"
            )
        raw_tenants = doc.get("tenants")
        if not isinstance(raw_tenants, dict):
            raise KeyringError("gateway keyring has no tenants object")
        tenants = {}
        for name, raw in raw_tenants.items():
            check_tenant_name(name)
            if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
                raise KeyringError(f"tenant {name!r}: keys must be a list")
            versions = []
            for k in raw["keys"]:
                try:
                    kv = GatewayKey(
                        int(k["version"]),
                        k["state"],
                        base64.b64decode(k["mac"], validate=True),
                        bytes.fromhex(k["bearer_sha256"]),
                    )
                except (KeyError, TypeError, ValueError):
                    raise KeyringError(f"tenant {name!r}: malformed key entry") from None
                if (
                    kv.state not in KEY_STATES
                    or len(kv.mac) != 32
                    or len(kv.bearer_sha256) != 32
                    or not 1 <= kv.version <= MAX_KEY_VERSION
                ):
                    raise KeyringError(f"tenant {name!r}: invalid key version {kv.version}")
                versions.append(kv)
            tenants[name] = GatewayTenant(
                name, tuple(versions), TenantPolicy.from_json(raw.get("policy"))
            )
        return cls(tenants)


def load_gateway_keyring(path: Path) -> GatewayKeyring:
    """Read a gateway keyring file, refusing it if it is not private to its owner."""
    if not path.exists():
        raise KeyringError(
            f"gateway keyring {path} not found: write one with `maas-worker keys export "
            f"--mac-only --out {path}` or set MAAS_GATEWAY_KEYRING"
        )
    return GatewayKeyring.from_json(read_private_json(path))


def save_gateway_keyring(path: Path, ring: GatewayKeyring) -> None:
    """Write a gateway keyring atomically, mode 0600."""
    write_private_json(path, ring.to_json())


class GatewayKeyringSource:
    """The gateway keyring of a running gateway, reloaded when its file changes.

    A failed reload (a half-written file) keeps the last good keyring; the
    next check tries again. One event loop reads it: no lock.
    """

    def __init__(self, path: Path, *, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self._path = path
        self._interval = check_interval_s
        self._ring = load_gateway_keyring(path)
        self._stamp = self._stat_stamp()
        self._checked = time.monotonic()

    def _stat_stamp(self) -> tuple[int, int, int]:
        st = self._path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self) -> GatewayKeyring:
        """The current gateway keyring (re-read at most every ``check_interval_s``)."""
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._ring
        self._checked = now
        try:
            stamp = self._stat_stamp()
            if stamp != self._stamp:
                self._ring = load_gateway_keyring(self._path)
                self._stamp = stamp
        except (OSError, KeyringError):
            pass  # keep the last good keyring
        return self._ring
