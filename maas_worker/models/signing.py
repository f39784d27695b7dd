"""Ed25519 signatures over model manifests: keys, signing, and the trusted-signer set.

The model owner keeps the private key (PKCS#8 PEM, mode 0600, never on a
worker); workers hold only public keys (``MAAS_TRUSTED_SIGNERS``), so a
compromised worker can read models but cannot sign one.

The signed message is a fixed domain-separation label followed by the exact
bytes of ``manifest.json``; ``manifest.sig`` is a small JSON document naming
the signer's key id (the first 16 bytes of SHA-256 over the raw 32-byte
public key, in hex) and the 64-byte signature in base64. The key id only
selects which trusted key to try: an unknown id is "untrusted signer", and the
manifest must name the same signer, so the signer a tenant policy sees is
authenticated.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from maas_worker.crypto.primitives import Ed25519PrivateKey, Ed25519PublicKey, load_ed25519_pem
from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.models.manifest import canonical_json

#: Prefixed to the manifest bytes before signing: a signature made for
#: anything else (another protocol, another file) never verifies here.
SIGNATURE_CONTEXT = b"maas-worker model manifest v1\x00"
SIGNATURE_BYTES = 64
#: Largest ``manifest.sig`` read (it is tiny; anything bigger is not ours).
MAX_SIGNATURE_FILE = 4096
PUBLIC_KEY_SUFFIXES = (".pub", ".pem")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id of an Ed25519 public key: hex of SHA-256(raw key)[:16]."""
    return hashlib.sha256(public_key.raw).hexdigest()[:32]


@dataclass(frozen=True)
class SigningKey:
    """A model owner's Ed25519 private key (never printed)."""

    key: Ed25519PrivateKey = field(repr=False)

    @property
    def key_id(self) -> str:
        """The id of its public key."""
        return key_id(self.key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the OS RNG."""
        return cls(Ed25519PrivateKey.generate())

    def public_pem(self) -> str:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return self.key.public_key().pem()

    def sign(self, manifest_bytes: bytes, *, context: bytes = SIGNATURE_CONTEXT) -> bytes:
        """The ``manifest.sig`` content for these manifest bytes.

        ``context`` is the domain-separation label (another document type,
        such as a release pointer, signs under its own label).
        """
        sig = self.key.sign(context + manifest_bytes)
        return canonical_json({"key_id": self.key_id, "signature": base64.b64encode(sig).decode()})

    def save(self, path: Path) -> Path:
        """Write the private key (mode 0600, refusing to overwrite) and ``<path>.pub``.

        Returns the public key's path.
        """
        pem = self.key.pem()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists; refusing to overwrite a signing key") from None
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        pub = path.with_name(path.name + ".pub")
        pub.write_text(self.public_pem())
        return pub

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a private key written by `save`; refused if group or others can read it."""
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(
                f"signing key {path} is accessible by group or others; run: chmod 600 {path}"
            )
        try:
            key = load_ed25519_pem(text)
        except ValueError:
            raise ConfigError(f"{path} is not an Ed25519 private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return cls(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read one Ed25519 public key (PEM); `ConfigError` if it is anything else."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"cannot read public key {path}") from None
    try:
        key = load_ed25519_pem(text)
    except ValueError:
        raise ConfigError(f"{path} is not an Ed25519 public key (PEM)") from None
    if isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a PRIVATE key; workers must hold public keys only")
    return key


def _key_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(
                sorted(f for f in p.iterdir() if f.is_file() and f.suffix in PUBLIC_KEY_SUFFIXES)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"trusted signer key {p} not found (MAAS_TRUSTED_SIGNERS)")
    return files


@dataclass(frozen=True)
class TrustedSigners:
    """The public keys models may be signed with, by key id."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> TrustedSigners:
        """Load every public key file given, or found (``*.pub``, ``*.pem``) in a folder."""
        keys = {}
        for f in _key_files(paths):
            key = load_public_key(f)
            keys[key_id(key)] = key
        return cls(keys)

    def verify(
        self, manifest_bytes: bytes, signature_file: bytes, *, context: bytes = SIGNATURE_CONTEXT
    ) -> str:
        """Check ``manifest.sig`` over the manifest bytes; return the signer's key id.

        Raises `ModelRejected` (unsigned/malformed signature, untrusted signer,
        bad signature). Nothing in the manifest is looked at. ``context`` is
        the label the document type was signed under (see `SigningKey.sign`).
        """
        try:
            doc = json.loads(signature_file)
            kid, sig_b64 = doc["key_id"], doc["signature"]
            sig = base64.b64decode(sig_b64, validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ModelRejected("malformed signature file") from None
        if not isinstance(kid, str) or len(sig) != SIGNATURE_BYTES:
            raise ModelRejected("malformed signature file")
        key = self.keys.get(kid)
        if key is None:
            raise ModelRejected("signed by an untrusted key")
        if not key.verify(context + manifest_bytes, sig):
            raise ModelRejected("signature does not verify")
        return kid


class TrustedSignersSource:
    """The trusted signers of a long-running process, re-read when the files change.

    Removing a key revokes the models it signed (the repository re-verifies
    everything when the set changes). A set that fails to load keeps the last
    good one.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self._paths = tuple(paths)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._signers = TrustedSigners.from_paths(self._paths)

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for f in _key_files(self._paths):
            with contextlib.suppress(OSError):
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def get(self) -> tuple[TrustedSigners, bool]:
        """The current set, and whether it changed since the previous call."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return self._signers, False
                signers = TrustedSigners.from_paths(self._paths)
            except ConfigError:
                return self._signers, False
            changed = set(signers.keys) != set(self._signers.keys)
            self._signers, self._stamp = signers, stamp
            return signers, changed
