"""An independent implementation of docs/envelope.md must interoperate with the project.

Everything under "independent implementation" uses only `cryptography`
(OpenSSL's AES-GCM and HKDF) and the standard library, written from the
document and not from maas_worker's code: it derives the keys from the tenant's
root secret, parses the header, checks the window and the MAC, and decrypts;
and it seals. The tests then cross the two implementations both ways.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import struct
from dataclasses import dataclass, replace

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from maas_worker.crypto.envelope import Header, open_envelope, seal
from maas_worker.errors import InvalidEnvelope
from maas_worker.tenancy.keyring import Keyring, KeyVersion, Tenant, derive_keys

# == independent implementation (docs/envelope.md) ======================================
LABELS = {
    "request": b"maas-worker/v1/request-enc",
    "result": b"maas-worker/v1/result-enc",
    "mac": b"maas-worker/v1/mac",
}
TYPES = {"request": 0x01, "result": 0x02}
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
FIXED = ">BBHIQQB"  # version type header_len key_version issued expires priority
FIXED_LEN = struct.calcsize(FIXED)
OVERHEAD = 12 + 16 + 32  # nonce, tag, mac


class Rejected(Exception):
    """The independent opener refused the bytes."""


def hkdf32(root_secret: bytes, label: bytes, tenant: str, key_version: int) -> bytes:
    info = label + b"\x00" + tenant.encode("utf-8") + b"\x00" + struct.pack(">I", key_version)
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(root_secret)


@dataclass
class Fields:
    kind: str
    key_version: int
    issued_at_ms: int
    expires_at_ms: int
    priority: str
    tenant: str
    job_id: str
    task: str
    model: str
    request_hash: bytes | None = None


def _str8(value: str) -> bytes:
    data = value.encode("utf-8")
    assert 1 <= len(data) <= 255
    return bytes([len(data)]) + data


def build_header(f: Fields) -> bytes:
    tail = b"".join(_str8(s) for s in (f.tenant, f.job_id, f.task, f.model))
    if f.kind == "result":
        assert f.request_hash is not None and len(f.request_hash) == 32
        tail += f.request_hash
    fixed = struct.pack(
        FIXED,
        0x01,
        TYPES[f.kind],
        FIXED_LEN + len(tail),
        f.key_version,
        f.issued_at_ms,
        f.expires_at_ms,
        PRIORITIES[f.priority],
    )
    return fixed + tail


def ind_seal(root_secret: bytes, f: Fields, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    header = build_header(f)
    enc_key = hkdf32(root_secret, LABELS[f.kind], f.tenant, f.key_version)
    mac_key = hkdf32(root_secret, LABELS["mac"], f.tenant, f.key_version)
    nonce = nonce or os.urandom(12)
    ct_and_tag = AESGCM(enc_key).encrypt(nonce, plaintext, header)
    signed = header + nonce + ct_and_tag
    return signed + hmac.new(mac_key, signed, hashlib.sha256).digest()


def ind_open(
    data: bytes,
    *,
    expect: str,
    roots: dict[tuple[str, int], bytes],
    now_ms: int,
    skew_ms: int = 30_000,
    max_bytes: int = 1 << 20,
) -> tuple[Fields, bytes]:
    """Open ``data`` from root secrets keyed by (tenant, key version), section 4's order."""
    # 1. size
    if len(data) > max_bytes or len(data) < FIXED_LEN + 8 + OVERHEAD:
        raise Rejected("size")
    # 2. version, type, structure
    version, type_, header_len, kver, iat, exp, prio = struct.unpack_from(FIXED, data, 0)
    kinds = {v: k for k, v in TYPES.items()}
    names = {v: k for k, v in PRIORITIES.items()}
    if version != 0x01 or type_ not in kinds or prio not in names:
        raise Rejected("malformed")
    if header_len > len(data) - OVERHEAD:
        raise Rejected("malformed")
    pos, strings = FIXED_LEN, []
    for _ in range(4):
        if pos >= header_len:
            raise Rejected("malformed")
        n = data[pos]
        if n == 0 or pos + 1 + n > header_len:
            raise Rejected("malformed")
        try:
            strings.append(data[pos + 1 : pos + 1 + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise Rejected("malformed") from None
        pos += 1 + n
    request_hash = None
    if kinds[type_] == "result":
        request_hash, pos = data[pos : pos + 32], pos + 32
    if pos != header_len or kinds[type_] != expect:
        raise Rejected("malformed")
    tenant, job_id, task, model = strings
    # 3. key lookup
    root = roots.get((tenant, kver))
    if root is None:
        raise Rejected("unknown_key")
    # 4. time window
    if iat > now_ms + skew_ms or exp <= now_ms - skew_ms or exp < iat:
        raise Rejected("expired")
    # 5. HMAC, constant time
    mac_key = hkdf32(root, LABELS["mac"], tenant, kver)
    expected = hmac.new(mac_key, data[:-32], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, data[-32:]):
        raise Rejected("tampered")
    # 8. decrypt, header as associated data
    header = data[:header_len]
    nonce = data[header_len : header_len + 12]
    ct_and_tag = data[header_len + 12 : -32]
    enc_key = hkdf32(root, LABELS[kinds[type_]], tenant, kver)
    try:
        plaintext = AESGCM(enc_key).decrypt(nonce, ct_and_tag, header)
    except InvalidTag:
        raise Rejected("tampered") from None
    fields = Fields(
        kinds[type_], kver, iat, exp, names[prio], tenant, job_id, task, model, request_hash
    )
    return fields, plaintext


# == the tests ==========================================================================
SECRET = bytes(range(32))
TENANT = "acme"
IAT = 1_700_000_000_000
BLOB = random.Random(42).randbytes(100_000)
ROOTS = {(TENANT, 1): SECRET}
RING = Keyring({TENANT: Tenant(TENANT, (KeyVersion(1, "primary", SECRET, ""),))})
KAT_REQUEST = bytes.fromhex(
    "01010039000000010000018bcfe568000000018bcfe9fbe0000461636d65086a"
    "6f622d303030310a6d6161732e696e666572066563686f403100010203040506"
    "0708090a0be288eda8fc548507fa3c95306ff0ebb863c21817832f7e079c2be9"
    "8b9747397ee93765f481714d37e92db87f505cdd319422f8f366c48302a379ca"
    "7ea8"
)


def request_fields(**changes: object) -> Fields:
    f = Fields("request", 1, IAT, IAT + 300_000, "high", TENANT, "job-0001", "maas.infer", "echo@1")
    return replace(f, **changes)  # type: ignore[arg-type]


def project_header(f: Fields) -> Header:
    return Header(
        f.kind,
        f.key_version,
        f.issued_at_ms,
        f.expires_at_ms,  # type: ignore[arg-type]
        f.priority,
        f.tenant,
        f.job_id,
        f.task,
        f.model,
        f.request_hash,
    )


def result_fields(request_header_bytes: bytes) -> Fields:
    return Fields(
        "result",
        1,
        IAT + 1_000,
        IAT + 3_601_000,
        "high",
        TENANT,
        "job-0001",
        "maas.infer",
        "echo@1",
        hashlib.sha256(request_header_bytes).digest(),
    )


def test_independent_hkdf_matches_project() -> None:
    keys = derive_keys(SECRET, TENANT, 1)
    assert hkdf32(SECRET, LABELS["request"], TENANT, 1) == keys.request_enc
    assert hkdf32(SECRET, LABELS["result"], TENANT, 1) == keys.result_enc
    assert hkdf32(SECRET, LABELS["mac"], TENANT, 1) == keys.mac
    # The document's "empty salt" and RFC 5869's default of HashLen zeros agree.
    info = LABELS["mac"] + b"\x00acme\x00\x00\x00\x00\x01"
    for salt in (b"", b"\x00" * 32):
        assert HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(SECRET) == keys.mac


def test_independent_opener_reads_the_documented_vector() -> None:
    fields, plaintext = ind_open(KAT_REQUEST, expect="request", roots=ROOTS, now_ms=IAT)
    assert plaintext == b'{"text":"hi"}'
    assert fields == request_fields()


def test_independent_sealer_reproduces_the_documented_vector() -> None:
    nonce = bytes.fromhex("000102030405060708090a0b")
    assert ind_seal(SECRET, request_fields(), b'{"text":"hi"}', nonce) == KAT_REQUEST


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"\x00\xff", b'{"inputs":[[0.5,1.5]]}', BLOB],
    ids=["empty", "00ff", "json", "100k"],
)
def test_project_request_opens_independently(plaintext: bytes) -> None:
    f = request_fields(
        priority="low", job_id="0f8fad5b-d9cb-469f-a165-70867728950e", model="digits@1"
    )
    env = seal(derive_keys(SECRET, TENANT, 1), project_header(f), plaintext)
    fields, out = ind_open(env, expect="request", roots=ROOTS, now_ms=IAT)
    assert (fields, out) == (f, plaintext)


def test_project_result_opens_independently() -> None:
    keys = derive_keys(SECRET, TENANT, 1)
    request = seal(keys, project_header(request_fields()), b'{"text":"hi"}')
    req_header, _ = open_envelope(
        request, expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT
    )
    doc = {"ok": False, "error": "model_error", "message": "bad input shape"}
    body = json.dumps(doc, separators=(",", ":")).encode()
    env = seal(keys, project_header(result_fields(req_header.raw)), body)
    fields, out = ind_open(env, expect="result", roots=ROOTS, now_ms=IAT + 1_000)
    assert json.loads(out) == doc
    header_len = struct.unpack_from(">H", request, 2)[0]
    assert fields.request_hash == hashlib.sha256(request[:header_len]).digest()
    with pytest.raises(Rejected, match="malformed"):  # a result is not a request
        ind_open(env, expect="request", roots=ROOTS, now_ms=IAT + 1_000)


@pytest.mark.parametrize("plaintext", [b"", b"\x00\xff", BLOB], ids=["empty", "00ff", "100k"])
def test_independent_request_opens_in_project(plaintext: bytes) -> None:
    f = request_fields(priority="normal", model="echo")
    env = ind_seal(SECRET, f, plaintext)
    header, out = open_envelope(env, expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT)
    assert out == plaintext
    assert header == project_header(f)
    # The base64 text form of a Celery argument round-trips too.
    text = base64.b64encode(env).decode("ascii")
    assert base64.b64decode(text, validate=True) == env


def test_independent_result_opens_in_project() -> None:
    request = ind_seal(SECRET, request_fields(), b'{"text":"hi"}')
    req_header, _ = open_envelope(
        request, expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT
    )
    doc = {"ok": True, "output": {"text": "hi"}}
    env = ind_seal(
        SECRET,
        result_fields(request[: len(req_header.raw)]),
        json.dumps(doc, separators=(",", ":")).encode(),
    )
    header, out = open_envelope(
        env, expect="result", keyring=RING, max_bytes=1 << 20, at_ms=IAT + 1_000
    )
    assert json.loads(out) == doc
    assert header.request_hash == req_header.digest()
    with pytest.raises(InvalidEnvelope):
        open_envelope(env, expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT)


def test_both_implementations_reject_the_same_tampering() -> None:
    env = seal(derive_keys(SECRET, TENANT, 1), project_header(request_fields()), b"payload")
    for i in range(len(env)):
        mutated = bytearray(env)
        mutated[i] ^= 0x01
        with pytest.raises(Rejected):
            ind_open(bytes(mutated), expect="request", roots=ROOTS, now_ms=IAT)
        with pytest.raises(InvalidEnvelope):
            open_envelope(
                bytes(mutated), expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT
            )


def test_wrong_root_secret_is_rejected_by_both() -> None:
    other = bytes(range(1, 33))
    env = ind_seal(other, request_fields(), b"x")
    with pytest.raises(InvalidEnvelope):
        open_envelope(env, expect="request", keyring=RING, max_bytes=1 << 20, at_ms=IAT)
    env = seal(derive_keys(other, TENANT, 1), project_header(request_fields()), b"x")
    with pytest.raises(Rejected, match="tampered"):
        ind_open(env, expect="request", roots=ROOTS, now_ms=IAT)
