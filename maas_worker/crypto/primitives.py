"""The only module that imports a crypto library: AES-256-GCM, HKDF-SHA256 and Ed25519.

Two implementations of the same operations, both core dependencies:
``openssl`` (OpenSSL through ``cryptography``) and ``pycryptodome``. They give
identical bytes (tests/unit/test_aead.py and test_primitives.py seal, derive
and sign with one and check with the other, known answers on both), so what a
process chose never shows on the wire, and clients and workers may differ.

An implementation is an immutable `CryptoBackend`, picked once by name with
`crypto_backend` (``auto`` is OpenSSL, the faster: docs/benchmarks.md). The
`Client` and the `WorkerRuntime` pick theirs from ``MAAS_CRYPTO_BACKEND`` and
pass it to the envelope; `DEFAULT`, the ``auto`` choice made at import, serves
everything else (key derivation, model signatures, model artifacts) and any
call that passes none. There is no process-wide switch to flip.

HMAC-SHA256 and SHA-256 come from the standard library (``hmac``, ``hashlib``)
where they are used; those are not crypto libraries for this rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF as PycHKDF
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The names `crypto_backend` accepts (``MAAS_CRYPTO_BACKEND``); ``auto`` is OpenSSL.
BACKENDS = ("auto", "pycryptodome", "openssl")
AES_KEY_BYTES = 32
TAG_BYTES = 16
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
#: Distinct AES keys an OpenSSL backend keeps a key schedule for (then it starts over).
MAX_CACHED_KEYS = 4096

Buffer = bytes | bytearray | memoryview


class CryptoBackend(ABC):
    """One library's AES-256-GCM, HKDF-SHA256 and Ed25519; holds no choice and no secrets.

    Every failure to authenticate (a GCM tag, an Ed25519 signature) is a
    ``ValueError`` or ``False``, never a library's own exception type.
    """

    #: The name `crypto_backend` knows it by.
    name: ClassVar[str]

    # -- AES-256-GCM ---------------------------------------------------------------
    @abstractmethod
    def seal_parts(
        self, key: bytes, nonce: bytes, plaintext: Buffer, aad: Buffer
    ) -> tuple[bytes, ...]:
        """AES-256-GCM encrypt: ciphertext || 16-byte tag, as pieces to join once.

        .. warning:: a nonce must never repeat under one key.
        """

    def seal(self, key: bytes, nonce: bytes, plaintext: Buffer, aad: Buffer) -> bytes:
        """AES-256-GCM encrypt: returns ciphertext || 16-byte tag."""
        return b"".join(self.seal_parts(key, nonce, plaintext, aad))

    @abstractmethod
    def open(self, key: bytes, nonce: bytes, sealed: Buffer, aad: Buffer) -> bytes:
        """AES-256-GCM decrypt ciphertext || tag; ``ValueError`` if it does not verify."""

    # -- HKDF-SHA256 (RFC 5869) ------------------------------------------------------
    @abstractmethod
    def hkdf_sha256(
        self, secret: bytes, *, info: bytes, salt: bytes = b"", length: int = 32
    ) -> bytes:
        """``length`` bytes of HKDF-SHA256; an empty salt is the RFC's zero salt."""

    # -- Ed25519 (RFC 8032, pure) ----------------------------------------------------
    @abstractmethod
    def ed25519_public(self, seed: bytes) -> bytes:
        """The raw 32-byte public key of a 32-byte private seed."""

    @abstractmethod
    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        """The 64-byte signature of ``message`` (deterministic)."""

    @abstractmethod
    def ed25519_verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` is ``public``'s over ``message``."""

    @abstractmethod
    def ed25519_private_pem(self, seed: bytes) -> str:
        """The private key as unencrypted PKCS#8 PEM, ending in a newline."""

    @abstractmethod
    def ed25519_public_pem(self, public: bytes) -> str:
        """The public key as SubjectPublicKeyInfo PEM, ending in a newline."""

    @abstractmethod
    def ed25519_load_pem(self, text: str) -> tuple[bytes, bool]:
        """``(raw key, is_private)`` of an Ed25519 key in PEM (or OpenSSH) text.

        The raw key is the seed of a private key, else the public key.
        ``ValueError`` if the text is not an Ed25519 key.
        """


class OpenSsl(CryptoBackend):
    """OpenSSL through ``cryptography``: the fast path, and what ``auto`` picks."""

    name = "openssl"

    def __init__(self) -> None:
        # One AESGCM object per key: its key schedule is the expensive part.
        # A cache, not a setting: what comes out does not depend on it.
        self._ciphers: dict[bytes, AESGCM] = {}

    def _cipher(self, key: bytes) -> AESGCM:
        c = self._ciphers.get(key)
        if c is None:
            if len(self._ciphers) >= MAX_CACHED_KEYS:
                self._ciphers.clear()
            c = self._ciphers[key] = AESGCM(key)
        return c

    def seal_parts(
        self, key: bytes, nonce: bytes, plaintext: Buffer, aad: Buffer
    ) -> tuple[bytes, ...]:
        """AES-256-GCM encrypt (one piece: OpenSSL returns ciphertext and tag joined)."""
        return (self._cipher(key).encrypt(nonce, plaintext, aad),)

    def open(self, key: bytes, nonce: bytes, sealed: Buffer, aad: Buffer) -> bytes:
        """AES-256-GCM decrypt ciphertext || tag; ``ValueError`` if it does not verify."""
        try:
            return self._cipher(key).decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise ValueError("tag mismatch") from None

    def hkdf_sha256(
        self, secret: bytes, *, info: bytes, salt: bytes = b"", length: int = 32
    ) -> bytes:
        """``length`` bytes of HKDF-SHA256."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(
            secret
        )

    def ed25519_public(self, seed: bytes) -> bytes:
        """The raw public key of ``seed``."""
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()

    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed).sign(message)

    def ed25519_verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        """True if the signature verifies."""
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def ed25519_private_pem(self, seed: bytes) -> str:
        """PKCS#8 PEM."""
        return (
            ed25519.Ed25519PrivateKey.from_private_bytes(seed)
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
        )

    def ed25519_public_pem(self, public: bytes) -> str:
        """SubjectPublicKeyInfo PEM."""
        return (
            ed25519.Ed25519PublicKey.from_public_bytes(public)
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def ed25519_load_pem(self, text: str) -> tuple[bytes, bool]:
        """The raw key of an Ed25519 PEM (or OpenSSH) text and whether it is private."""
        data = text.strip().encode()
        key = _first_key(data)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.private_bytes_raw(), True
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key.public_bytes_raw(), False
        raise ValueError("not an Ed25519 key in PEM")


#: The formats pycryptodome's ECC.import_key reads for Ed25519 (so a key file one
#: implementation accepts the other accepts too), tried in turn: a text is at most
#: one of them, and each loader refuses the others' texts.
_KEY_LOADERS: tuple[Callable[[bytes], object], ...] = (
    serialization.load_ssh_public_key,
    lambda data: serialization.load_pem_private_key(data, password=None),
    lambda data: serialization.load_ssh_private_key(data, password=None),
    serialization.load_pem_public_key,
)


def _first_key(data: bytes) -> object:
    """The key the first loader that accepts ``data`` reads; ValueError if none does."""
    for load in _KEY_LOADERS:
        try:
            return load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise ValueError("not an Ed25519 key in PEM")


class Pycryptodome(CryptoBackend):
    """``pycryptodome``: the implementation the design names; same bytes, slower AES-GCM."""

    name = "pycryptodome"

    def seal_parts(
        self, key: bytes, nonce: bytes, plaintext: Buffer, aad: Buffer
    ) -> tuple[bytes, ...]:
        """AES-256-GCM encrypt (two pieces: the caller joins once, no extra copy of the body)."""
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
        cipher.update(aad)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return ciphertext, tag

    def open(self, key: bytes, nonce: bytes, sealed: Buffer, aad: Buffer) -> bytes:
        """AES-256-GCM decrypt ciphertext || tag; ``ValueError`` if it does not verify."""
        view = memoryview(sealed)
        if len(view) < TAG_BYTES:
            raise ValueError("truncated")
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
        cipher.update(aad)
        plaintext: bytes = cipher.decrypt_and_verify(view[:-TAG_BYTES], view[-TAG_BYTES:])
        return plaintext

    def hkdf_sha256(
        self, secret: bytes, *, info: bytes, salt: bytes = b"", length: int = 32
    ) -> bytes:
        """``length`` bytes of HKDF-SHA256."""
        key = PycHKDF(secret, length, salt, SHA256, context=info)
        assert isinstance(key, bytes)
        return key

    def ed25519_public(self, seed: bytes) -> bytes:
        """The raw public key of ``seed``."""
        raw: bytes = ECC.construct(curve="Ed25519", seed=seed).public_key().export_key(format="raw")
        return raw

    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        signature: bytes = eddsa.new(ECC.construct(curve="Ed25519", seed=seed), "rfc8032").sign(
            message
        )
        return signature

    def ed25519_verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        """True if the signature verifies."""
        try:
            eddsa.new(eddsa.import_public_key(public), "rfc8032").verify(message, signature)
        except ValueError:
            return False
        return True

    def ed25519_private_pem(self, seed: bytes) -> str:
        """PKCS#8 PEM."""
        pem = ECC.construct(curve="Ed25519", seed=seed).export_key(format="PEM")
        assert isinstance(pem, str)
        return pem + "\n"

    def ed25519_public_pem(self, public: bytes) -> str:
        """SubjectPublicKeyInfo PEM."""
        pem = eddsa.import_public_key(public).export_key(format="PEM")
        assert isinstance(pem, str)
        return pem + "\n"

    def ed25519_load_pem(self, text: str) -> tuple[bytes, bool]:
        """The raw key of an Ed25519 PEM (or OpenSSH) text and whether it is private."""
        try:
            key = ECC.import_key(text)
        except (ValueError, IndexError, TypeError):
            raise ValueError("not an Ed25519 key in PEM") from None
        if key.curve != "Ed25519":
            raise ValueError("not an Ed25519 key in PEM")
        if key.has_private():
            seed: bytes = key.seed
            return seed, True
        raw: bytes = key.export_key(format="raw")
        return raw, False


OPENSSL = OpenSsl()
PYCRYPTODOME = Pycryptodome()
#: Every implementation, for tests that show they agree.
IMPLEMENTATIONS: tuple[CryptoBackend, ...] = (OPENSSL, PYCRYPTODOME)


def crypto_backend(name: str = "auto") -> CryptoBackend:
    """The implementation called ``name`` (one of `BACKENDS`); ``ValueError`` if unknown."""
    if name in ("auto", OPENSSL.name):
        return OPENSSL
    if name == PYCRYPTODOME.name:
        return PYCRYPTODOME
    raise ValueError(f"unknown crypto backend {name!r}; use one of {', '.join(BACKENDS)}")


#: The ``auto`` choice, made once: what every call that is given no backend uses.
DEFAULT: CryptoBackend = crypto_backend("auto")


# -- Ed25519 keys as values ----------------------------------------------------------
@dataclass(frozen=True)
class Ed25519PublicKey:
    """An Ed25519 public key (raw 32 bytes); verifies with `DEFAULT`."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != ED25519_KEY_BYTES:
            raise ValueError("an Ed25519 public key is 32 bytes")

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` is this key's over ``message``."""
        return DEFAULT.ed25519_verify(self.raw, message, signature)

    def pem(self) -> str:
        """SubjectPublicKeyInfo PEM, ending in a newline."""
        return DEFAULT.ed25519_public_pem(self.raw)


@dataclass(frozen=True)
class Ed25519PrivateKey:
    """An Ed25519 private key (its 32-byte seed, never printed); signs with `DEFAULT`."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != ED25519_KEY_BYTES:
            raise ValueError("an Ed25519 private key is a 32-byte seed")

    @classmethod
    def generate(cls) -> Ed25519PrivateKey:
        """A fresh key from the OS RNG."""
        return cls(ed25519.Ed25519PrivateKey.generate().private_bytes_raw())

    def public_key(self) -> Ed25519PublicKey:
        """Its public key."""
        return Ed25519PublicKey(DEFAULT.ed25519_public(self.seed))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte signature of ``message``."""
        return DEFAULT.ed25519_sign(self.seed, message)

    def pem(self) -> str:
        """Unencrypted PKCS#8 PEM, ending in a newline."""
        return DEFAULT.ed25519_private_pem(self.seed)


def load_ed25519_pem(text: str) -> Ed25519PrivateKey | Ed25519PublicKey:
    """The Ed25519 key in PEM ``text``; ``ValueError`` if it is not one."""
    raw, private = DEFAULT.ed25519_load_pem(text)
    return Ed25519PrivateKey(raw) if private else Ed25519PublicKey(raw)
