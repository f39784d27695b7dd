"""``maas-worker models keygen|sign|encrypt|verify|list`` and ``keys init --allow-signers``."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from maas_worker.cli import main
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring
from tests.modelkit import BUNDLED_DIGITS


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("MAAS_MODEL_DIR", "MAAS_TRUSTED_SIGNERS", "MAAS_MODEL_KEYS", "MAAS_KEYRING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MAAS_MODEL_DIR", str(tmp_path / "repo"))
    monkeypatch.setenv("MAAS_TRUSTED_SIGNERS", str(tmp_path / "owner.key.pub"))
    monkeypatch.setenv("MAAS_MODEL_KEYS", str(tmp_path / "model-keys.json"))
    monkeypatch.setenv("MAAS_KEYRING", str(tmp_path / "keyring.json"))
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_whole_owner_workflow(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "keygen", "--out", str(env / "owner.key"))
    assert code == 0 and "signing key" in out
    assert stat.S_IMODE((env / "owner.key").stat().st_mode) == 0o600
    assert "PRIVATE" not in (env / "owner.key.pub").read_text()
    code, out, _ = run(capsys, "models", "keygen", "--encryption")
    assert code == 0 and "model key" in out
    assert stat.S_IMODE((env / "model-keys.json").stat().st_mode) == 0o600

    plain = env / "repo" / "digits" / "1"
    plain.mkdir(parents=True)
    shutil.copy(BUNDLED_DIGITS, plain / "model.onnx")
    code, out, _ = run(
        capsys,
        "models",
        "sign",
        str(plain),
        "--key",
        str(env / "owner.key"),
        "--output",
        "label=labels",
        "--output",
        "probabilities",
        "--meta",
        "owner=ml-team",
    )
    assert code == 0 and "signed digits@1" in out
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["metadata"] == {"owner": "ml-team"}
    assert [o["key"] for o in manifest["outputs"]] == ["labels", "probabilities"]

    enc = env / "repo" / "digits" / "2"
    enc.mkdir()
    code, out, _ = run(
        capsys, "models", "encrypt", str(BUNDLED_DIGITS), str(enc / "model.onnx.enc")
    )
    assert code == 0 and "encrypted" in out
    code, out, _ = run(
        capsys,
        "models",
        "sign",
        str(enc),
        "--key",
        str(env / "owner.key"),
        "--keys",
        str(env / "model-keys.json"),
    )
    assert code == 0 and "encrypted" in out

    code, out, _ = run(capsys, "models", "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["version"], r["encrypted"], r["verifies"]) for r in rows] == [
        ("1", False, True),
        ("2", True, True),
    ]
    code, out, _ = run(capsys, "models", "verify")
    assert code == 0 and out.count(" yes") == 3  # two verifies + one encrypted

    # Tamper: verify names the version and exits 1; list shows why.
    data = bytearray((enc / "model.onnx.enc").read_bytes())
    data[500] ^= 1
    (enc / "model.onnx.enc").write_bytes(bytes(data))
    code, out, _ = run(capsys, "models", "verify", str(enc))
    assert code == 1 and "NO: file model.onnx.enc does not match its hash" in out
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "digits" in out and "NO:" in out


def test_errors_are_one_line(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "models", "keygen")
    assert code == 1 and err.startswith("maas-worker: error: keygen needs --out")
    run(capsys, "models", "keygen", "--out", str(env / "owner.key"))
    code, _, err = run(capsys, "models", "keygen", "--out", str(env / "owner.key"))
    assert code == 1 and "refusing to overwrite" in err
    code, _, err = run(capsys, "models", "encrypt", "a", "b")
    assert code == 1 and "model keys" in err and len(err.strip().splitlines()) == 1
    empty = env / "repo" / "x" / "1"
    empty.mkdir(parents=True)
    code, _, err = run(capsys, "models", "sign", str(empty), "--key", str(env / "owner.key"))
    assert code == 1 and "expected exactly one *.onnx" in err


def test_keys_init_allow_signers(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer = "ab" * 16
    code, _, _ = run(capsys, "keys", "init", "--tenant", "acme", "--allow-signers", signer)
    assert code == 0
    policy = load_keyring(env / "keyring.json").tenant("acme").policy
    assert policy.allowed_signers == (signer,)
    code, _, err = run(capsys, "keys", "init", "--tenant", "b", "--allow-signers", "nothex")
    assert code == 1 and "allowed_signers" in err


def test_tenant_policy_allowed_signers_round_trip() -> None:
    assert TenantPolicy().allowed_signers is None
    p = TenantPolicy.from_json({"allowed_signers": ["ab" * 16]})
    assert TenantPolicy.from_json(p.to_json()) == p
    assert "allowed_signers" not in TenantPolicy().to_json()


def test_keys_policy_sets_and_clears_allow_signers(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = "cd" * 16
    run(capsys, "keys", "init", "--tenant", "acme", "--max-priority", "normal")
    code, out, _ = run(capsys, "keys", "policy", "--tenant", "acme", "--allow-signers", signer)
    assert code == 0 and signer in out
    policy = load_keyring(env / "keyring.json").tenant("acme").policy
    assert policy.allowed_signers == (signer,) and policy.max_priority == "normal"
    code, _, _ = run(capsys, "keys", "policy", "--tenant", "acme", "--max-priority", "low")
    assert load_keyring(env / "keyring.json").tenant("acme").policy.allowed_signers == (signer,)
    code, _, _ = run(capsys, "keys", "policy", "--tenant", "acme", "--allow-signers", "*")
    assert load_keyring(env / "keyring.json").tenant("acme").policy.allowed_signers is None
    code, _, err = run(capsys, "keys", "policy", "--tenant", "acme", "--allow-signers", "zz")
    assert code == 1 and "allowed_signers" in err


def test_release_command_sign_no_release_and_list(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(env / "owner.key")
    run(capsys, "models", "keygen", "--out", key)
    repo = env / "repo" / "digits"
    for v in ("1", "2"):
        (repo / v).mkdir(parents=True)
        shutil.copy(BUNDLED_DIGITS, repo / v / "model.onnx")
    code, out, _ = run(capsys, "models", "sign", str(repo / "1"), "--key", key)
    assert code == 0 and "released digits@1 (serial 1" in out
    code, out, _ = run(capsys, "models", "sign", str(repo / "2"), "--key", key, "--no-release")
    assert code == 0 and "staged, not released" in out
    assert json.loads((repo / "release.json").read_text())["release"]["version"] == "1"

    code, out, _ = run(capsys, "models", "list", "--json")
    rows = {r["version"]: r for r in map(json.loads, out.splitlines())}
    assert (rows["1"]["released"], rows["1"]["serial"]) == (True, 1)
    assert (rows["2"]["released"], rows["2"]["serial"]) == (False, None)
    assert rows["1"]["release_error"] is None
    code, out, _ = run(capsys, "models", "list")
    assert "RELEASED" in out and "serial 1" in out and "NOT served" not in out

    code, out, _ = run(capsys, "models", "release", "digits", "2", "--key", key)
    assert code == 0 and "released digits@2 (serial 2" in out
    # The owner rolls back on purpose: a new release (serial 3) naming version 1.
    code, out, _ = run(
        capsys, "models", "release", "digits", "1", "--key", key, "--model-dir", str(env / "repo")
    )
    assert code == 0 and "released digits@1 (serial 3" in out
    code, _, err = run(capsys, "models", "release", "digits", "1", "--key", key, "--serial", "3")
    assert code == 1 and "not above the current release's serial 3" in err
    code, out, _ = run(capsys, "models", "release", "digits", "1", "--key", key, "--serial", "10")
    assert code == 0 and "serial 10" in out

    # Refused: no such version, a version that does not verify, another signer's key.
    code, _, err = run(capsys, "models", "release", "digits", "7", "--key", key)
    assert code == 1 and "no version digits@7" in err
    data = bytearray((repo / "2" / "model.onnx").read_bytes())
    data[300] ^= 1
    (repo / "2" / "model.onnx").write_bytes(bytes(data))
    code, _, err = run(capsys, "models", "release", "digits", "2", "--key", key)
    assert code == 1 and "does not verify" in err and "nothing released" in err
    run(capsys, "models", "keygen", "--out", str(env / "other.key"))
    code, _, err = run(capsys, "models", "release", "digits", "1", "--key", str(env / "other.key"))
    assert code == 1 and "a release is signed by the version's own signer" in err
    assert json.loads((repo / "release.json").read_text())["release"]["serial"] == 10

    # A release that no longer holds shows in the listing.
    code, out, _ = run(capsys, "models", "release", "digits", "1", "--key", key)
    (repo / "1" / "model.onnx").write_bytes(bytes(data))  # digits@1 altered too
    code, out, _ = run(capsys, "models", "list")
    assert "digits: the bare name is NOT served: released version digits@1 is refused" in out
    # A release file that does not verify says nothing about the serial: ask for one.
    shutil.copy(BUNDLED_DIGITS, repo / "1" / "model.onnx")
    (repo / "release.json").write_text("{}")
    code, _, err = run(capsys, "models", "release", "digits", "1", "--key", key)
    assert code == 1 and "pass --serial" in err
    code, out, _ = run(capsys, "models", "release", "digits", "1", "--key", key, "--serial", "12")
    assert code == 0 and "serial 12" in out


def test_sign_reads_an_encrypted_artifact_with_the_model_keys_encrypt_used(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """encrypt then sign, both on $MAAS_MODEL_KEYS, as README's model block runs them."""
    assert run(capsys, "models", "keygen", "--out", str(env / "owner.key"))[0] == 0
    assert run(capsys, "models", "keygen", "--encryption")[0] == 0
    version = env / "repo" / "fraud" / "3"
    version.mkdir(parents=True)
    code, out, _ = run(
        capsys, "models", "encrypt", str(BUNDLED_DIGITS), str(version / "model.onnx.enc")
    )
    assert code == 0 and str(env / "model-keys.json") in out  # says which keys file
    code, out, err = run(capsys, "models", "sign", str(version), "--key", str(env / "owner.key"))
    assert (code, err) == (0, "") and "encrypted" in out
    assert run(capsys, "models", "verify", str(version))[0] == 0
    # Without any model keys: one line saying where they are read from.
    (env / "model-keys.json").unlink()
    code, _, err = run(capsys, "models", "sign", str(version), "--key", str(env / "owner.key"))
    assert code == 1 and "MAAS_MODEL_KEYS or --keys" in err and err.count("\n") == 1
