"""The signed-model repository: tamper every file, untrusted keys, encryption, hot reload.

The release pointer's own rules are tried in test_model_release.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maas_worker.errors import ModelError, ModelRejected
from maas_worker.models import EchoModel, ModelRegistry
from maas_worker.models.artifact_crypto import ModelKeysSource
from maas_worker.models.onnx_runner import OnnxModel
from maas_worker.models.repository import ModelRepository
from maas_worker.models.signing import SigningKey, TrustedSignersSource
from maas_worker.settings import Settings
from maas_worker.worker.runtime import build_registry
from tests.modelkit import (
    BUNDLED_DIGITS,
    Clock,
    ModelKit,
    Rejections,
    files_containing,
    holdout,
    with_marker,
)


@pytest.fixture
def make_repo(kit: ModelKit) -> Callable[..., tuple[ModelRepository, Rejections, Clock]]:
    def factory() -> tuple[ModelRepository, Rejections, Clock]:
        rejected: Rejections = []
        clock = Clock()
        repo = ModelRepository(
            kit.root,
            signers=TrustedSignersSource([kit.signers_dir]).get,
            model_keys=ModelKeysSource(kit.keys_path).get,
            on_reject=lambda *a: rejected.append(a),
            clock=clock,
        )
        return repo, rejected, clock

    return factory


SAMPLES = holdout()
FIRST = {"inputs": SAMPLES["inputs"][:5]}


def labels(model: Any) -> list[int]:
    out = model.predict(FIRST)
    assert len(out["probabilities"]) == 5 and len(out["probabilities"][0]) == 10
    return list(out["labels"])


def test_signed_models_are_listed_and_served(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    kit.publish("other", "1")
    repo, rejected, _ = make_repo()
    assert repo.refs() == ["digits", "digits@1", "other", "other@1"]
    model = repo.get("digits", None)
    assert isinstance(model, OnnxModel) and model.signer == kit.key.key_id
    assert labels(model) == SAMPLES["sklearn_predictions"][:5]
    assert repo.get("digits", "1") is model  # one session per version, reused
    assert repo.get("nope", None) is None and repo.get("digits", "9") is None
    assert rejected == []


def test_digits_accuracy_on_held_out_samples(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    model = make_repo()[0].get("digits", None)
    out = model.predict({"inputs": SAMPLES["inputs"]})
    assert out["labels"] == SAMPLES["sklearn_predictions"]
    right = sum(a == b for a, b in zip(out["labels"], SAMPLES["labels"], strict=True))
    assert right / len(SAMPLES["labels"]) >= 0.95


def _flip(path: Path, pos: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "artifact byte": (lambda d: _flip(d / "model.onnx", 200), "does not match its hash"),
    "artifact truncated": (
        lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-100]),
        "wrong size",
    ),
    "artifact replaced": (
        lambda d: (d / "model.onnx").write_bytes(b"\x00" * (d / "model.onnx").stat().st_size),
        "does not match its hash",
    ),
    "artifact missing": (lambda d: (d / "model.onnx").unlink(), "missing"),
    "extra file altered": (lambda d: _flip(d / "labels.txt", 0), "labels.txt does not match"),
    "manifest byte": (
        lambda d: (d / "manifest.json").write_bytes(
            (d / "manifest.json").read_bytes().replace(b'"inputs"', b'"inputz"')
        ),
        "does not verify",
    ),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "no manifest"),
    "signature byte": (
        lambda d: (d / "manifest.sig").write_bytes(
            (d / "manifest.sig").read_bytes().replace(b'"signature": "', b'"signature": "AA')
        ),
        "malformed|does not verify",
    ),
    "signature missing": (lambda d: (d / "manifest.sig").unlink(), "unsigned"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampering_is_refused_audited_and_others_keep_serving(
    kit: ModelKit, make_repo: Any, tamper: str
) -> None:
    kit.publish("other", "1")
    victim = kit.publish("digits", "1", extra_files={"labels.txt": b"0123456789"})
    action, why = TAMPERS[tamper]
    action(victim)
    repo, rejected, _ = make_repo()
    with pytest.raises(ModelRejected) as err:
        repo.get("digits", "1")
    assert err.value.reason == "model_rejected"
    versions = [r for r in rejected if r[0] == "digits@1"]
    assert len(versions) == 1
    assert re.search(why, versions[0][1]), rejected
    assert str(kit.tmp) not in str(err.value) and str(kit.tmp) not in versions[0][1]
    assert labels(repo.get("other", None)) == SAMPLES["sklearn_predictions"][:5]
    # The bare name is unavailable too (its release names digits@1), never another version.
    with pytest.raises(ModelRejected, match="released version digits@1 is refused"):
        repo.get("digits", None)
    assert "digits@1" not in repo.refs() and "digits" not in repo.refs()
    repo.get("other", "1")
    count = len(rejected)
    repo.get("other", None)
    with pytest.raises(ModelRejected):
        repo.get("digits", None)
    assert len(rejected) == count  # refused once per change, not on every lookup
    assert len([r for r in rejected if r[0] == "digits@1"]) == 1
    assert all(r[0] in ("digits", "digits@1") for r in rejected)


def test_valid_signature_from_an_untrusted_key_is_refused(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1", key=SigningKey.generate())
    repo, rejected, _ = make_repo()
    assert repo.refs() == []
    assert rejected == [
        ("digits@1", "signed by an untrusted key", "scan"),
        ("digits", "release signed by an untrusted key", "scan"),
    ]
    with pytest.raises(ModelRejected, match="untrusted"):
        repo.get("digits", "1")


def test_a_signed_version_moved_to_another_name_or_version_is_refused(
    kit: ModelKit, make_repo: Any
) -> None:
    v1 = kit.publish("digits", "1")
    shutil.copytree(v1, kit.root / "digits" / "9")
    shutil.copytree(v1, kit.root / "evil" / "1")
    repo, rejected, _ = make_repo()
    assert repo.refs() == ["digits", "digits@1"]
    assert sorted(r[0] for r in rejected) == ["digits@9", "evil", "evil@1"]
    assert all("another model or version" in r[1] for r in rejected if "@" in r[0])
    assert ("evil", "no signed release (release.json)", "scan") in rejected


def test_encrypted_model_loads_and_serves(kit: ModelKit, make_repo: Any) -> None:
    path = kit.publish("digits", "1", encrypt=True)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.onnx.enc",
    ]
    assert BUNDLED_DIGITS.read_bytes()[:200] not in (path / "model.onnx.enc").read_bytes()
    repo, rejected, _ = make_repo()
    model = repo.get("digits", None)
    assert labels(model) == SAMPLES["sklearn_predictions"][:5]
    assert model.manifest.encrypted and rejected == []


def test_encrypted_model_tampered_or_without_its_key_is_refused(
    kit: ModelKit, make_repo: Any
) -> None:
    path = kit.publish("digits", "1", encrypt=True)
    _flip(path / "model.onnx.enc", 3000)
    repo, rejected, clock = make_repo()
    with pytest.raises(ModelRejected, match="does not match its hash"):
        repo.get("digits", "1")
    kit.publish("digits", "2", encrypt=True)
    os.unlink(kit.keys_path)
    clock.tick()
    with pytest.raises(ModelRejected, match="no model keys"):
        repo.get("digits", "2")
    assert [r[0] for r in rejected] == ["digits@1", "digits@2"]


def test_load_hook_hears_each_successful_load_with_its_duration(kit: ModelKit) -> None:
    # The worker wires on_load to its load-time metric; a refused load is not timed.
    kit.publish("digits", "1")
    path = kit.publish("digits", "2", encrypt=True)
    _flip(path / "model.onnx.enc", 3000)
    loads: list[tuple[str, float]] = []
    repo = ModelRepository(
        kit.root,
        signers=TrustedSignersSource([kit.signers_dir]).get,
        model_keys=ModelKeysSource(kit.keys_path).get,
        on_load=lambda ref, s: loads.append((ref, s)),
    )
    repo.get("digits", "1")
    repo.get("digits", "1")  # loaded once, reused
    with pytest.raises(ModelRejected):
        repo.get("digits", "2")
    assert [ref for ref, _ in loads] == ["digits@1"]
    assert 0 < loads[0][1] < 60


def _open_memfds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:" in target:
            out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_no_plaintext_model_bytes_on_disk_after_an_encrypted_load(
    kit: ModelKit, make_repo: Any
) -> None:
    marker = b"PLAINTEXT-MODEL-" + secrets.token_hex(16).encode()
    plain = with_marker(BUNDLED_DIGITS.read_bytes(), marker)
    since = time.time() - 1
    kit.publish("digits", "1", model=plain, encrypt=True)
    before = set(_open_memfds())
    model = make_repo()[0].get("digits", None)
    assert labels(model) == SAMPLES["sklearn_predictions"][:5]
    assert files_containing(marker, [kit.tmp, Path(tempfile.gettempdir())], since) == []
    control = kit.tmp / "control.bin"  # the scan does find plaintext where there is some
    control.write_bytes(plain)
    assert files_containing(marker, [kit.tmp], since) == [str(control)]
    assert set(_open_memfds()) == before  # the in-memory file is closed after the load


def test_wrong_input_shape_is_a_clear_bad_input_without_echoing(
    kit: ModelKit, make_repo: Any
) -> None:
    kit.publish("digits", "1")
    model = make_repo()[0].get("digits", None)
    secret = 12345.678
    for bad in (
        {"inputs": [[secret] * 63]},
        {"inputs": [[secret] * 64, [secret]]},
        {"inputs": [["text"] * 64]},
        {"wrong": 1},
        [secret],
        {"inputs": []},
        {"inputs": [[float("nan")] * 64]},
        {"inputs": [[secret] * 64] * 2000},
    ):
        with pytest.raises(ModelError) as err:
            model.predict(bad)
        assert err.value.reason == "bad_input"
        assert "shape [N, 64]" in str(err.value) or "finite" in str(err.value)
        assert "12345" not in str(err.value) and "text" not in str(err.value)
    assert labels(model) == SAMPLES["sklearn_predictions"][:5]  # and it still works


def test_released_version_and_hot_reload(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    repo, rejected, clock = make_repo()
    v1 = repo.get("digits", None)
    assert v1.version == "1"
    kit.publish("digits", "2")  # and released
    assert repo.get("digits", None) is v1  # not rescanned yet
    clock.tick()
    assert repo.refs() == ["digits", "digits@1", "digits@2"]
    assert repo.get("digits", None).version == "2"
    # Newer versions that are not released change nothing, bad or good.
    bad = kit.publish("digits", "10", release=False)
    _flip(bad / "model.onnx", 300)
    kit.publish("digits", "9", release=False)
    clock.tick()
    assert repo.get("digits", None).version == "2"
    with pytest.raises(ModelRejected):
        repo.get("digits", "10")
    assert rejected == [("digits@10", "file model.onnx does not match its hash (altered)", "load")]
    assert "digits@10" not in repo.refs() and "digits@9" in repo.refs()
    unsigned = kit.root / "digits" / "11"
    unsigned.mkdir()
    shutil.copy(BUNDLED_DIGITS, unsigned / "model.onnx")
    clock.tick()
    assert repo.get("digits", None).version == "2"
    assert rejected[-1][:1] == ("digits@11",) and "unsigned" in rejected[-1][1]
    # The released version removed from disk: the bare name is unavailable, not rolled back.
    shutil.rmtree(kit.root / "digits" / "2")
    clock.tick()
    with pytest.raises(ModelRejected, match="released version digits@2 is missing"):
        repo.get("digits", None)
    assert rejected[-1] == ("digits", "released version digits@2 is missing", "scan")
    assert "digits" not in repo.refs() and repo.get("digits", "1") is v1


def test_a_loaded_version_altered_on_disk_keeps_its_verified_session(
    kit: ModelKit, make_repo: Any
) -> None:
    path = kit.publish("digits", "1")
    repo, rejected, clock = make_repo()
    model = repo.get("digits", "1")
    _flip(path / "model.onnx", 300)
    clock.tick()
    assert repo.get("digits", "1") is model
    assert [r[0] for r in rejected] == ["digits@1"]
    # A valid re-signed replacement is swapped in.
    shutil.rmtree(path)
    kit.publish("digits", "1")
    clock.tick()
    assert repo.get("digits", "1") is not model


def test_removing_a_trusted_signer_revokes_its_models(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    repo, _, clock = make_repo()
    assert repo.get("digits", None) is not None
    (kit.signers_dir / "owner.pub").rename(kit.signers_dir / "owner.pub.revoked")
    clock.tick()
    assert repo.refs() == []
    with pytest.raises(ModelRejected, match="untrusted"):
        repo.get("digits", "1")


def test_signer_restriction_sees_only_releases_of_allowed_signers(
    kit: ModelKit, make_repo: Any
) -> None:
    other = SigningKey.generate()
    (kit.signers_dir / "other.pub").write_text(other.public_pem())
    kit.publish("digits", "1")
    kit.publish("digits", "2", key=other)  # released by its signer
    repo, _, _ = make_repo()
    assert repo.get("digits", None).version == "2"
    assert repo.get("digits", None, signers=[other.key_id]).version == "2"
    # Not the newest version the tenant's signer signed: the release is not theirs.
    assert repo.get("digits", None, signers=[kit.key.key_id]) is None
    assert repo.get("digits", "1", signers=[kit.key.key_id]).version == "1"
    assert repo.get("digits", "2", signers=[kit.key.key_id]) is None
    assert repo.get("digits", None, signers=[]) is None


def test_registry_puts_built_in_models_first_and_merges_refs(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    kit.publish("echo", "5")  # cannot shadow a built-in model
    repo = make_repo()[0]
    reg = ModelRegistry([EchoModel()], sources=[repo])
    assert reg.refs() == ["echo", "echo@1", "digits", "digits@1"]
    assert isinstance(reg.resolve("echo"), EchoModel)
    assert reg.resolve("digits@1").version == "1"
    with pytest.raises(ModelError) as err:
        reg.resolve("digits", signers=["00" * 16])
    assert err.value.reason == "unknown_model"


def test_build_registry_serves_the_bundled_digits_by_default() -> None:
    registry = build_registry(Settings.from_env({}))
    assert "digits" in registry.refs() and "digits@2" in registry.refs()
    model = registry.resolve("digits")
    assert model.predict(FIRST)["labels"] == SAMPLES["sklearn_predictions"][:5]


def test_manifest_graph_mismatch_is_refused(kit: ModelKit, make_repo: Any) -> None:
    path = kit.publish("digits", "1", release=False)
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["input"]["shape"] = [None, 32]
    from maas_worker.models.manifest import canonical_json

    data = canonical_json(doc)
    (path / "manifest.json").write_bytes(data)
    (path / "manifest.sig").write_bytes(kit.key.sign(data))
    kit.release("digits", "1")
    repo, rejected, _ = make_repo()
    with pytest.raises(ModelRejected, match="does not match its manifest"):
        repo.get("digits", "1")
    assert rejected[0][2] == "load"


def test_signer_restriction_ignores_refused_versions(kit: ModelKit, make_repo: Any) -> None:
    kit.publish("digits", "1")
    kit.publish("digits", "2", key=SigningKey.generate(), release=False)  # untrusted
    repo, _, _ = make_repo()
    assert repo.get("digits", None, signers=["00" * 16]) is None
    assert repo.get("digits", "2", signers=["00" * 16]) is None
    assert repo.get("digits", None, signers=[kit.key.key_id]).version == "1"
