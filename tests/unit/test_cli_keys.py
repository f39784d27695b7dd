"""`maas-worker keys ...` run in-process against a keyring in a temporary folder."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from maas_worker.cli import main
from maas_worker.tenancy.keyring import load_keyring


@pytest.fixture
def keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("MAAS_"):
            monkeypatch.delenv(name)
    path = tmp_path / "conf" / "keyring.json"
    monkeypatch.setenv("MAAS_KEYRING", str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, ""), err
    return out


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("maas-worker: error: ")
    return err


def secrets_of(path: Path) -> list[str]:
    forms = []
    for t in load_keyring(path).tenants.values():
        for kv in t.versions:
            forms += [base64.b64encode(kv.secret).decode(), kv.secret.hex()]
    return forms


def states(path: Path, tenant: str = "acme") -> dict[int, str]:
    return {kv.version: kv.state for kv in load_keyring(path).tenant(tenant).versions}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_a_private_file(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(capsys, "keys", "init", "--tenant", "acme")
    assert "acme" in out
    assert mode(keyring) == 0o600
    assert states(keyring) == {1: "primary"}
    assert len(load_keyring(keyring).tenant("acme").primary().secret) == 32
    for secret in secrets_of(keyring):
        assert secret not in out
    # Only the keyring and its lock file; no temp files left behind.
    assert {p.name for p in keyring.parent.iterdir()} <= {"keyring.json", "keyring.json.lock"}


def test_init_with_policy(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(
        capsys,
        "keys",
        "init",
        "--tenant",
        "acme",
        "--allow-models",
        "echo,digits@1",
        "--max-priority",
        "normal",
    )
    policy = load_keyring(keyring).tenant("acme").policy
    assert policy.allowed_models == ("echo", "digits@1")
    assert policy.max_priority == "normal"


def test_init_of_an_existing_tenant_fails(
    keyring: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    before = keyring.read_bytes()
    err = one_line_error(capsys, "keys", "init", "--tenant", "acme")
    assert "already exists" in err
    assert keyring.read_bytes() == before


def test_second_tenant_is_added(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "init", "--tenant", "globex")
    assert set(load_keyring(keyring).tenants) == {"acme", "globex"}
    assert mode(keyring) == 0o600


@pytest.mark.parametrize(
    "name",
    [
        "Acme",
        "a b",
        "../x",
        "",
        "acme\n",
    ],
)
def test_init_refuses_invalid_tenant_names(
    keyring: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    err = one_line_error(capsys, "keys", "init", "--tenant", name)
    assert "invalid tenant name" in err
    assert not keyring.exists()


def test_keyring_flag_overrides_the_environment(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    ok(capsys, "--keyring", str(other), "keys", "init", "--tenant", "acme")
    assert other.exists()
    assert not keyring.exists()


def test_list(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "init", "--tenant", "globex")
    ok(capsys, "keys", "rotate", "--tenant", "acme")
    out = ok(capsys, "keys", "list")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TENANT", "VERSION", "STATE"]
    rows = [line.split()[:3] for line in lines[1:]]
    assert rows == [
        ["acme", "1", "decrypt-only"],
        ["acme", "2", "primary"],
        ["globex", "1", "primary"],
    ]
    for secret in secrets_of(keyring):
        assert secret not in out


def test_list_json(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "rotate", "--tenant", "acme", "--stage")
    ok(capsys, "keys", "init", "--tenant", "globex")
    out = ok(capsys, "keys", "list", "--json")
    doc = json.loads(out)  # one document, as `stats --json`
    assert [t["tenant"] for t in doc["tenants"]] == ["acme", "globex"]
    acme, globex = doc["tenants"]
    assert [(v["version"], v["state"]) for v in acme["versions"]] == [
        (1, "primary"),
        (2, "decrypt-only"),
    ]
    assert [(v["version"], v["state"]) for v in globex["versions"]] == [(1, "primary")]
    for version in acme["versions"] + globex["versions"]:
        assert set(version) == {"version", "state", "created_at"}
        assert version["created_at"]
    for secret in secrets_of(keyring):
        assert secret not in out


def test_list_without_a_keyring(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, "keys", "list")
    assert "keys init" in err


def test_rotate(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    old = load_keyring(keyring).tenant("acme").primary().secret
    out = ok(capsys, "keys", "rotate", "--tenant", "acme")
    assert "version 2" in out and "primary" in out
    assert states(keyring) == {1: "decrypt-only", 2: "primary"}
    ring = load_keyring(keyring)
    assert ring.tenant("acme").primary().secret != old
    assert ring.usable("acme", 1).secret == old  # type: ignore[union-attr]
    assert mode(keyring) == 0o600


def test_rotate_stage_promote_retire(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    out = ok(capsys, "keys", "rotate", "--tenant", "acme", "--stage")
    assert "version 2" in out and "decrypt-only" in out
    assert states(keyring) == {1: "primary", 2: "decrypt-only"}

    out = ok(capsys, "keys", "promote", "--tenant", "acme", "--version", "2")
    assert "version 2 is primary" in out
    assert states(keyring) == {1: "decrypt-only", 2: "primary"}

    out = ok(capsys, "keys", "retire", "--tenant", "acme", "--version", "1")
    assert "version 1 is retired" in out
    assert states(keyring) == {1: "retired", 2: "primary"}
    assert load_keyring(keyring).usable("acme", 1) is None
    assert mode(keyring) == 0o600
    assert {p.name for p in keyring.parent.iterdir()} == {"keyring.json", "keyring.json.lock"}


def test_retiring_the_only_primary_is_refused_without_force(
    keyring: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "init", "--tenant", "globex")  # another tenant's primary is no help
    ok(capsys, "keys", "rotate", "--tenant", "acme", "--stage")  # nor is a decrypt-only one
    before = keyring.read_bytes()
    err = one_line_error(capsys, "keys", "retire", "--tenant", "acme", "--version", "1")
    assert err == (
        "maas-worker: error: would leave tenant 'acme' with no primary key: every submit "
        "would fail; rotate first (maas-worker keys rotate --tenant acme) or pass --force\n"
    )
    assert keyring.read_bytes() == before
    # a version that is not the primary retires as before
    out = ok(capsys, "keys", "retire", "--tenant", "acme", "--version", "2")
    assert "version 2 is retired" in out
    out = ok(capsys, "keys", "retire", "--tenant", "acme", "--version", "1", "--force")
    assert "version 1 is retired" in out
    assert states(keyring) == {1: "retired", 2: "retired"}
    assert states(keyring, "globex") == {1: "primary"}
    # a rotate gives the tenant a primary again
    ok(capsys, "keys", "rotate", "--tenant", "acme")
    assert states(keyring) == {1: "retired", 2: "retired", 3: "primary"}


@pytest.mark.parametrize(
    "argv",
    [
        ("keys", "rotate", "--tenant", "globex"),
        ("keys", "promote", "--tenant", "acme", "--version", "9"),
        ("keys", "retire", "--tenant", "globex", "--version", "1"),
        ("keys", "export", "--tenant", "globex", "--out", "x.json"),
    ],
)
def test_unknown_tenant_or_version(
    keyring: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    before = keyring.read_bytes()
    one_line_error(capsys, *argv)
    assert keyring.read_bytes() == before


def test_rotate_without_a_keyring(keyring: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, "keys", "rotate", "--tenant", "acme")
    assert "keys init" in err
    assert not keyring.exists()


def test_export_holds_only_that_tenant(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "init", "--tenant", "globex")
    ok(capsys, "keys", "rotate", "--tenant", "acme")
    out_path = tmp_path / "client" / "acme.json"
    out = ok(capsys, "keys", "export", "--tenant", "acme", "--out", str(out_path))
    assert str(out_path) in out
    assert mode(out_path) == 0o600
    exported = load_keyring(out_path)
    assert list(exported.tenants) == ["acme"]
    assert exported.tenant("acme") == load_keyring(keyring).tenant("acme")
    globex = load_keyring(keyring).tenant("globex").primary().secret
    assert base64.b64encode(globex).decode() not in out_path.read_text()
    for secret in secrets_of(keyring):
        assert secret not in out
    assert {p.name for p in out_path.parent.iterdir()} == {"acme.json"}


def test_export_over_an_open_file_makes_it_private(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    out_path = tmp_path / "acme.json"
    out_path.write_text("old")
    out_path.chmod(0o644)
    ok(capsys, "keys", "export", "--tenant", "acme", "--out", str(out_path), "--force")
    assert mode(out_path) == 0o600
    assert list(load_keyring(out_path).tenants) == ["acme"]


def test_export_refuses_to_replace_a_file_without_force(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    out_path = tmp_path / "acme.json"
    out_path.write_text("a keyring handed out earlier")
    err = one_line_error(capsys, "keys", "export", "--tenant", "acme", "--out", str(out_path))
    assert err == f"maas-worker: error: {out_path} already exists: pass --force to replace it\n"
    assert out_path.read_text() == "a keyring handed out earlier"
    # a dangling symbolic link is a file name already taken too
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "nowhere.json")
    one_line_error(capsys, "keys", "export", "--tenant", "acme", "--out", str(link))
    assert not (tmp_path / "nowhere.json").exists()
    # a folder is never replaced, --force or not
    err = one_line_error(
        capsys, "keys", "export", "--tenant", "acme", "--out", str(tmp_path), "--force"
    )
    assert err == (
        f"maas-worker: error: {tmp_path} is a directory: --out names the keyring file to write\n"
    )


def test_export_that_cannot_write_is_one_line(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = one_line_error(
        capsys, "keys", "export", "--tenant", "acme", "--out", str(blocker / "acme.json")
    )
    assert err.startswith(f"maas-worker: error: cannot write {blocker / 'acme.json'}: ")


@pytest.mark.parametrize("unsafe", [0o640, 0o604])
def test_group_or_world_readable_keyring_is_refused(
    keyring: Path, capsys: pytest.CaptureFixture[str], unsafe: int
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    keyring.chmod(unsafe)
    err = one_line_error(capsys, "keys", "list")
    assert "chmod 600" in err
    assert str(keyring) in err
    # Changes are refused too, and the file is left as it was.
    before = keyring.read_bytes()
    one_line_error(capsys, "keys", "rotate", "--tenant", "acme")
    one_line_error(capsys, "keys", "init", "--tenant", "globex")
    assert keyring.read_bytes() == before


def test_corrupt_keyring_is_one_line_error(
    keyring: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "keys", "init", "--tenant", "acme")
    keyring.write_text("{ not json")
    err = one_line_error(capsys, "keys", "list")
    assert "not valid JSON" in err


def test_policy_sets_and_shows_quotas(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from maas_worker.cli import main
    from maas_worker.tenancy.keyring import load_keyring

    path = tmp_path / "k.json"
    monkeypatch.setenv("MAAS_KEYRING", str(path))
    assert main(["keys", "init", "--tenant", "acme"]) == 0
    assert (
        main(
            [
                "keys",
                "policy",
                "--tenant",
                "acme",
                "--rate",
                "5",
                "--burst",
                "10",
                "--max-in-flight",
                "3",
                "--allow-models",
                "echo",
                "--max-priority",
                "normal",
            ]
        )
        == 0
    )
    policy = load_keyring(path).tenant("acme").policy
    assert (policy.rate_per_s, policy.burst, policy.max_in_flight) == (5.0, 10, 3)
    assert policy.allowed_models == ("echo",) and policy.max_priority == "normal"
    assert main(["keys", "policy", "--tenant", "acme", "--allow-models", "*"]) == 0
    policy = load_keyring(path).tenant("acme").policy
    assert policy.allowed_models is None and policy.rate_per_s == 5.0
    assert '"rate_per_s": 5.0' in capsys.readouterr().out


def test_policy_sets_the_fair_share_weight(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from maas_worker.cli import main
    from maas_worker.tenancy.keyring import KeyringError, TenantPolicy, load_keyring

    path = tmp_path / "k.json"
    monkeypatch.setenv("MAAS_KEYRING", str(path))
    assert main(["keys", "init", "--tenant", "acme"]) == 0
    assert load_keyring(path).tenant("acme").policy.weight == 1  # the default
    assert main(["keys", "policy", "--tenant", "acme", "--weight", "3"]) == 0
    assert '"weight": 3' in capsys.readouterr().out
    assert load_keyring(path).tenant("acme").policy.weight == 3
    assert main(["keys", "policy", "--tenant", "acme", "--rate", "5"]) == 0  # kept
    assert load_keyring(path).tenant("acme").policy.weight == 3
    for bad in ("0", "101", "x"):
        assert main(["keys", "policy", "--tenant", "acme", "--weight", bad]) != 0
    assert load_keyring(path).tenant("acme").policy.weight == 3
    assert TenantPolicy.from_json({"weight": 3}).weight == 3
    assert "weight" not in TenantPolicy().to_json()  # 1 is not written
    for raw in (0, 101, 2.5, True, "3"):
        with pytest.raises(KeyringError, match="weight"):
            TenantPolicy.from_json({"weight": raw})


def test_the_keyring_editor_saves_only_a_replaced_ring(keyring: Path) -> None:
    from maas_worker.tenancy.keyring import edit_keyring

    with edit_keyring(keyring, create=True) as editor:
        assert not editor.changed
    assert not keyring.exists()  # nothing replaced: nothing written
    with edit_keyring(keyring, create=True) as editor:
        editor.ring = editor.ring.with_new_tenant("acme")
        assert editor.changed
    assert load_keyring(keyring).tenants.keys() == {"acme"}
    before = keyring.read_bytes()
    with pytest.raises(RuntimeError), edit_keyring(keyring) as editor:
        editor.ring = editor.ring.with_new_tenant("globex")
        raise RuntimeError("the edit fails half way")
    assert keyring.read_bytes() == before


@pytest.mark.parametrize("folder_mode", [0o755, 0o700])
def test_a_keyring_path_that_is_a_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder_mode: int
) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=folder_mode)
    folder.chmod(folder_mode)
    for argv in (("keys", "list"), ("keys", "rotate", "--tenant", "acme")):
        err = one_line_error(capsys, "--keyring", str(folder), *argv)
        assert err == f"maas-worker: error: keyring {folder} is a directory, not a keyring file\n"
    assert list(folder.iterdir()) == []


def test_export_mac_only_is_a_gateway_keyring_without_secrets(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from maas_worker.tenancy.gatekeys import GatewayKeyring, load_gateway_keyring

    ok(capsys, "keys", "init", "--tenant", "acme")
    ok(capsys, "keys", "init", "--tenant", "globex")
    out_path = tmp_path / "gw" / "gateway.json"
    out = ok(capsys, "keys", "export", "--mac-only", "--out", str(out_path))
    assert "MAC keys only" in out and mode(out_path) == 0o600
    gate = load_gateway_keyring(out_path)
    assert gate == GatewayKeyring.from_keyring(load_keyring(keyring))
    assert set(gate.tenants) == {"acme", "globex"}
    text = out_path.read_text()
    for secret in secrets_of(keyring):
        assert secret not in text and secret not in out
    one = tmp_path / "acme-gw.json"
    ok(capsys, "keys", "export", "--mac-only", "--tenant", "acme", "--out", str(one))
    assert set(load_gateway_keyring(one).tenants) == {"acme"}
    assert "--tenant is required" in one_line_error(
        capsys, "keys", "export", "--out", str(tmp_path / "x.json")
    )


def test_bearer_writes_the_token_privately(
    keyring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from maas_worker.tenancy.gatekeys import GatewayKeyring

    ok(capsys, "keys", "init", "--tenant", "acme")
    token_path = tmp_path / "token.txt"
    out = ok(capsys, "keys", "bearer", "--tenant", "acme", "--out", str(token_path))
    token = token_path.read_text()
    assert mode(token_path) == 0o600 and token not in out
    assert GatewayKeyring.from_keyring(load_keyring(keyring)).bearer_tenant(token) == "acme"
    assert "already exists" in one_line_error(
        capsys, "keys", "bearer", "--tenant", "acme", "--out", str(token_path)
    )
