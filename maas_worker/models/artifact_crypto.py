"""Encryption at rest for model artifacts: AES-256-GCM in authenticated chunks.

File layout (all integers big-endian)::

    header   magic "MAASMOD1" (8) | chunk size u32 (4) | key id (8) | salt (32)
    chunks   ciphertext (chunk size bytes, the last one 0..chunk size) | GCM tag (16)

The file key is HKDF-SHA256(model key, salt, "maas-worker/model-artifact/v1"),
fresh for every file (random salt), so the nonce can be a counter: 11 bytes of
chunk index and a final byte that is 1 on the last chunk only. Every chunk is
authenticated with the whole header as associated data. So a chunk cannot be
altered, reordered, dropped, duplicated or moved to another file, and a file
cut at a chunk boundary fails because its new last chunk was not sealed as
last (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizar).

Decryption streams: ciphertext is read one chunk at a time and the plaintext
goes to a sink (the worker uses an anonymous in-memory file, see
`repository`), so a large artifact is never held twice and never written to
disk in the clear.

Model keys are 32-byte secrets in a JSON file (``MAAS_MODEL_KEYS``, mode 0600,
refused if group or others can access it), named by random 8-byte ids.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from maas_worker.crypto import primitives
from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.files import write_atomic

MAGIC = b"MAASMOD1"
KEY_ID_BYTES = 8
SALT_BYTES = 32
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 4 + KEY_ID_BYTES + SALT_BYTES
DEFAULT_CHUNK_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 * 1024 * 1024
FILE_KEY_INFO = b"maas-worker/model-artifact/v1"
MODEL_KEYS_FORMAT = 1


class Readable(Protocol):
    """Anything with ``read(n) -> bytes`` (a file, or a reader that hashes what it reads)."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes."""
        ...


class Writable(Protocol):
    """Anything with ``write(data) -> int`` (a file, an in-memory file)."""

    def write(self, data: bytes, /) -> int:
        """Write ``data``; return its length."""
        ...


@dataclass(frozen=True)
class ModelKey:
    """One model encryption key (never printed)."""

    key_id: str
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> ModelKey:
        """A fresh random key with a random id."""
        return cls(secrets.token_hex(KEY_ID_BYTES), secrets.token_bytes(32))


def is_encrypted(head: bytes) -> bool:
    """True if a file starting with ``head`` is in this encrypted format."""
    return head[: len(MAGIC)] == MAGIC


def _file_key(secret: bytes, salt: bytes) -> bytes:
    return primitives.DEFAULT.hkdf_sha256(secret, info=FILE_KEY_INFO, salt=salt)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, key: ModelKey, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Encrypt everything ``src`` yields into ``dst``; returns the bytes written."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    salt = secrets.token_bytes(SALT_BYTES)
    header = MAGIC + chunk_bytes.to_bytes(4, "big") + bytes.fromhex(key.key_id) + salt
    file_key = _file_key(key.secret, salt)
    written = dst.write(header)
    index = 0
    chunk = src.read(chunk_bytes)
    while True:
        following = src.read(chunk_bytes) if len(chunk) == chunk_bytes else b""
        last = not following
        for part in primitives.DEFAULT.seal_parts(file_key, _nonce(index, last), chunk, header):
            written += dst.write(part)
        if last:
            return written
        chunk, index = following, index + 1


def key_id_of(head: bytes) -> str:
    """The model key id an encrypted file names in its header (unauthenticated)."""
    if len(head) < HEADER_BYTES or not is_encrypted(head):
        raise ModelRejected("encrypted artifact header is malformed")
    return head[len(MAGIC) + 4 : len(MAGIC) + 4 + KEY_ID_BYTES].hex()


def decrypt_stream(src: Readable, size: int, sink: Writable, key: ModelKey) -> int:
    """Decrypt a file of ``size`` bytes from ``src`` into ``sink``, chunk by chunk.

    Raises `ModelRejected` on any failure (wrong key, altered, reordered or
    truncated chunks, trailing bytes). What was already written to ``sink`` is
    then unauthenticated: the caller must discard it. Returns the plaintext size.
    """
    header = src.read(HEADER_BYTES)
    if key_id_of(header) != key.key_id:
        raise ModelRejected("encrypted with another model key")
    chunk_bytes = int.from_bytes(header[len(MAGIC) : len(MAGIC) + 4], "big")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ModelRejected("encrypted artifact header is malformed")
    body = size - HEADER_BYTES
    if body < TAG_BYTES:
        raise ModelRejected("encrypted artifact is truncated")
    full = chunk_bytes + TAG_BYTES
    count = max(1, -(-body // full))
    file_key = _file_key(key.secret, header[-SALT_BYTES:])
    total = 0
    for index in range(count):
        last = index == count - 1
        want = body - index * full if last else full
        data = src.read(want)
        if len(data) != want or want < TAG_BYTES:
            raise ModelRejected("encrypted artifact is truncated")
        try:
            plain = primitives.DEFAULT.open(file_key, _nonce(index, last), data, header)
        except ValueError:
            raise ModelRejected("encrypted artifact fails authentication") from None
        total += sink.write(plain)
    if src.read(1):
        raise ModelRejected("encrypted artifact has trailing bytes")
    return total


@dataclass(frozen=True)
class ModelKeys:
    """Model encryption keys by id."""

    keys: Mapping[str, ModelKey] = field(default_factory=dict)

    def get(self, key_id: str) -> ModelKey:
        """The key, or `ModelRejected` if this host does not hold it."""
        try:
            return self.keys[key_id]
        except KeyError:
            raise ModelRejected(f"model key {key_id} is not available on this host") from None

    def with_key(self, key: ModelKey) -> ModelKeys:
        """A copy with ``key`` added."""
        return ModelKeys({**self.keys, key.key_id: key})

    @classmethod
    def load(cls, path: Path) -> ModelKeys:
        """Read the key file; `ConfigError` if missing, unsafe or malformed."""
        try:
            st = path.stat()
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"model keys {path} unreadable: {exc.strerror} (MAAS_MODEL_KEYS)"
            ) from None
        if st.st_mode & 0o077:
            raise ConfigError(
                f"model keys {path} are accessible by group or others; run: chmod 600 {path}"
            )
        try:
            doc = json.loads(raw)
            if doc.get("format") != MODEL_KEYS_FORMAT:
                raise ValueError
            keys = {}
            for kid, secret_b64 in doc["keys"].items():
                secret = base64.b64decode(secret_b64, validate=True)
                if len(secret) != 32 or len(bytes.fromhex(kid)) != KEY_ID_BYTES:
                    raise ValueError
                keys[kid] = ModelKey(kid, secret)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise ConfigError(f"model keys {path} are malformed") from None
        return cls(keys)

    def save(self, path: Path) -> None:
        """Write the key file atomically, mode 0600."""
        doc = {
            "format": MODEL_KEYS_FORMAT,
            "keys": {k.key_id: base64.b64encode(k.secret).decode() for k in self.keys.values()},
        }
        write_atomic(path, json.dumps(doc, indent=2).encode(), private=True)


class ModelKeysSource:
    """The model keys of a long-running process: read on first need, re-read on change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys = ModelKeys()

    def get(self) -> ModelKeys:
        """The current keys; `ModelRejected` if the file is missing or unusable."""
        with self._lock:
            try:
                st = self._path.stat()
            except OSError:
                raise ModelRejected("no model keys on this host (MAAS_MODEL_KEYS)") from None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    self._keys = ModelKeys.load(self._path)
                except ConfigError:
                    raise ModelRejected(
                        "the model key file on this host is unusable "
                        "(MAAS_MODEL_KEYS: missing, malformed or not "
                        "mode 0600)"
                    ) from None
                self._stamp = stamp
            return self._keys
