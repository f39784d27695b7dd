"""Both AES-GCM implementations produce and accept exactly the same bytes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from maas_worker.crypto import aead
from maas_worker.crypto.envelope import Header, open_envelope, seal
from maas_worker.errors import InvalidEnvelope
from maas_worker.tenancy.keyring import Keyring

SIZES = [0, 1, 15, 16, 17, 1024, 65_536 + 3]


@pytest.fixture(autouse=True)
def restore_backend() -> Iterator[None]:
    yield
    aead.use("auto")


def _pair() -> tuple[aead.Sealer, aead.Opener, aead.Sealer, aead.Opener]:
    fast = aead._openssl()
    assert fast is not None, "the dev extra installs cryptography"
    return aead._pyc_seal, aead._pyc_open, fast[0], fast[1]


@pytest.mark.parametrize("size", SIZES)
def test_identical_ciphertexts_and_cross_opening(size: int) -> None:
    pyc_seal, pyc_open, ssl_seal, ssl_open = _pair()
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(size % 97)
    plaintext = os.urandom(size)
    a = b"".join(pyc_seal(key, nonce, plaintext, aad))
    b = b"".join(ssl_seal(key, nonce, plaintext, aad))
    assert a == b and len(a) == size + aead.TAG_BYTES
    assert pyc_open(key, nonce, b, aad) == plaintext
    assert ssl_open(key, nonce, memoryview(a), aad) == plaintext


@pytest.mark.parametrize("which", [0, 1])
def test_both_refuse_any_change(which: int) -> None:
    pyc_seal, pyc_open, _, ssl_open = _pair()
    opener = (pyc_open, ssl_open)[which]
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    sealed = b"".join(pyc_seal(key, nonce, b"some plaintext", aad))
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(ValueError):
            opener(key, nonce, bytes(bad), aad)
    with pytest.raises(ValueError):
        opener(key, nonce, sealed, aad + b"x")
    with pytest.raises(ValueError):
        opener(key, nonce, sealed[:10], aad)


@pytest.mark.parametrize(("sealer", "opener"), [("pycryptodome", "openssl"),
                                                 ("openssl", "pycryptodome")])
def test_envelopes_cross_between_processes_using_different_backends(sealer: str,
                                                                    opener: str) -> None:
    ring = Keyring().with_new_tenant("acme")
    kv = ring.tenant("acme").primary()
    header = Header("request", kv.version, 1, 2**40, "high", "acme", "job-1", "maas.infer",
                    "echo")
    aead.use(sealer)
    envelope = seal(kv.keys("acme"), header, b'{"x": 1}')
    aead.use(opener)
    assert open_envelope(envelope, expect="request", keyring=ring, max_bytes=10_000,
                         at_ms=1000)[1] == b'{"x": 1}'
    bad = bytearray(envelope)
    bad[-40] ^= 1
    with pytest.raises(InvalidEnvelope):
        open_envelope(bytes(bad), expect="request", keyring=ring, max_bytes=10_000, at_ms=1000)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert aead.use("pycryptodome") == "pycryptodome" == aead.backend()
    assert aead.use("auto") == "openssl"
    with pytest.raises(ValueError, match="unknown"):
        aead.use("rot13")
    monkeypatch.setattr(aead, "_openssl", lambda: None)
    assert aead.use("auto") == "pycryptodome"
    with pytest.raises(ValueError, match="fast"):
        aead.use("openssl")
