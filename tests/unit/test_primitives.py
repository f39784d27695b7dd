"""HKDF-SHA256 and Ed25519: both implementations give the published answers and each other's bytes.

AES-256-GCM has its own file (test_aead.py). Every test runs on each
implementation, or crosses them (made with one, checked with the other).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maas_worker.crypto import primitives
from maas_worker.crypto.primitives import (
    CryptoBackend,
    Ed25519PrivateKey,
    Ed25519PublicKey,
    load_ed25519_pem,
)

IMPLEMENTATIONS = [pytest.param(impl, id=impl.name) for impl in primitives.IMPLEMENTATIONS]
PAIRS = [
    pytest.param(a, b, id=f"{a.name}-to-{b.name}")
    for a in primitives.IMPLEMENTATIONS
    for b in primitives.IMPLEMENTATIONS
]

# RFC 5869, appendix A: test cases 1 (salt and info) and 3 (neither).
HKDF_VECTORS = [
    (
        bytes([0x0B] * 22),
        bytes(range(13)),
        bytes(range(0xF0, 0xFA)),
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes([0x0B] * 22),
        b"",
        b"",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]
# The envelope's derived request key (docs/envelope.md section 7; test_envelope.py).
ENVELOPE_SECRET = bytes(range(32))
ENVELOPE_INFO = b"maas-worker/v1/request-enc\x00acme\x00\x00\x00\x00\x01"
ENVELOPE_REQUEST_ENC = "ab49c80d54be03409401455a7ae485cb396a11a6b08e2d0a59f2911feddc1a66"

# RFC 8032, section 7.1: tests 1 (empty message) and 2 (one byte).
ED25519_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
        "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da0"
        "85ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


# -- HKDF-SHA256 ---------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_VECTORS)
def test_hkdf_known_answers(
    impl: CryptoBackend, ikm: bytes, salt: bytes, info: bytes, length: int, okm: str
) -> None:
    assert impl.hkdf_sha256(ikm, info=info, salt=salt, length=length).hex() == okm


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_hkdf_gives_the_envelope_keys_of_the_documented_vectors(impl: CryptoBackend) -> None:
    assert impl.hkdf_sha256(ENVELOPE_SECRET, info=ENVELOPE_INFO).hex() == ENVELOPE_REQUEST_ENC


def test_hkdf_implementations_agree_on_random_input() -> None:
    for _ in range(50):
        secret, salt, info = os.urandom(32), os.urandom(os.urandom(1)[0] % 40), os.urandom(20)
        out = {
            impl.hkdf_sha256(secret, info=info, salt=salt) for impl in primitives.IMPLEMENTATIONS
        }
        assert len(out) == 1


# -- Ed25519 ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("seed", "public", "message", "signature"), ED25519_VECTORS)
def test_ed25519_known_answers(
    impl: CryptoBackend, seed: str, public: str, message: str, signature: str
) -> None:
    raw_seed, raw_public, msg = bytes.fromhex(seed), bytes.fromhex(public), bytes.fromhex(message)
    assert impl.ed25519_public(raw_seed).hex() == public
    assert impl.ed25519_sign(raw_seed, msg).hex() == signature
    assert impl.ed25519_verify(raw_public, msg, bytes.fromhex(signature))


@pytest.mark.parametrize(("signer", "verifier"), PAIRS)
def test_ed25519_signatures_cross_and_any_change_fails(
    signer: CryptoBackend, verifier: CryptoBackend
) -> None:
    seed, message = os.urandom(32), b"maas-worker model manifest v1\x00{}"
    public = signer.ed25519_public(seed)
    signature = signer.ed25519_sign(seed, message)
    assert verifier.ed25519_verify(public, message, signature)
    assert not verifier.ed25519_verify(public, message + b" ", signature)
    for i in range(len(signature)):
        bad = bytearray(signature)
        bad[i] ^= 0x01
        assert not verifier.ed25519_verify(public, message, bytes(bad))
    assert not verifier.ed25519_verify(public, message, signature[:-1])
    other = verifier.ed25519_public(os.urandom(32))
    assert not verifier.ed25519_verify(other, message, signature)


@pytest.mark.parametrize(("writer", "reader"), PAIRS)
def test_ed25519_key_files_are_identical_and_read_back(
    writer: CryptoBackend, reader: CryptoBackend
) -> None:
    seed = os.urandom(32)
    public = writer.ed25519_public(seed)
    private_pem, public_pem = writer.ed25519_private_pem(seed), writer.ed25519_public_pem(public)
    assert private_pem == reader.ed25519_private_pem(seed)
    assert public_pem == reader.ed25519_public_pem(public)
    assert private_pem.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----\n") and public_pem.endswith("\n")
    assert reader.ed25519_load_pem(private_pem) == (seed, True)
    assert reader.ed25519_load_pem(public_pem) == (public, False)


# OpenSSH's own texts of the Ed25519 key with seed 00 01 .. 1f (ssh-keygen's formats).
OPENSSH_PRIVATE = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz
c2gtZWQyNTUxOQAAACADoQe/884Qvh1w3RjnS8CZZ+TWMJulDV8d3IZkElUxuAAA
AIgGGE79BhhO/QAAAAtzc2gtZWQyNTUxOQAAACADoQe/884Qvh1w3RjnS8CZZ+TW
MJulDV8d3IZkElUxuAAAAEAAAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0e
HwOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4AAAAAAECAwQF
-----END OPENSSH PRIVATE KEY-----
"""
OPENSSH_PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_ed25519_load_reads_openssh_key_files_too(impl: CryptoBackend) -> None:
    seed = bytes(range(32))
    public = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
    assert impl.ed25519_public(seed) == public
    assert impl.ed25519_load_pem(OPENSSH_PRIVATE) == (seed, True)
    assert impl.ed25519_load_pem(OPENSSH_PUBLIC) == (public, False)


# Valid keys that are not Ed25519 (fixed texts: this file imports no crypto library).
P256_PUBLIC_PEM = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAExX/7xC1vFGiOJwoMC3ZwD8e9H1KJ
r+Zcm0d8kG79yWD3srZElnk+9drGNuG99HI7KHDXH/xhS1tE5M5fD7NU5g==
-----END PUBLIC KEY-----
"""
X25519_PRIVATE_PEM = """-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VuBCIEIFDDerqxTmbEQe/AZciJCgLcoEluiuHtSEPCTT1oTiRp
-----END PRIVATE KEY-----
"""


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        P256_PUBLIC_PEM,
        X25519_PRIVATE_PEM,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_ed25519_load_refuses_anything_else(impl: CryptoBackend, text: str) -> None:
    with pytest.raises(ValueError):
        impl.ed25519_load_pem(text)


def test_key_values_round_trip_and_never_print_the_seed() -> None:
    key = Ed25519PrivateKey.generate()
    loaded = load_ed25519_pem(key.pem())
    assert loaded == key and key.seed.hex() not in repr(key)
    public = load_ed25519_pem(key.public_key().pem())
    assert isinstance(public, Ed25519PublicKey) and public == key.public_key()
    assert public.verify(b"m", key.sign(b"m")) and not public.verify(b"n", key.sign(b"m"))
    with pytest.raises(ValueError):
        Ed25519PublicKey(b"short")


def test_only_the_primitives_module_imports_a_crypto_library() -> None:
    # The ruff banned-api rule (TID251) is the guard; this shows it is configured.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--select",
            "TID251",
            "--stdin-filename",
            "maas_worker/example.py",
            "-",
        ],
        input="from Crypto.Cipher import AES\nimport cryptography.fernet\n",
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 1
    assert result.stdout.count("TID251") == 2
