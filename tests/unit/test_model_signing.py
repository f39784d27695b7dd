"""Manifests and Ed25519 signatures: canonical form, trusted signers, every failure refused."""

from __future__ import annotations

import base64
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.models.manifest import FileEntry, InputSpec, Manifest, OutputSpec
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.models.signing import (
    SIGNATURE_CONTEXT,
    SigningKey,
    TrustedSigners,
    TrustedSignersSource,
    key_id,
    load_public_key,
)


def manifest(signer: str = "ab" * 16, **kw: object) -> Manifest:
    base = Manifest(
        name="digits",
        version="2",
        artifact="model.onnx",
        input=InputSpec("float_input", "inputs", (None, 64), "float32"),
        outputs=(OutputSpec("label", "labels"),),
        files={"model.onnx": FileEntry("0" * 64, 10)},
        signer=signer,
        created_at="2026-01-01T00:00:00Z",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_manifest_round_trips_in_canonical_form() -> None:
    m = manifest(metadata={"accuracy": 0.97, "dataset": "digits"})
    data = m.to_bytes()
    assert data.endswith(b"}\n") and json.loads(data)["format"] == 1
    assert Manifest.parse_verified(data) == m
    assert m.ref == "digits@2" and not m.encrypted


def test_non_canonical_manifest_is_refused() -> None:
    doc = json.loads(manifest().to_bytes())
    with pytest.raises(ValueError, match="canonical"):
        Manifest.parse_verified(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "change",
    [
        {"format": 2},
        {"runtime": "pickle"},
        {"name": "../evil"},
        {"version": ""},
        {"artifact": "other.onnx"},
        {"files": {"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}},
        {"files": {"model.onnx": {"sha256": "xyz", "size": 1}}},
        {"files": {"model.onnx": {"sha256": "0" * 64, "size": -1}}},
        {"files": {"model.onnx": {"sha256": "0" * 64, "size": 1, "encrypted": True}}},
        {"input": {"name": "x", "key": "inputs", "shape": [None, 64], "dtype": "object"}},
        {"input": {"name": "x", "key": "inputs", "shape": [], "dtype": "float32"}},
        {"outputs": []},
        {"signer": "not hex"},
        {"max_batch": 0},
        {"metadata": {"a": [1]}},
    ],
)
def test_invalid_manifests_are_refused(change: dict[str, object]) -> None:
    doc = {**manifest().to_json(), **change}
    data = (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()
    with pytest.raises(ValueError):
        Manifest.parse_verified(data)


def test_sign_and_verify() -> None:
    key = SigningKey.generate()
    trusted = TrustedSigners({key.key_id: key.key.public_key()})
    data = manifest(signer=key.key_id).to_bytes()
    sig = key.sign(data)
    assert trusted.verify(data, sig) == key.key_id
    assert len(key.key_id) == 32


def test_altered_manifest_or_signature_is_refused() -> None:
    key = SigningKey.generate()
    trusted = TrustedSigners({key.key_id: key.key.public_key()})
    data = manifest(signer=key.key_id).to_bytes()
    sig = key.sign(data)
    with pytest.raises(ModelRejected, match="does not verify"):
        trusted.verify(data.replace(b'"2"', b'"3"'), sig)
    doc = json.loads(sig)
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[5] ^= 1
    doc["signature"] = base64.b64encode(raw).decode()
    with pytest.raises(ModelRejected, match="does not verify"):
        trusted.verify(data, json.dumps(doc).encode())


def test_signature_without_the_context_label_does_not_verify() -> None:
    key = SigningKey.generate()
    data = manifest(signer=key.key_id).to_bytes()
    bare = key.key.sign(data)
    sig = json.dumps({"key_id": key.key_id, "signature": base64.b64encode(bare).decode()})
    with pytest.raises(ModelRejected):
        TrustedSigners({key.key_id: key.key.public_key()}).verify(data, sig.encode())
    assert SIGNATURE_CONTEXT.endswith(b"\x00")


def test_valid_signature_from_an_untrusted_key_is_refused() -> None:
    trusted_key, other = SigningKey.generate(), SigningKey.generate()
    trusted = TrustedSigners({trusted_key.key_id: trusted_key.key.public_key()})
    data = manifest(signer=other.key_id).to_bytes()
    with pytest.raises(ModelRejected, match="untrusted"):
        trusted.verify(data, other.sign(data))
    # Claiming the trusted key's id does not help: the signature is checked with it.
    doc = json.loads(other.sign(data))
    doc["key_id"] = trusted_key.key_id
    with pytest.raises(ModelRejected, match="does not verify"):
        trusted.verify(data, json.dumps(doc).encode())


@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"not json",
        b"{}",
        b'{"key_id": 1, "signature": ""}',
        b'{"key_id": "ab", "signature": "AAAA"}',
        b'{"key_id": "ab", "signature": "!!"}',
    ],
)
def test_malformed_signature_files_are_refused(sig: bytes) -> None:
    with pytest.raises(ModelRejected, match="malformed"):
        TrustedSigners().verify(b"{}", sig)


def test_keys_on_disk(tmp_path: Path) -> None:
    key = SigningKey.generate()
    pub = key.save(tmp_path / "k" / "owner.key")
    assert stat.S_IMODE((tmp_path / "k" / "owner.key").stat().st_mode) == 0o600
    assert SigningKey.load(tmp_path / "k" / "owner.key").key_id == key.key_id
    assert key_id(load_public_key(pub)) == key.key_id
    assert "PRIVATE" not in pub.read_text()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        key.save(tmp_path / "k" / "owner.key")
    (tmp_path / "k" / "owner.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SigningKey.load(tmp_path / "k" / "owner.key")


def test_a_private_key_is_never_accepted_as_a_trusted_signer(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "owner.key")
    with pytest.raises(ConfigError, match="PRIVATE"):
        TrustedSigners.from_paths([tmp_path / "owner.key"])
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        TrustedSigners.from_paths([tmp_path / "junk.pub"])
    with pytest.raises(ConfigError, match="not found"):
        TrustedSigners.from_paths([tmp_path / "missing"])


def test_bundled_model_verifies_with_the_bundled_key() -> None:
    trusted = TrustedSigners.from_paths([BUNDLED_SIGNERS_DIR])
    version = BUNDLED_MODEL_DIR / "digits" / "2"
    data = (version / "manifest.json").read_bytes()
    assert (
        trusted.verify(data, (version / "manifest.sig").read_bytes())
        == Manifest.parse_verified(data).signer
    )


def test_no_private_key_is_shipped() -> None:
    package = BUNDLED_MODEL_DIR.parent
    for path in package.rglob("*"):
        if path.is_file() and path.suffix in {"", ".pub", ".pem", ".key", ".json", ".sig"}:
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_trusted_signers_source_sees_added_and_removed_keys(tmp_path: Path) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    (tmp_path / "a.pub").write_text(a.public_pem())
    source = TrustedSignersSource([tmp_path])
    signers, changed = source.get()
    assert set(signers.keys) == {a.key_id} and not changed
    (tmp_path / "b.pub").write_text(b.public_pem())
    signers, changed = source.get()
    assert set(signers.keys) == {a.key_id, b.key_id} and changed
    (tmp_path / "a.pub").unlink()
    signers, changed = source.get()
    assert set(signers.keys) == {b.key_id} and changed
    (tmp_path / "bad.pub").write_text("garbage")  # a broken set keeps the last good one
    assert set(source.get()[0].keys) == {b.key_id}
