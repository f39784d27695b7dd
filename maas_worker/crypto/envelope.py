"""Envelope suite v1: AES-256-GCM inside, HMAC-SHA256 outside, one version byte.

Wire layout (all integers big-endian; docs/envelope.md is the full spec)::

    header  = version:u8 type:u8 header_len:u16 key_version:u32
              issued_at_ms:u64 expires_at_ms:u64 priority:u8
              tenant:str8 job_id:str8 task:str8 model:str8
              [request_hash:32 bytes, results only]
    body    = nonce:12 ciphertext tag:16
    mac     = HMAC-SHA256(mac_key, header || body)          (32 bytes)
    envelope = header || body || mac

The header is the GCM associated data byte for byte, and the MAC covers it
too, so every field that steers routing or policy is authenticated twice.
Opening checks, in order and failing closed: size, version and type, key
lookup, HMAC (constant time), time window; only then may a caller claim the
job and decrypt. Every failure is `InvalidEnvelope`; the worker reads the
audit reason from `EnvelopeRejected.reason`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from maas_worker.crypto.primitives import DEFAULT, CryptoBackend
from maas_worker.errors import EnvelopeRejected, InvalidEnvelope
from maas_worker.protocol import PRIORITY_CODES, AuditReason

VERSION = 0x01
TYPE_REQUEST = 0x01
TYPE_RESULT = 0x02
Kind = Literal["request", "result"]
_TYPE_OF: dict[Kind, int] = {"request": TYPE_REQUEST, "result": TYPE_RESULT}
_PRIORITY_NAMES = {v: k for k, v in PRIORITY_CODES.items()}

NONCE_BYTES = 12
TAG_BYTES = 16
MAC_BYTES = 32
HASH_BYTES = 32
_FIXED = struct.Struct(">BBHIQQB")  # version type header_len key_version iat exp priority
_unpack_fixed = _FIXED.unpack_from
_FIXED_SIZE = _FIXED.size
_KIND_OF: dict[int, Kind] = {TYPE_REQUEST: "request", TYPE_RESULT: "result"}
#: An instance of a frozen dataclass not yet initialised: its fields are then set
#: at once (`parse_unverified_header`, `verify`).
_allocate = object.__new__
MAX_STR = 255
#: Smallest possible envelope: fixed part, four 1-byte strings, nonce, tag, mac.
MIN_ENVELOPE = _FIXED.size + 4 * 2 + NONCE_BYTES + TAG_BYTES + MAC_BYTES
#: The clock-skew grace past an envelope's expiry is at most this share of its
#: lifetime: a 2 s ttl is 2.2 s at most, not 32 s (docs/envelope.md 4).
EXPIRY_GRACE_SHARE = 10


# What the envelope needs of a keyring, as protocols: the format layer reads no
# keyring file (tenancy.keyring's Keyring, KeyVersion and DerivedKeys fit them).
class EnvelopeKeys(Protocol):
    """The three keys of one tenant key version (HKDF-derived; docs/envelope.md)."""

    @property
    def request_enc(self) -> bytes:
        """AES-256-GCM key of requests."""

    @property
    def result_enc(self) -> bytes:
        """AES-256-GCM key of results."""

    @property
    def mac(self) -> bytes:
        """HMAC-SHA256 key of both."""


class UsableKey(Protocol):
    """A key version that may open envelopes."""

    def keys(self, tenant: str) -> EnvelopeKeys:
        """Its derived keys for ``tenant``."""


class KeyLookup(Protocol):
    """Finds the key version an envelope names (``tenancy.keyring.Keyring`` is one)."""

    def usable(self, tenant: str, version: int) -> UsableKey | None:
        """The version if it may open envelopes; None if unknown or retired."""


def now_ms() -> int:
    """Current Unix time in milliseconds (the envelope's clock unit)."""
    return time.time_ns() // 1_000_000


def expiry_grace_ms(lifetime_ms: int, skew_ms: int) -> int:
    """How long past its ``expires_at_ms`` an envelope of ``lifetime_ms`` still opens.

    The clock skew tolerated, but at most a tenth of the lifetime its sender
    chose: the skew absorbs a sender whose clock is behind, without turning a
    short lifetime into a long one (``issued_at_ms`` in the future still gets
    the whole skew).
    """
    return max(0, min(skew_ms, lifetime_ms // EXPIRY_GRACE_SHARE))


@dataclass(frozen=True)
class Header:
    """The authenticated fields of an envelope. ``raw`` is the exact bytes sent."""

    kind: Kind
    key_version: int
    issued_at_ms: int
    expires_at_ms: int
    priority: str
    tenant: str
    job_id: str
    task: str
    model: str
    request_hash: bytes | None = None
    raw: bytes = field(default=b"", repr=False, compare=False)

    def digest(self) -> bytes:
        """SHA-256 of the header bytes: what a result binds itself to.

        Computed from the fields (the encoding is canonical: a parsed header
        re-encodes to exactly its ``raw`` bytes), so a modified copy made with
        `dataclasses.replace` can never hash stale bytes.
        """
        return hashlib.sha256(encode_header(self)).digest()


def _str8(value: str, name: str) -> bytes:
    data = value.encode()
    if not 0 < len(data) <= MAX_STR:
        raise ValueError(f"{name} must be 1..{MAX_STR} bytes of UTF-8")
    return bytes((len(data),)) + data


def encode_header(h: Header) -> bytes:
    """Serialise a header (``raw`` is ignored); programmer errors raise ValueError."""
    if h.priority not in PRIORITY_CODES:
        raise ValueError(f"unknown priority {h.priority!r}")
    if (h.kind == "result") != (h.request_hash is not None):
        raise ValueError("results, and only results, carry a request hash")
    if h.request_hash is not None and len(h.request_hash) != HASH_BYTES:
        raise ValueError("request_hash must be 32 bytes")
    if not 0 <= h.key_version < 2**32:
        raise ValueError("key_version must fit in 32 bits")
    if not (0 <= h.issued_at_ms < 2**64 and 0 <= h.expires_at_ms < 2**64):
        raise ValueError("timestamps must be non-negative milliseconds below 2**64")
    tail = b"".join(
        (
            _str8(h.tenant, "tenant"),
            _str8(h.job_id, "job_id"),
            _str8(h.task, "task"),
            _str8(h.model, "model"),
            h.request_hash or b"",
        )
    )
    size = _FIXED.size + len(tail)
    fixed = _FIXED.pack(
        VERSION,
        _TYPE_OF[h.kind],
        size,
        h.key_version,
        h.issued_at_ms,
        h.expires_at_ms,
        PRIORITY_CODES[h.priority],
    )
    return fixed + tail


def sealed_header_digest(envelope: bytes) -> bytes:
    """`Header.digest` of the header an envelope of ours was sealed with, read from its bytes.

    For the sender of a fresh `seal` (its header bytes are ``encode_header``'s):
    hashing them where they lie costs a slice, not a second encoding.
    Never for untrusted bytes: nothing here is checked.
    """
    size = _FIXED.unpack_from(envelope, 0)[2]
    return hashlib.sha256(memoryview(envelope)[:size]).digest()


def parse_unverified_header(data: bytes) -> Header:
    """Parse the header of untrusted bytes WITHOUT authenticating anything.

    Only for routing the checks (which key, which time window); nothing it
    returns may be trusted until `verify` has checked the MAC.
    """
    try:
        version, type_, size, kver, iat, exp, prio = _unpack_fixed(data, 0)
        kind = _KIND_OF.get(type_)
        if (
            version != VERSION
            or kind is None
            or prio not in _PRIORITY_NAMES
            or size > len(data) - NONCE_BYTES - TAG_BYTES - MAC_BYTES
        ):
            raise EnvelopeRejected(AuditReason.MALFORMED)
        # Four str8 fields: tenant, job id, task, model. str(..., "utf-8") reads
        # bytes and memoryviews alike.
        pos = _FIXED_SIZE
        strings = []
        for _ in range(4):
            n = data[pos]
            if n == 0:
                raise EnvelopeRejected(AuditReason.MALFORMED)
            strings.append(str(data[pos + 1 : pos + 1 + n], "utf-8"))
            pos += 1 + n
        tenant, job_id, task, model = strings
        req_hash = None
        if kind == "result":
            req_hash = bytes(data[pos : pos + HASH_BYTES])
            pos += HASH_BYTES
        if pos != size:
            raise EnvelopeRejected(AuditReason.MALFORMED)
    except (struct.error, IndexError, UnicodeDecodeError):
        raise EnvelopeRejected(AuditReason.MALFORMED) from None
    # The fields set at once: a frozen dataclass's __init__ sets them one by one
    # through object.__setattr__, half the cost of this whole parse. Header has
    # no __post_init__ and no slots; tests/unit/test_envelope.py compares the two.
    header = _allocate(Header)
    header.__dict__.update(
        kind=kind,
        key_version=kver,
        issued_at_ms=iat,
        expires_at_ms=exp,
        priority=_PRIORITY_NAMES[prio],
        tenant=tenant,
        job_id=job_id,
        task=task,
        model=model,
        request_hash=req_hash,
        raw=bytes(data[:size]),
    )
    return header


def parse_unverified_tenant(data: bytes) -> str | None:
    """The tenant an envelope's header names, read WITHOUT authenticating or checking
    anything else (None if the bytes hold no such field).

    A shortcut for routing only (the gateway's "is this the bearer's tenant?"):
    where the whole header parses, `parse_unverified_header` names the same
    tenant; nothing it returns may be trusted until `verify` has checked the MAC.
    """
    n = data[_FIXED.size] if len(data) > _FIXED.size else 0
    field = data[_FIXED.size + 1 : _FIXED.size + 1 + n]
    if n == 0 or len(field) != n:
        return None
    try:
        return bytes(field).decode()
    except UnicodeDecodeError:
        return None


def seal(
    keys: EnvelopeKeys,
    header: Header,
    plaintext: bytes,
    *,
    crypto: CryptoBackend = DEFAULT,
    _nonce_for_test_vectors: bytes | None = None,
) -> bytes:
    """Encrypt ``plaintext`` under ``header`` and return the envelope bytes.

    ``crypto`` is the AES-GCM implementation (the process's choice; every one
    gives the same bytes).

    The nonce is always 12 fresh bytes from the OS; the keyword exists only so
    known-answer tests can reproduce a vector, and must never be used otherwise
    (a repeated nonce under one key breaks GCM).
    """
    raw = encode_header(header)
    enc_key = keys.request_enc if header.kind == "request" else keys.result_enc
    if _nonce_for_test_vectors is not None and len(_nonce_for_test_vectors) != NONCE_BYTES:
        raise ValueError("a nonce is 12 bytes")
    nonce = (
        _nonce_for_test_vectors if _nonce_for_test_vectors is not None else os.urandom(NONCE_BYTES)
    )
    parts = (raw, nonce, *crypto.seal_parts(enc_key, nonce, plaintext, raw))
    mac = hmac.new(keys.mac, digestmod="sha256")
    for part in parts:
        mac.update(part)
    # One join: a large body is copied once, not once per step.
    return b"".join((*parts, mac.digest()))


@dataclass(frozen=True)
class Verified:
    """An envelope whose MAC and time window passed; its plaintext is still sealed."""

    header: Header
    keys: EnvelopeKeys = field(repr=False)
    _body: memoryview = field(repr=False)
    crypto: CryptoBackend = field(default=DEFAULT, repr=False)

    def decrypt(self) -> bytes:
        """Decrypt and check the GCM tag; `EnvelopeRejected("tampered")` on failure."""
        body = self._body
        key = self.keys.request_enc if self.header.kind == "request" else self.keys.result_enc
        try:
            plaintext = self.crypto.open(
                key, bytes(body[:NONCE_BYTES]), body[NONCE_BYTES:], self.header.raw
            )
        except ValueError:
            raise EnvelopeRejected(AuditReason.TAMPERED, self.header, authenticated=True) from None
        return plaintext


def verify(
    data: bytes,
    *,
    expect: Kind,
    keyring: KeyLookup,
    max_bytes: int,
    at_ms: int | None = None,
    skew_ms: int = 30_000,
    max_lifetime_ms: int | None = None,
    crypto: CryptoBackend = DEFAULT,
) -> Verified:
    """Run every check that needs no Redis and no decryption, in the documented order.

    Raises `EnvelopeRejected` (an `InvalidEnvelope`) with the audit reason:
    ``oversize``, ``malformed``, ``unknown_key``, ``tampered`` or ``expired``.
    The time window: issued at most ``skew_ms`` in the future, and not past
    ``expires_at_ms`` by `expiry_grace_ms` (the skew, at most a tenth of the lifetime).
    The MAC is checked before the time window, so every refusal after it
    (``expired``, and ``malformed`` for a lifetime over ``max_lifetime_ms``,
    the worker's cap whatever lifetime the sender chose) is authenticated:
    it names the tenant that really sent the envelope. ``crypto`` is what
    `Verified.decrypt` will use.
    """
    if len(data) > max_bytes:
        raise EnvelopeRejected(AuditReason.OVERSIZE)
    if len(data) < MIN_ENVELOPE:
        raise EnvelopeRejected(AuditReason.MALFORMED)
    header = parse_unverified_header(data)
    if header.kind != expect:
        raise EnvelopeRejected(AuditReason.MALFORMED, header)
    kv = keyring.usable(header.tenant, header.key_version)
    if kv is None:
        raise EnvelopeRejected(AuditReason.UNKNOWN_KEY, header)
    keys = kv.keys(header.tenant)
    view = memoryview(data)
    expected = hmac.digest(keys.mac, view[:-MAC_BYTES], "sha256")
    if not hmac.compare_digest(expected, view[-MAC_BYTES:]):
        raise EnvelopeRejected(AuditReason.TAMPERED, header)
    # -- authenticated from here on ---------------------------------------------
    now = now_ms() if at_ms is None else at_ms
    lifetime_ms = header.expires_at_ms - header.issued_at_ms
    if (
        header.issued_at_ms > now + skew_ms
        or header.expires_at_ms <= now - expiry_grace_ms(lifetime_ms, skew_ms)
        or lifetime_ms < 0
    ):
        raise EnvelopeRejected(AuditReason.EXPIRED, header, authenticated=True)
    if max_lifetime_ms is not None and lifetime_ms > max_lifetime_ms:
        raise EnvelopeRejected(AuditReason.MALFORMED, header, authenticated=True)
    # Filled at once, as `parse_unverified_header` fills its Header (same reason).
    verified = _allocate(Verified)
    verified.__dict__.update(
        header=header, keys=keys, _body=view[len(header.raw) : -MAC_BYTES], crypto=crypto
    )
    return verified


def open_envelope(
    data: bytes,
    *,
    expect: Kind,
    keyring: KeyLookup,
    max_bytes: int,
    at_ms: int | None = None,
    skew_ms: int = 30_000,
    crypto: CryptoBackend = DEFAULT,
) -> tuple[Header, bytes]:
    """Verify and decrypt in one step; any failure is `InvalidEnvelope` (no reason)."""
    try:
        verified = verify(
            data,
            expect=expect,
            keyring=keyring,
            max_bytes=max_bytes,
            at_ms=at_ms,
            skew_ms=skew_ms,
            crypto=crypto,
        )
        return verified.header, verified.decrypt()
    except Exception:
        # One opaque error: no reason attribute, no unverified header, and no
        # other exception type may escape (defence in depth).
        raise InvalidEnvelope() from None
