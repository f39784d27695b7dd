"""Both AES-GCM implementations produce and accept exactly the same bytes."""

from __future__ import annotations

import os

import pytest

from maas_worker.crypto import primitives
from maas_worker.crypto.envelope import Header, open_envelope, seal
from maas_worker.crypto.primitives import OPENSSL, PYCRYPTODOME, CryptoBackend, crypto_backend
from maas_worker.errors import InvalidEnvelope
from maas_worker.tenancy.keyring import Keyring

SIZES = [0, 1, 15, 16, 17, 1024, 65_536 + 3]
IMPLEMENTATIONS = [pytest.param(impl, id=impl.name) for impl in primitives.IMPLEMENTATIONS]
#: Every (sealer, opener) pair, each implementation opening what the other sealed.
PAIRS = [
    pytest.param(a, b, id=f"{a.name}-to-{b.name}")
    for a in primitives.IMPLEMENTATIONS
    for b in primitives.IMPLEMENTATIONS
]


@pytest.mark.parametrize("size", SIZES)
def test_identical_ciphertexts_and_cross_opening(size: int) -> None:
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(size % 97)
    plaintext = os.urandom(size)
    a = PYCRYPTODOME.seal(key, nonce, plaintext, aad)
    b = OPENSSL.seal(key, nonce, plaintext, aad)
    assert a == b and len(a) == size + primitives.TAG_BYTES
    assert PYCRYPTODOME.open(key, nonce, b, aad) == plaintext
    assert OPENSSL.open(key, nonce, memoryview(a), aad) == plaintext


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_answer(impl: CryptoBackend) -> None:
    # Test case 16 of the GCM specification (AES-256, 96-bit IV, 60-byte plaintext,
    # 20-byte AAD): McGrew and Viega, "The Galois/Counter Mode of Operation".
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    nonce = bytes.fromhex("cafebabefacedbaddecaf888")
    plaintext = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    sealed = bytes.fromhex(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        "76fc6ece0f4e1768cddf8853bb2d551b"
    )
    assert impl.seal(key, nonce, plaintext, aad) == sealed
    assert impl.open(key, nonce, sealed, aad) == plaintext


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_refuses_any_change(impl: CryptoBackend) -> None:
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    sealed = PYCRYPTODOME.seal(key, nonce, b"some plaintext", aad)
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(ValueError):
            impl.open(key, nonce, bytes(bad), aad)
    with pytest.raises(ValueError):
        impl.open(key, nonce, sealed, aad + b"x")
    with pytest.raises(ValueError):
        impl.open(key, nonce, sealed[:10], aad)


@pytest.mark.parametrize(("sealer", "opener"), PAIRS)
def test_envelopes_cross_between_processes_using_different_backends(
    sealer: CryptoBackend, opener: CryptoBackend
) -> None:
    ring = Keyring().with_new_tenant("acme")
    kv = ring.tenant("acme").primary()
    header = Header("request", kv.version, 1, 2**40, "high", "acme", "job-1", "maas.infer", "echo")
    envelope = seal(kv.keys("acme"), header, b'{"x": 1}', crypto=sealer)
    assert (
        open_envelope(
            envelope, expect="request", keyring=ring, max_bytes=10_000, at_ms=1000, crypto=opener
        )[1]
        == b'{"x": 1}'
    )
    bad = bytearray(envelope)
    bad[-40] ^= 1
    with pytest.raises(InvalidEnvelope):
        open_envelope(
            bytes(bad), expect="request", keyring=ring, max_bytes=10_000, at_ms=1000, crypto=opener
        )


def test_selection_by_name_is_made_once_and_cannot_be_flipped() -> None:
    assert crypto_backend("pycryptodome") is PYCRYPTODOME
    assert crypto_backend("openssl") is OPENSSL
    assert crypto_backend("auto") is OPENSSL is primitives.DEFAULT  # both are core dependencies
    assert crypto_backend() is OPENSSL
    with pytest.raises(ValueError, match="unknown"):
        crypto_backend("rot13")
    assert not hasattr(primitives, "use")  # no process-wide switch
    assert {impl.name for impl in primitives.IMPLEMENTATIONS} | {"auto"} == set(primitives.BACKENDS)


def test_the_settings_choice_reaches_the_client() -> None:
    from maas_worker.client.client import Client
    from maas_worker.settings import Settings

    ring = Keyring().with_new_tenant("acme")
    for name, impl in [("pycryptodome", PYCRYPTODOME), ("openssl", OPENSSL), ("auto", OPENSSL)]:
        settings = Settings.from_env({"MAAS_CRYPTO_BACKEND": name, "MAAS_TENANT": "acme"})
        client = Client(settings=settings, keyring=ring)
        assert client.crypto is impl
