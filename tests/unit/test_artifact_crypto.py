"""Chunked AES-256-GCM for model artifacts: round trips, every region tampered, truncation."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.models.artifact_crypto import (
    HEADER_BYTES,
    MAGIC,
    TAG_BYTES,
    ModelKey,
    ModelKeys,
    ModelKeysSource,
    decrypt_stream,
    encrypt_stream,
    is_encrypted,
    key_id_of,
)

CHUNK = 4096
KEY = ModelKey("00112233445566aa", bytes(range(32)))


def encrypt(data: bytes, key: ModelKey = KEY, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    written = encrypt_stream(io.BytesIO(data), out, key, chunk_bytes=chunk)
    assert written == len(out.getvalue())
    return out.getvalue()


def decrypt(blob: bytes, key: ModelKey = KEY) -> bytes:
    sink = io.BytesIO()
    n = decrypt_stream(io.BytesIO(blob), len(blob), sink, key)
    assert n == len(sink.getvalue())
    return sink.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data)
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == HEADER_BYTES + size + chunks * TAG_BYTES
    assert is_encrypted(blob) and blob.startswith(MAGIC)
    assert key_id_of(blob) == KEY.key_id
    assert decrypt(blob) == data


def test_edge_bytes_round_trip() -> None:
    for data in (b"", b"\x00\xff", b"\x00" * CHUNK):
        assert decrypt(encrypt(data)) == data


def test_same_plaintext_encrypts_differently() -> None:
    assert encrypt(b"model") != encrypt(b"model")  # fresh salt, hence fresh file key


def test_every_byte_position_is_authenticated() -> None:
    blob = encrypt(os.urandom(2 * CHUNK + 100))
    # Header, first ciphertext, first tag, a middle chunk, the last tag.
    for pos in (
        0,
        9,
        13,
        30,
        HEADER_BYTES - 1,
        HEADER_BYTES,
        HEADER_BYTES + CHUNK,
        HEADER_BYTES + CHUNK + TAG_BYTES + 5,
        len(blob) - 1,
    ):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ModelRejected):
            decrypt(bytes(bad))


def test_truncated_at_a_chunk_boundary_is_refused() -> None:
    blob = encrypt(os.urandom(3 * CHUNK))
    cut = blob[: HEADER_BYTES + 2 * (CHUNK + TAG_BYTES)]
    with pytest.raises(ModelRejected, match="authentication"):
        decrypt(cut)


@pytest.mark.parametrize("keep", [0, 10, HEADER_BYTES, HEADER_BYTES + TAG_BYTES - 1])
def test_truncated_anywhere_is_refused(keep: int) -> None:
    with pytest.raises(ModelRejected):
        decrypt(encrypt(b"x" * 100)[:keep])


def test_reordered_chunks_are_refused() -> None:
    blob = encrypt(os.urandom(3 * CHUNK))
    full = CHUNK + TAG_BYTES
    head, c0, c1, rest = (
        blob[:HEADER_BYTES],
        blob[HEADER_BYTES : HEADER_BYTES + full],
        blob[HEADER_BYTES + full : HEADER_BYTES + 2 * full],
        blob[HEADER_BYTES + 2 * full :],
    )
    with pytest.raises(ModelRejected):
        decrypt(head + c1 + c0 + rest)


def test_chunk_from_another_file_is_refused() -> None:
    a, b = encrypt(os.urandom(2 * CHUNK)), encrypt(os.urandom(2 * CHUNK))
    with pytest.raises(ModelRejected):
        decrypt(a[:HEADER_BYTES] + b[HEADER_BYTES:])


def test_wrong_key_and_wrong_key_id() -> None:
    blob = encrypt(b"secret model")
    with pytest.raises(ModelRejected, match="another model key"):
        decrypt(blob, ModelKey("ffffffffffffffff", bytes(32)))
    with pytest.raises(ModelRejected, match="authentication"):
        decrypt(blob, ModelKey(KEY.key_id, bytes(32)))


def test_trailing_bytes_are_refused() -> None:
    blob = encrypt(b"abc")
    sink = io.BytesIO()
    with pytest.raises(ModelRejected):
        decrypt_stream(io.BytesIO(blob + b"!"), len(blob), sink, KEY)


def test_chunk_size_is_bounded() -> None:
    with pytest.raises(ValueError):
        encrypt(b"x", chunk=100)


def test_model_keys_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ModelKeys().with_key(KEY).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ModelKeys.load(path).get(KEY.key_id) == KEY
    assert "secret" not in repr(KEY) and KEY.secret.hex() not in repr(KEY)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        ModelKeys.load(path)


def test_model_keys_source_reports_missing_or_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = ModelKeysSource(path)
    with pytest.raises(ModelRejected, match="no model keys"):
        source.get()
    path.write_text("{}")
    path.chmod(0o600)
    with pytest.raises(ModelRejected, match="unusable") as err:
        source.get()
    assert str(tmp_path) not in str(err.value)
    ModelKeys().with_key(KEY).save(path)
    assert source.get().get(KEY.key_id) == KEY
    with pytest.raises(ModelRejected, match="not available"):
        source.get().get("0123456789abcdef")
