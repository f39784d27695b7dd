"""Envelope suite v1: known answers, round trips, tampering, truncation, keys, time, fuzzing.

The vectors are the ones printed in docs/envelope.md (section 7); a test checks
the document still shows them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import struct
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from maas_worker.crypto import envelope
from maas_worker.crypto.envelope import (
    MIN_ENVELOPE,
    Header,
    encode_header,
    expiry_grace_ms,
    open_envelope,
    parse_unverified_header,
    parse_unverified_tenant,
    seal,
    sealed_header_digest,
    verify,
)
from maas_worker.crypto.primitives import crypto_backend
from maas_worker.errors import EnvelopeRejected, InvalidEnvelope
from maas_worker.tenancy.keyring import DerivedKeys, Keyring, KeyVersion, Tenant, derive_keys


@pytest.fixture(
    autouse=True, params=[("pycryptodome", "openssl"), ("openssl", "pycryptodome")], ids="-to-".join
)
def aes_backends(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs twice: sealed with one AES-GCM implementation, opened with the other.

    So the known answers hold for both, and each opens what the other sealed.
    The names this module calls are bound to the pair (the package has no
    switch to flip: the implementation is an argument).
    """
    sealer, opener = (crypto_backend(name) for name in request.param)
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "seal", partial(envelope.seal, crypto=sealer))
    monkeypatch.setattr(module, "verify", partial(envelope.verify, crypto=opener))
    monkeypatch.setattr(module, "open_envelope", partial(envelope.open_envelope, crypto=opener))


DOC = Path(__file__).resolve().parents[2] / "docs" / "envelope.md"

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(32, 64))
TENANT = "acme"
IAT = 1_700_000_000_000
EXP = IAT + 300_000
RES_IAT = IAT + 1_000
RES_EXP = RES_IAT + 3_600_000
SKEW = 30_000
MAX = 1 << 16
REQ_NONCE = bytes.fromhex("000102030405060708090a0b")
RES_NONCE = bytes.fromhex("0c0d0e0f1011121314151617")
REQ_PLAINTEXT = b'{"text":"hi"}'
RES_PLAINTEXT = b'{"ok":true,"output":{"text":"hi"}}'

KAT_REQUEST_ENC = "ab49c80d54be03409401455a7ae485cb396a11a6b08e2d0a59f2911feddc1a66"
KAT_RESULT_ENC = "01b5416cd7cca9d0a79e5619004b5b67dffba0850259c4152ce5456204e70fa6"
KAT_MAC = "0ece5ae123155951ce5e02fc0bce15e208622f9838bb8da1ffecffbb4c27bbf7"
KAT_REQUEST_HEADER = (
    "01010039000000010000018bcfe568000000018bcfe9fbe0000461636d65086a6f622d30303031"
    "0a6d6161732e696e666572066563686f4031"
)
KAT_REQUEST = (
    "01010039000000010000018bcfe568000000018bcfe9fbe0000461636d65086a"
    "6f622d303030310a6d6161732e696e666572066563686f403100010203040506"
    "0708090a0be288eda8fc548507fa3c95306ff0ebb863c21817832f7e079c2be9"
    "8b9747397ee93765f481714d37e92db87f505cdd319422f8f366c48302a379ca"
    "7ea8"
)
KAT_REQUEST_B64 = (
    "AQEAOQAAAAEAAAGLz+VoAAAAAYvP6fvgAARhY21lCGpvYi0wMDAxCm1hYXMuaW5m"
    "ZXIGZWNob0AxAAECAwQFBgcICQoL4ojtqPxUhQf6PJUwb/DruGPCGBeDL34HnCvp"
    "i5dHOX7pN2X0gXFNN+ktuH9QXN0xlCL482bEgwKjecp+qA=="
)
KAT_REQUEST_HASH = "129f53b7ce94851d5e9e8082d00a96bbf7f7764dbc5b11e76498971650247e8c"
KAT_RESULT = (
    "01020059000000010000018bcfe56be80000018bd01c5a68000461636d65086a"
    "6f622d303030310a6d6161732e696e666572066563686f4031129f53b7ce9485"
    "1d5e9e8082d00a96bbf7f7764dbc5b11e76498971650247e8c0c0d0e0f101112"
    "1314151617f3a59f7a747430ec39b105a6a7e1beb5efaf07cf84d0da3c186783"
    "7d2285a726edf67cc96e076443cb37815e0acd8f77e01f8f997d4cef708c75f5"
    "40160508b0357101e9cd5807cfc99437f57fe56ffb43b0"
)


# -- helpers -----------------------------------------------------------------------
def _kv(version: int, state: str = "primary", secret: bytes = SECRET) -> KeyVersion:
    return KeyVersion(version, state, secret, "2023-11-14T22:13:20Z")  # type: ignore[arg-type]


def _ring(*versions: KeyVersion, tenant: str = TENANT, **others: bytes) -> Keyring:
    tenants = {tenant: Tenant(tenant, versions or (_kv(1),))}
    for name, secret in others.items():
        tenants[name] = Tenant(name, (_kv(1, secret=secret),))
    return Keyring(tenants)


RING = _ring(beta=OTHER_SECRET)
KEYS = derive_keys(SECRET, TENANT, 1)


def request_header(**changes: object) -> Header:
    h = Header("request", 1, IAT, EXP, "high", TENANT, "job-0001", "maas.infer", "echo@1")
    return replace(h, **changes)  # type: ignore[arg-type]


def result_header(request: Header | None = None, **changes: object) -> Header:
    req = request or request_header()
    h = Header(
        "result",
        req.key_version,
        RES_IAT,
        RES_EXP,
        req.priority,
        req.tenant,
        req.job_id,
        req.task,
        req.model,
        req.digest(),
    )
    return replace(h, **changes)  # type: ignore[arg-type]


def kat_request() -> bytes:
    return seal(KEYS, request_header(), REQ_PLAINTEXT, _nonce_for_test_vectors=REQ_NONCE)


def kat_result() -> bytes:
    return seal(KEYS, result_header(), RES_PLAINTEXT, _nonce_for_test_vectors=RES_NONCE)


def open_req(
    data: bytes,
    *,
    ring: Keyring = RING,
    at_ms: int = IAT,
    max_bytes: int = MAX,
    skew_ms: int = SKEW,
) -> tuple[Header, bytes]:
    return open_envelope(
        data, expect="request", keyring=ring, max_bytes=max_bytes, at_ms=at_ms, skew_ms=skew_ms
    )


def reason(
    data: bytes,
    *,
    expect: str = "request",
    ring: Keyring = RING,
    at_ms: int = IAT,
    max_bytes: int = MAX,
    skew_ms: int = SKEW,
) -> str:
    """The audit reason `verify` gives, or "ok" if it passes."""
    try:
        verify(
            data,
            expect=expect,
            keyring=ring,
            max_bytes=max_bytes,  # type: ignore[arg-type]
            at_ms=at_ms,
            skew_ms=skew_ms,
        )
    except EnvelopeRejected as exc:
        return exc.reason
    return "ok"


# -- known answers -------------------------------------------------------------------
def test_derived_keys_known_answer() -> None:
    assert KEYS.request_enc.hex() == KAT_REQUEST_ENC
    assert KEYS.result_enc.hex() == KAT_RESULT_ENC
    assert KEYS.mac.hex() == KAT_MAC


def test_derived_keys_are_bound_to_tenant_version_and_secret() -> None:
    variants = [
        derive_keys(SECRET, TENANT, 2),
        derive_keys(SECRET, "acmf", 1),
        derive_keys(OTHER_SECRET, TENANT, 1),
    ]
    seen = {KEYS.request_enc, KEYS.result_enc, KEYS.mac}
    assert len(seen) == 3
    for keys in variants:
        new = {keys.request_enc, keys.result_enc, keys.mac}
        assert len(new) == 3
        assert not new & seen
        seen |= new


def test_request_header_known_answer() -> None:
    raw = encode_header(request_header())
    assert raw.hex() == KAT_REQUEST_HEADER
    assert hashlib.sha256(raw).hexdigest() == KAT_REQUEST_HASH
    assert request_header().digest().hex() == KAT_REQUEST_HASH


def test_request_envelope_known_answer() -> None:
    env = kat_request()
    assert env.hex() == KAT_REQUEST
    assert base64.b64encode(env).decode() == KAT_REQUEST_B64
    header, plaintext = open_req(env)
    assert plaintext == REQ_PLAINTEXT
    assert header == request_header()
    assert header.raw.hex() == KAT_REQUEST_HEADER


def test_result_envelope_known_answer() -> None:
    env = kat_result()
    assert env.hex() == KAT_RESULT
    header, plaintext = open_envelope(
        env, expect="result", keyring=RING, max_bytes=MAX, at_ms=RES_IAT
    )
    assert plaintext == RES_PLAINTEXT
    assert header.request_hash is not None
    assert header.request_hash.hex() == KAT_REQUEST_HASH
    assert header == result_header()


def test_documented_vectors_match() -> None:
    doc = re.sub(r"\s", "", DOC.read_text())
    for value in (
        KAT_REQUEST_ENC,
        KAT_RESULT_ENC,
        KAT_MAC,
        KAT_REQUEST,
        KAT_REQUEST_B64,
        KAT_REQUEST_HASH,
        KAT_RESULT,
    ):
        assert value in doc


def test_sizes_and_layout() -> None:
    env = kat_request()
    assert MIN_ENVELOPE == 93
    header_len = struct.unpack_from(">H", env, 2)[0]
    assert header_len == len(KAT_REQUEST_HEADER) // 2
    assert len(env) == header_len + 12 + len(REQ_PLAINTEXT) + 16 + 32


def test_nonces_are_fresh() -> None:
    a = seal(KEYS, request_header(), REQ_PLAINTEXT)
    b = seal(KEYS, request_header(), REQ_PLAINTEXT)
    header_len = len(KAT_REQUEST_HEADER) // 2
    assert a[header_len : header_len + 12] != b[header_len : header_len + 12]
    assert open_req(a)[1] == open_req(b)[1] == REQ_PLAINTEXT


# -- round trips ---------------------------------------------------------------------
PLAINTEXTS = [
    b"",
    b"\x00\xff",
    REQ_PLAINTEXT,
    bytes(range(256)) * 4,
    random.Random(7).randbytes(1 << 20),
]


@pytest.mark.parametrize("plaintext", PLAINTEXTS, ids=["empty", "00ff", "json", "1k", "1MiB"])
def test_round_trip_request(plaintext: bytes) -> None:
    env = seal(KEYS, request_header(), plaintext)
    header, out = open_req(env, max_bytes=len(env))
    assert out == plaintext
    assert header == request_header()


@pytest.mark.parametrize("plaintext", PLAINTEXTS, ids=["empty", "00ff", "json", "1k", "1MiB"])
def test_round_trip_result(plaintext: bytes) -> None:
    env = seal(KEYS, result_header(), plaintext)
    header, out = open_envelope(
        env, expect="result", keyring=RING, max_bytes=len(env), at_ms=RES_IAT
    )
    assert out == plaintext
    assert header.request_hash == request_header().digest()


def test_round_trip_unicode_and_long_fields() -> None:
    h = request_header(job_id="j" * 255, model="m" * 255, task="t\u00e9\u4e2d", priority="low")
    header, out = open_req(seal(KEYS, h, b"x"))
    assert (header, out) == (h, b"x")


def test_digest_of_received_header_is_the_bytes_sent() -> None:
    header, _ = open_req(kat_request())
    assert header.digest() == hashlib.sha256(bytes.fromhex(KAT_REQUEST_HEADER)).digest()


def test_sealed_header_digest_is_the_header_digest() -> None:
    """What a client binds its job to, read from the envelope instead of re-encoding."""
    for h in (request_header(), request_header(job_id="j" * 255, task="t\u00e9"), result_header()):
        env = seal(KEYS, h, b"payload")
        assert sealed_header_digest(env) == h.digest()
    assert (
        sealed_header_digest(kat_request())
        == hashlib.sha256(bytes.fromhex(KAT_REQUEST_HEADER)).digest()
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"tenant": ""},
        {"job_id": "x" * 256},
        {"model": "\u00e9" * 128},
        {"priority": "urgent"},
        {"request_hash": b"\x00" * 32},
    ],
)
def test_encode_header_programmer_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_header(request_header(**bad))


def test_result_header_needs_a_32_byte_hash() -> None:
    with pytest.raises(ValueError):
        encode_header(result_header(request_hash=None))
    with pytest.raises(ValueError):
        encode_header(result_header(request_hash=b"\x00" * 31))


# -- tampering -----------------------------------------------------------------------
HEADER_LEN = len(KAT_REQUEST_HEADER) // 2
# Offsets in the KAT request header (docs/envelope.md, 7.1).
LENGTH_BYTES = {25, 30, 39, 50}
TENANT_BYTES = range(26, 30)


def _expected_header_reason(i: int, mutated: bytes) -> str:
    """What `verify` must say when header byte ``i`` was XORed with 0x01."""
    if i < 4 or i in LENGTH_BYTES:
        return "malformed"  # version, type, header_len, a str8 length
    if i < 8:
        return "unknown_key"  # key_version
    if i < 24:
        return "tampered"  # the timestamps: the MAC is checked before the time window
    if i == 24:
        return "tampered" if mutated[24] <= 2 else "malformed"  # still a valid priority
    if i in TENANT_BYTES:
        return "unknown_key"  # "acme" became another tenant, not in the keyring
    return "tampered"  # job id, task or model: authentic only if the MAC agrees


@pytest.mark.parametrize("i", range(len(KAT_REQUEST) // 2))
def test_flipping_any_byte_is_rejected(i: int) -> None:
    env = kat_request()
    for mask in (0x01, 0x80, 0xFF):
        mutated = bytearray(env)
        mutated[i] ^= mask
        with pytest.raises(InvalidEnvelope) as info:
            open_req(bytes(mutated))
        assert str(info.value) == "invalid envelope"
        got = reason(bytes(mutated))
        if i >= HEADER_LEN:  # nonce, ciphertext, tag, mac: only the MAC can tell
            assert got == "tampered"
        elif mask == 0x01:
            assert got == _expected_header_reason(i, bytes(mutated))
        else:
            assert got in {"malformed", "unknown_key", "expired", "tampered"}


@pytest.mark.parametrize("i", range(len(KAT_RESULT) // 2))
def test_flipping_any_byte_of_a_result_is_rejected(i: int) -> None:
    mutated = bytearray(kat_result())
    mutated[i] ^= 0x01
    with pytest.raises(InvalidEnvelope):
        open_envelope(bytes(mutated), expect="result", keyring=RING, max_bytes=MAX, at_ms=RES_IAT)


def test_swapping_the_tenant_for_another_known_tenant_is_tampered() -> None:
    env = kat_request().replace(b"\x04acme", b"\x04beta", 1)
    assert reason(env) == "tampered"


def test_ciphertext_with_a_recomputed_mac_fails_the_gcm_tag() -> None:
    mutated = bytearray(kat_request()[:-32])
    mutated[HEADER_LEN + 12] ^= 0x01  # first ciphertext byte
    forged = bytes(mutated) + hmac.digest(KEYS.mac, bytes(mutated), "sha256")
    verified = verify(forged, expect="request", keyring=RING, max_bytes=MAX, at_ms=IAT)
    with pytest.raises(EnvelopeRejected) as info:
        verified.decrypt()
    assert info.value.reason == "tampered"
    assert info.value.authenticated
    with pytest.raises(InvalidEnvelope):
        open_req(forged)


@pytest.mark.parametrize("n", range(len(KAT_REQUEST) // 2))
def test_truncation_at_every_length(n: int) -> None:
    data = kat_request()[:n]
    with pytest.raises(InvalidEnvelope):
        open_req(data)
    # Until the body can hold nonce, tag and mac the header is malformed; after
    # that the parse succeeds and only the MAC notices the missing bytes.
    assert reason(data) == ("tampered" if n >= HEADER_LEN + 60 else "malformed")


def test_appended_bytes_are_rejected() -> None:
    assert reason(kat_request() + b"\x00") == "tampered"


# -- keys ----------------------------------------------------------------------------
def test_another_tenants_secret_does_not_open() -> None:
    ring = _ring(_kv(1, secret=OTHER_SECRET))
    assert reason(kat_request(), ring=ring) == "tampered"
    with pytest.raises(InvalidEnvelope):
        open_req(kat_request(), ring=ring)


@pytest.mark.parametrize(
    "keys",
    [
        derive_keys(SECRET, TENANT, 2),  # same secret, another version
        derive_keys(SECRET, "beta", 1),  # same secret, another tenant
        derive_keys(OTHER_SECRET, TENANT, 1),  # another secret
    ],
    ids=["version", "tenant", "secret"],
)
def test_sealed_with_wrong_derived_keys(keys: DerivedKeys) -> None:
    env = seal(keys, request_header(), REQ_PLAINTEXT)
    assert reason(env) == "tampered"


def test_unknown_version_and_unknown_tenant() -> None:
    assert reason(seal(KEYS, request_header(key_version=2), b"x")) == "unknown_key"
    other = derive_keys(SECRET, "zeta", 1)
    assert reason(seal(other, request_header(tenant="zeta"), b"x")) == "unknown_key"


def test_retired_key_is_unknown() -> None:
    ring = _ring(_kv(1, "retired"), _kv(2, "primary"))
    assert reason(kat_request(), ring=ring) == "unknown_key"
    with pytest.raises(InvalidEnvelope):
        open_req(kat_request(), ring=ring)


def test_decrypt_only_key_still_opens() -> None:
    ring = _ring(_kv(1, "decrypt-only"), _kv(2, "primary", secret=OTHER_SECRET))
    header, plaintext = open_req(kat_request(), ring=ring)
    assert (header.key_version, plaintext) == (1, REQ_PLAINTEXT)
    keys2 = derive_keys(OTHER_SECRET, TENANT, 2)
    header, plaintext = open_req(seal(keys2, request_header(key_version=2), b"v2"), ring=ring)
    assert (header.key_version, plaintext) == (2, b"v2")


# -- time ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("at_ms", "skew_ms", "expected"),
    [
        (IAT, SKEW, "ok"),
        (IAT - SKEW, SKEW, "ok"),  # issued exactly skew in the future
        (IAT - SKEW - 1, SKEW, "expired"),  # issued beyond the skew in the future
        (EXP, SKEW, "ok"),  # past expiry, within the skew
        (EXP + SKEW - 1, SKEW, "ok"),
        (EXP + SKEW, SKEW, "expired"),  # exactly at the boundary: expired
        (EXP - 1, 0, "ok"),
        (EXP, 0, "expired"),
        (IAT - 1, 0, "expired"),
        (IAT, 0, "ok"),
    ],
)
def test_time_window(at_ms: int, skew_ms: int, expected: str) -> None:
    env = kat_request()
    assert reason(env, at_ms=at_ms, skew_ms=skew_ms) == expected
    if expected == "ok":
        assert open_req(env, at_ms=at_ms, skew_ms=skew_ms)[1] == REQ_PLAINTEXT
    else:
        with pytest.raises(InvalidEnvelope):
            open_req(env, at_ms=at_ms, skew_ms=skew_ms)


@pytest.mark.parametrize(
    ("lifetime_ms", "at_ms", "expected"),
    [
        # a 2 s lifetime: 200 ms of grace past its expiry, not the 30 s skew
        (2_000, IAT + 2_199, "ok"),
        (2_000, IAT + 2_200, "expired"),
        (2_000, IAT + 20_000, "expired"),
        # a sender whose clock is 20 s ahead: issued "in the future", still runs
        (2_000, IAT - 20_000, "ok"),
        (2_000, IAT - SKEW, "ok"),
        (2_000, IAT - SKEW - 1, "expired"),
        # a long lifetime gets the whole skew
        (3_600_000, IAT + 3_600_000 + SKEW - 1, "ok"),
        (3_600_000, IAT + 3_600_000 + SKEW, "expired"),
        (0, IAT - 1, "ok"),
        (0, IAT, "expired"),
    ],
)
def test_the_grace_past_expiry_is_at_most_a_tenth_of_the_lifetime(
    lifetime_ms: int, at_ms: int, expected: str
) -> None:
    env = seal(KEYS, request_header(expires_at_ms=IAT + lifetime_ms), b"x")
    assert reason(env, at_ms=at_ms, skew_ms=SKEW) == expected
    assert expiry_grace_ms(lifetime_ms, SKEW) == min(SKEW, lifetime_ms // 10)


def test_time_refusals_come_after_the_mac_and_are_authenticated() -> None:
    env = kat_request()
    with pytest.raises(EnvelopeRejected) as info:
        verify(env, expect="request", keyring=RING, max_bytes=MAX, at_ms=EXP + SKEW, skew_ms=SKEW)
    assert info.value.reason == "expired" and info.value.authenticated
    assert isinstance(info.value.unverified_header, Header)
    # Expired AND altered: the MAC decides first, and nothing is authenticated.
    mutated = bytearray(env)
    mutated[-1] ^= 0x01
    with pytest.raises(EnvelopeRejected) as info:
        verify(
            bytes(mutated),
            expect="request",
            keyring=RING,
            max_bytes=MAX,
            at_ms=EXP + SKEW,
            skew_ms=SKEW,
        )
    assert info.value.reason == "tampered" and not info.value.authenticated


@pytest.mark.parametrize("lifetime_ms", [EXP - IAT + 1, 2**64 - 1 - IAT])
def test_a_lifetime_over_the_cap_is_refused_whatever_the_sender_chose(lifetime_ms: int) -> None:
    env = seal(KEYS, request_header(expires_at_ms=IAT + lifetime_ms), b"x")
    assert reason(env) == "ok"  # no cap asked for: the time window alone
    with pytest.raises(EnvelopeRejected) as info:
        verify(
            env,
            expect="request",
            keyring=RING,
            max_bytes=MAX,
            at_ms=IAT,
            skew_ms=SKEW,
            max_lifetime_ms=EXP - IAT,
        )
    assert info.value.reason == "malformed" and info.value.authenticated
    exact = seal(KEYS, request_header(expires_at_ms=EXP), b"x")
    verify(
        exact,
        expect="request",
        keyring=RING,
        max_bytes=MAX,
        at_ms=IAT,
        skew_ms=SKEW,
        max_lifetime_ms=EXP - IAT,
    )


def test_expiry_before_issue_is_expired() -> None:
    env = seal(KEYS, request_header(expires_at_ms=IAT - 1), b"x")
    assert reason(env) == "expired"
    env = seal(KEYS, request_header(expires_at_ms=IAT), b"x")
    # a zero-length lifetime has no grace past its expiry, but the skew before its issue
    assert reason(env, at_ms=IAT - 1) == "ok"
    assert reason(env, at_ms=IAT) == "expired"


def test_default_clock_is_used_without_at_ms() -> None:
    with pytest.raises(InvalidEnvelope):  # the KAT expired in 2023
        open_envelope(kat_request(), expect="request", keyring=RING, max_bytes=MAX)


# -- direction, size, errors -----------------------------------------------------------
def test_result_does_not_open_as_request_and_vice_versa() -> None:
    assert reason(kat_result(), at_ms=RES_IAT) == "malformed"
    assert reason(kat_request(), expect="result") == "malformed"
    with pytest.raises(InvalidEnvelope):
        open_req(kat_result(), at_ms=RES_IAT)
    with pytest.raises(InvalidEnvelope):
        open_envelope(kat_request(), expect="result", keyring=RING, max_bytes=MAX, at_ms=IAT)


def test_type_byte_swapped_is_rejected() -> None:
    # A request relabelled as a result (and the reverse) is malformed: the
    # request hash is missing or extra, so the header does not end at header_len.
    env = bytearray(kat_request())
    env[1] = 0x02
    assert reason(bytes(env), expect="result") == "malformed"
    res = bytearray(kat_result())
    res[1] = 0x01
    assert reason(bytes(res), at_ms=RES_IAT) == "malformed"


def test_oversize() -> None:
    env = kat_request()
    assert reason(env, max_bytes=len(env)) == "ok"
    assert reason(env, max_bytes=len(env) - 1) == "oversize"
    assert reason(b"\x00" * (MAX + 1)) == "oversize"
    with pytest.raises(InvalidEnvelope):
        open_req(env, max_bytes=len(env) - 1)


def test_too_short_is_malformed() -> None:
    assert reason(b"") == "malformed"
    assert reason(b"\x01" * (MIN_ENVELOPE - 1)) == "malformed"


def test_invalid_utf8_in_a_string_is_malformed() -> None:
    env = bytearray(kat_request())
    env[31] = 0xFF  # first byte of the job id
    assert reason(bytes(env)) == "malformed"


def _signed(header_tail: bytes, *, header_len: int | None = None) -> bytes:
    """A request whose header ends in ``header_tail``, with a valid MAC (but no valid GCM tag)."""
    size = 25 + len(header_tail) if header_len is None else header_len
    fixed = struct.pack(">BBHIQQB", 1, 1, size, 1, IAT, EXP, 0)
    body = fixed + header_tail + bytes(12 + 4 + 16)
    return body + hmac.digest(KEYS.mac, body, "sha256")


def test_zero_length_string_is_malformed_even_with_a_valid_mac() -> None:
    good = b"\x04acme\x08job-0001\x0amaas.infer\x06echo@1"
    assert reason(_signed(good)) == "ok"  # control: parses and the MAC passes
    assert reason(_signed(b"\x04acme\x00\x0amaas.infer\x06echo@1")) == "malformed"


@pytest.mark.parametrize("delta", [-1, 1, 12])
def test_header_len_must_match_the_fields(delta: int) -> None:
    tail = b"\x04acme\x08job-0001\x0amaas.infer\x06echo@1"
    assert reason(_signed(tail, header_len=25 + len(tail) + delta)) == "malformed"


def test_error_text_does_not_reveal_the_reason() -> None:
    assert str(InvalidEnvelope()) == "invalid envelope"
    cases = {
        "oversize": (kat_request(), {"max_bytes": 10}),
        "malformed": (b"\x00" * 200, {}),
        "unknown_key": (kat_request(), {"ring": _ring(_kv(1, "retired"))}),
        "expired": (kat_request(), {"at_ms": EXP + SKEW}),
        "tampered": (kat_request()[:-1] + b"\x00", {}),
    }
    for why, (data, kwargs) in cases.items():
        with pytest.raises(InvalidEnvelope) as info:
            open_req(data, **kwargs)  # type: ignore[arg-type]
        text = f"{info.value} {info.value!r} {info.value.args}"
        assert "invalid envelope" in text
        assert why not in text
        assert "acme" not in text


def test_parse_unverified_header_reads_the_kat() -> None:
    header = parse_unverified_header(kat_request())
    assert header == request_header()
    assert header.raw.hex() == KAT_REQUEST_HEADER


@pytest.mark.parametrize("kind", ["request", "result"])
def test_a_parsed_header_is_the_one_its_constructor_makes(kind: str) -> None:
    # parse_unverified_header fills the fields at once, not through __init__: every
    # field must be there, and the object must behave as a constructed one.
    data = kat_request() if kind == "request" else kat_result()
    made = request_header() if kind == "request" else result_header()
    made = replace(made, raw=data[: len(encode_header(made))])
    parsed = parse_unverified_header(data)
    assert vars(parsed) == vars(made)
    assert parsed == made and hash(parsed) == hash(made) and repr(parsed) == repr(made)
    assert replace(parsed, model="other").model == "other"
    with pytest.raises(AttributeError):
        parsed.tenant = "mallory"  # type: ignore[misc]


def test_a_verified_envelope_is_the_one_its_constructor_makes() -> None:
    verified = verify(
        kat_request(),
        expect="request",
        keyring=RING,
        max_bytes=MAX,
        at_ms=IAT,  # type: ignore[arg-type]
    )
    made = envelope.Verified(verified.header, verified.keys, verified._body, verified.crypto)
    assert vars(verified).keys() == vars(made).keys()
    assert verified.decrypt() == made.decrypt()
    with pytest.raises(AttributeError):
        verified.header = request_header()  # type: ignore[misc]


# -- fuzzing -----------------------------------------------------------------------------
def _fuzz_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    bases = [kat_request(), kat_result()]
    out: list[bytes] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.25:
            out.append(rng.randbytes(rng.randrange(0, 300)))
            continue
        data = bytearray(rng.choice(bases))
        if roll < 0.4:  # a plausible fixed part with random lengths and strings
            data[2:4] = struct.pack(">H", rng.randrange(0, 400))
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)]
        if rng.random() < 0.2:
            data += rng.randbytes(rng.randrange(1, 64))
        out.append(bytes(data))
    return out


def test_only_invalid_envelope_escapes_for_random_input() -> None:
    opened = 0
    for data in _fuzz_inputs(seed=20231114, count=4000):
        for expect, at_ms in (("request", IAT), ("result", RES_IAT)):
            try:
                open_envelope(
                    data,
                    expect=expect,
                    keyring=RING,  # type: ignore[arg-type]
                    max_bytes=MAX,
                    at_ms=at_ms,
                )
                opened += 1
            except InvalidEnvelope as exc:
                assert str(exc) == "invalid envelope"
    # Only inputs that mutated nothing (a byte set to its own value) may open.
    assert opened < 100


def test_the_unverified_tenant_is_the_whole_headers_wherever_that_parses() -> None:
    # The gateway's shortcut (parse_unverified_tenant) decides only whether the whole
    # header must be parsed: wherever that parses, both name the same tenant.
    assert parse_unverified_tenant(kat_request()) == request_header().tenant
    assert parse_unverified_tenant(b"") is None
    assert parse_unverified_tenant(kat_request()[:28]) is None  # the field cut short
    for data in _fuzz_inputs(seed=11, count=3000):
        tenant = parse_unverified_tenant(data)
        try:
            header = parse_unverified_header(data)
        except EnvelopeRejected:
            continue
        assert tenant == header.tenant


def test_verify_raises_only_envelope_rejected() -> None:
    # The worker calls `verify` directly and catches only EnvelopeRejected.
    for data in _fuzz_inputs(seed=5, count=2000):
        try:
            verify(data, expect="request", keyring=RING, max_bytes=MAX, at_ms=IAT)
        except EnvelopeRejected as exc:
            assert exc.reason in {"oversize", "malformed", "unknown_key", "expired", "tampered"}
