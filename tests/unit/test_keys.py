"""Keyring: tenants, versions and states, derived keys, the file and its reloads."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maas_worker.errors import KeyringError, UnknownTenant
from maas_worker.tenancy.keyring import (
    SECRET_BYTES,
    DerivedKeys,
    Keyring,
    KeyringSource,
    KeyVersion,
    TenantPolicy,
    check_tenant_name,
    derive_keys,
    load_keyring,
    save_keyring,
)


def _ring(*tenants: str) -> Keyring:
    ring = Keyring()
    for name in tenants:
        ring = ring.with_new_tenant(name)
    return ring


def _states(ring: Keyring, tenant: str) -> dict[int, str]:
    return {kv.version: kv.state for kv in ring.tenant(tenant).versions}


def _secret_forms(ring: Keyring) -> list[str]:
    """Every secret (root and derived) of ``ring`` as base64, hex and raw-repr text."""
    forms = []
    for t in ring.tenants.values():
        for kv in t.versions:
            derived = kv.keys(t.name)
            for raw in (kv.secret, derived.request_enc, derived.result_enc, derived.mac):
                forms += [
                    base64.b64encode(raw).decode(),
                    raw.hex(),
                    raw.hex().upper(),
                    base64.urlsafe_b64encode(raw).decode().rstrip("="),
                    repr(raw),
                ]
    return forms


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keyring.json"


# -- tenants and versions -------------------------------------------------------------
def test_new_tenant_has_one_primary_32_byte_key() -> None:
    ring = _ring("acme")
    (kv,) = ring.tenant("acme").versions
    assert kv.version == 1
    assert kv.state == "primary"
    assert isinstance(kv.secret, bytes)
    assert len(kv.secret) == SECRET_BYTES == 32
    assert ring.tenant("acme").primary() is kv
    assert ring.usable("acme", 1) is kv


def test_new_tenants_get_distinct_secrets() -> None:
    ring = _ring("acme", "globex")
    assert ring.tenant("acme").primary().secret != ring.tenant("globex").primary().secret


def test_existing_tenant_refused() -> None:
    ring = _ring("acme")
    with pytest.raises(KeyringError, match="already exists"):
        ring.with_new_tenant("acme")


def test_keyring_is_immutable() -> None:
    empty = Keyring()
    ring = empty.with_new_tenant("acme")
    assert empty.tenants == {}
    rotated, _ = ring.with_rotation("acme")
    assert _states(ring, "acme") == {1: "primary"}
    assert _states(rotated, "acme") == {1: "decrypt-only", 2: "primary"}


@pytest.mark.parametrize("name", ["acme", "a", "a1", "0", "acme-corp.eu_1", "a" * 63])
def test_valid_tenant_names(name: str) -> None:
    assert check_tenant_name(name) == name
    assert name in _ring(name).tenants


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Acme",
        "-acme",
        ".acme",
        "_acme",
        "ac me",
        "acme/evil",
        "../acme",
        "acmé",
        "a" * 64,
        "acme\x00",
        "acme\r",
        "\nacme",
        "acme\n",
    ],
)
def test_invalid_tenant_names_refused(name: str) -> None:
    with pytest.raises(KeyringError, match="invalid tenant name"):
        check_tenant_name(name)
    with pytest.raises(KeyringError):
        Keyring().with_new_tenant(name)


@pytest.mark.parametrize("name", [None, 1, b"acme"])
def test_non_string_tenant_names_refused(name: object) -> None:
    with pytest.raises(KeyringError):
        check_tenant_name(name)  # type: ignore[arg-type]


def test_unknown_tenant() -> None:
    ring = _ring("acme")
    with pytest.raises(UnknownTenant):
        ring.tenant("globex")
    with pytest.raises(UnknownTenant):
        ring.with_rotation("globex")
    assert ring.usable("globex", 1) is None
    assert ring.usable("acme", 2) is None
    assert issubclass(UnknownTenant, KeyringError)


# -- rotation -------------------------------------------------------------------------
def test_rotation_immediate_makes_new_primary_and_old_decrypt_only() -> None:
    ring = _ring("acme")
    old = ring.tenant("acme").primary()
    ring, version = ring.with_rotation("acme")
    assert version == 2
    assert _states(ring, "acme") == {1: "decrypt-only", 2: "primary"}
    new = ring.tenant("acme").primary()
    assert new.version == 2
    assert new.secret != old.secret
    assert len(new.secret) == SECRET_BYTES
    # Jobs sealed under the old primary (in flight) still open.
    usable_old = ring.usable("acme", 1)
    assert usable_old is not None
    assert usable_old.secret == old.secret
    assert ring.usable("acme", 2) == new


def test_rotation_staged_keeps_old_primary() -> None:
    ring = _ring("acme")
    ring, version = ring.with_rotation("acme", stage=True)
    assert version == 2
    assert _states(ring, "acme") == {1: "primary", 2: "decrypt-only"}
    assert ring.tenant("acme").primary().version == 1
    assert ring.usable("acme", 2) is not None


def test_promote_then_retire() -> None:
    ring = _ring("acme")
    ring, _ = ring.with_rotation("acme", stage=True)
    ring = ring.with_state("acme", 2, "primary")
    assert _states(ring, "acme") == {1: "decrypt-only", 2: "primary"}
    assert ring.tenant("acme").primary().version == 2
    ring = ring.with_state("acme", 1, "retired")
    assert _states(ring, "acme") == {1: "retired", 2: "primary"}
    assert ring.usable("acme", 1) is None
    assert ring.tenant("acme").usable(1) is None
    assert ring.usable("acme", 2) is not None


def test_retiring_the_primary_leaves_no_primary() -> None:
    ring = _ring("acme").with_state("acme", 1, "retired")
    assert ring.usable("acme", 1) is None
    with pytest.raises(UnknownTenant, match="no primary"):
        ring.tenant("acme").primary()


def test_only_one_primary_ever() -> None:
    ring = _ring("acme")
    for _ in range(3):
        ring, _v = ring.with_rotation("acme")
    ring, _v = ring.with_rotation("acme", stage=True)
    for version in (1, 3, 5, 2):
        ring = ring.with_state("acme", version, "primary")
        states = _states(ring, "acme")
        assert list(states.values()).count("primary") == 1
        assert states[version] == "primary"
    assert sorted(_states(ring, "acme")) == [1, 2, 3, 4, 5]


def test_rotation_does_not_touch_other_tenants() -> None:
    ring = _ring("acme", "globex")
    before = ring.tenant("globex")
    ring, _ = ring.with_rotation("acme")
    assert ring.tenant("globex") == before


def test_with_state_refuses_unknown_version_and_state() -> None:
    ring = _ring("acme")
    with pytest.raises(KeyringError, match="no key version 7"):
        ring.with_state("acme", 7, "retired")
    with pytest.raises(KeyringError, match="invalid key state"):
        ring.with_state("acme", 1, "revoked")  # type: ignore[arg-type]


def test_only_keeps_one_tenant() -> None:
    ring = _ring("acme", "globex")
    only = ring.only("acme")
    assert list(only.tenants) == ["acme"]
    assert only.tenant("acme") == ring.tenant("acme")
    with pytest.raises(UnknownTenant):
        ring.only("initech")


# -- derived keys ---------------------------------------------------------------------
def test_derived_keys_differ_per_label_tenant_and_version() -> None:
    secret = bytes(range(32))
    a1 = derive_keys(secret, "acme", 1)
    assert len({a1.request_enc, a1.result_enc, a1.mac}) == 3
    assert all(len(k) == 32 for k in (a1.request_enc, a1.result_enc, a1.mac))
    assert secret not in (a1.request_enc, a1.result_enc, a1.mac)
    others = [derive_keys(secret, "globex", 1), derive_keys(secret, "acme", 2)]
    seen = {a1.request_enc, a1.result_enc, a1.mac}
    for other in others:
        for key in (other.request_enc, other.result_enc, other.mac):
            assert key not in seen
            seen.add(key)
    other_secret = derive_keys(bytes(32), "acme", 1)
    assert other_secret.mac != a1.mac


def test_derived_keys_are_deterministic_and_cached() -> None:
    secret = os.urandom(32)
    first = derive_keys(secret, "acme", 1)
    hits = derive_keys.cache_info().hits
    again = derive_keys(secret, "acme", 1)
    assert again is first
    assert derive_keys.cache_info().hits == hits + 1
    kv = KeyVersion(1, "primary", secret, "2024-01-01T00:00:00Z")
    assert kv.keys("acme") is first
    # A fresh computation gives the same keys (the cache is only a shortcut).
    derive_keys.cache_clear()
    assert derive_keys(secret, "acme", 1) == first


# -- secrets never shown --------------------------------------------------------------
def test_summary_and_reprs_never_contain_secrets() -> None:
    ring = _ring("acme", "globex")
    ring, _ = ring.with_rotation("acme")
    ring, _ = ring.with_rotation("acme", stage=True)
    ring = ring.with_state("acme", 1, "retired")
    forms = _secret_forms(ring)
    summary = ring.summary()
    assert {(r["tenant"], r["version"], r["state"]) for r in summary} == {
        ("acme", 1, "retired"),
        ("acme", 2, "primary"),
        ("acme", 3, "decrypt-only"),
        ("globex", 1, "primary"),
    }
    for row in summary:
        assert set(row) == {"tenant", "version", "state", "created_at"}
    texts = [json.dumps(summary), repr(summary), repr(ring), str(ring)]
    for t in ring.tenants.values():
        texts += [repr(t), str(t), repr(t.policy)]
        for kv in t.versions:
            derived = kv.keys(t.name)
            texts += [repr(kv), str(kv), repr(derived), str(derived)]
    for text in texts:
        for form in forms:
            assert form not in text


def test_derived_keys_repr_is_opaque() -> None:
    keys = DerivedKeys(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
    assert repr(keys) == "DerivedKeys()"


# -- the file ---------------------------------------------------------------------------
def test_save_writes_mode_0600_and_round_trips(path: Path) -> None:
    ring = _ring("acme", "globex")
    ring, _ = ring.with_rotation("acme", stage=True)
    ring = ring.with_policy("globex", TenantPolicy(("echo",), "normal"))
    save_keyring(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keyring(path)
    assert loaded == ring
    assert loaded.tenant("globex").policy == TenantPolicy(("echo",), "normal")


def test_save_is_atomic_and_leaves_no_temp_files(path: Path) -> None:
    save_keyring(path, _ring("acme"))
    first_inode = path.stat().st_ino
    ring, _ = load_keyring(path).with_rotation("acme")
    save_keyring(path, ring)
    # Replaced by rename (a new file), never rewritten in place.
    assert path.stat().st_ino != first_inode
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(path) == ring


def test_save_replaces_a_too_open_file_with_a_private_one(path: Path) -> None:
    path.write_text("{}")
    path.chmod(0o644)
    save_keyring(path, _ring("acme"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "keyring.json"
    save_keyring(path, _ring("acme"))
    assert load_keyring(path).tenant("acme")


def test_save_failure_leaves_no_temp_file(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_keyring(path, _ring("acme"))
    before = path.read_bytes()

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("maas_worker.tenancy.keyring.os.replace", fail)
    with pytest.raises(OSError):
        save_keyring(path, _ring("globex"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize(
    "mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o620, 0o602], ids=oct
)
def test_file_readable_by_others_refused(path: Path, mode: int) -> None:
    save_keyring(path, _ring("acme"))
    path.chmod(mode)
    with pytest.raises(KeyringError) as info:
        load_keyring(path)
    message = str(info.value)
    assert "chmod 600" in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_file_error_mentions_keys_init(path: Path) -> None:
    with pytest.raises(KeyringError) as info:
        load_keyring(path)
    assert "keys init" in str(info.value)
    assert "MAAS_KEYRING" in str(info.value)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xff\xfe", b"[1, 2"])
def test_invalid_json_refused(path: Path, data: bytes) -> None:
    _write_private(path, data)
    with pytest.raises(KeyringError, match="not valid JSON"):
        load_keyring(path)


Edit = Callable[[dict[str, Any]], None]


def _valid_doc() -> dict[str, Any]:
    return _ring("acme").to_json()


def _key(doc: dict[str, Any]) -> dict[str, Any]:
    key: dict[str, Any] = doc["tenants"]["acme"]["keys"][0]
    return key


def _set(field: str, value: object) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        _key(doc)[field] = value

    return edit


def _del(field: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        del _key(doc)[field]

    return edit


def _second_primary(doc: dict[str, Any]) -> None:
    extra = dict(_key(doc), version=2, secret=base64.b64encode(os.urandom(32)).decode())
    doc["tenants"]["acme"]["keys"].append(extra)


def _duplicate_version(doc: dict[str, Any]) -> None:
    extra = dict(_key(doc), state="decrypt-only")
    doc["tenants"]["acme"]["keys"].append(extra)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d.__setitem__("format", 2), id="format-2"),
        pytest.param(lambda d: d.pop("format"), id="no-format"),
        pytest.param(lambda d: d.pop("tenants"), id="no-tenants"),
        pytest.param(lambda d: d.__setitem__("tenants", []), id="tenants-list"),
        pytest.param(
            lambda d: d["tenants"].__setitem__("Bad Name", d["tenants"]["acme"]),
            id="bad-tenant-name",
        ),
        pytest.param(lambda d: d["tenants"].__setitem__("acme", "x"), id="tenant-not-object"),
        pytest.param(lambda d: d["tenants"]["acme"].pop("keys"), id="no-keys"),
        pytest.param(lambda d: d["tenants"]["acme"].__setitem__("keys", [1]), id="key-not-object"),
        pytest.param(_set("secret", "not base64!"), id="secret-not-base64"),
        pytest.param(_set("secret", base64.b64encode(b"short").decode()), id="secret-short"),
        pytest.param(_set("secret", 42), id="secret-int"),
        pytest.param(_set("state", "revoked"), id="bad-state"),
        pytest.param(_set("version", 0), id="version-0"),
        pytest.param(_set("version", "x"), id="version-text"),
        pytest.param(_del("secret"), id="no-secret"),
        pytest.param(_del("state"), id="no-state"),
        pytest.param(_second_primary, id="two-primaries"),
        pytest.param(_duplicate_version, id="duplicate-version"),
        pytest.param(lambda d: d["tenants"]["acme"].__setitem__("policy", []), id="policy-list"),
        pytest.param(
            lambda d: d["tenants"]["acme"].__setitem__("policy", {"max_priority": "urgent"}),
            id="policy-priority",
        ),
        pytest.param(
            lambda d: d["tenants"]["acme"].__setitem__("policy", {"allowed_models": "echo"}),
            id="policy-models",
        ),
    ],
)
def test_invalid_format_refused(path: Path, edit: Edit) -> None:
    doc = _valid_doc()
    edit(doc)
    _write_private(path, json.dumps(doc).encode())
    with pytest.raises(KeyringError):
        load_keyring(path)


@pytest.mark.parametrize("doc", [[], "keyring", 1, None])
def test_non_object_document_refused(path: Path, doc: object) -> None:
    _write_private(path, json.dumps(doc).encode())
    with pytest.raises(KeyringError, match="not a maas-worker keyring"):
        load_keyring(path)


def test_keyring_errors_never_echo_secrets(path: Path) -> None:
    doc = _valid_doc()
    secret = _key(doc)["secret"]
    _key(doc)["state"] = "bogus"
    _write_private(path, json.dumps(doc).encode())
    with pytest.raises(KeyringError) as info:
        load_keyring(path)
    assert str(secret) not in str(info.value)


# -- reloading ---------------------------------------------------------------------------
def test_source_picks_up_a_rotated_file(path: Path) -> None:
    save_keyring(path, _ring("acme"))
    source = KeyringSource(path, check_interval_s=0)
    assert source.get().tenant("acme").primary().version == 1
    rotated, _ = load_keyring(path).with_rotation("acme")
    save_keyring(path, rotated)
    assert source.get() == rotated
    assert source.get().tenant("acme").primary().version == 2


def test_source_waits_for_its_check_interval(path: Path) -> None:
    save_keyring(path, _ring("acme"))
    source = KeyringSource(path, check_interval_s=3600)
    first = source.get()
    rotated, _ = first.with_rotation("acme")
    save_keyring(path, rotated)
    assert source.get() is first


def test_refresh_reads_a_changed_file_at_once_whatever_the_interval(path: Path) -> None:
    """What a worker does before refusing an envelope under a key it does not hold."""
    save_keyring(path, _ring("acme"))
    source = KeyringSource(path, check_interval_s=3600)
    first = source.get()
    assert source.refresh() is False and source.get() is first  # unchanged: not re-read
    added = first.with_new_tenant("initech")
    save_keyring(path, added)
    assert source.refresh() is True
    assert source.get() == added
    _write_private(path, b'{"format": 1, "tenants": ')  # half-written
    assert source.refresh() is False and source.get() == added


def test_source_keeps_last_good_keyring_when_file_is_corrupted(path: Path) -> None:
    save_keyring(path, _ring("acme"))
    source = KeyringSource(path, check_interval_s=0)
    good = source.get()
    _write_private(path, b'{"format": 1, "tenants": ')  # half-edited by hand
    assert source.get() is good
    path.chmod(0o644)
    assert source.get() is good
    path.unlink()
    assert source.get() is good
    # Once the file is fixed, the next check loads it.
    fixed, _ = good.with_rotation("acme")
    save_keyring(path, fixed)
    assert source.get() == fixed


def test_source_refuses_to_start_without_a_good_keyring(path: Path) -> None:
    with pytest.raises(KeyringError):
        KeyringSource(path)
    _write_private(path, b"nope")
    with pytest.raises(KeyringError):
        KeyringSource(path)


# -- policy -------------------------------------------------------------------------------
def test_policy_default_allows_everything() -> None:
    policy = TenantPolicy()
    assert policy.allows_model("echo")
    assert policy.allows_model("digits@2")
    assert all(policy.allows_priority(p) for p in ("high", "normal", "low"))


def test_policy_allows_model_by_name_or_exact_version() -> None:
    policy = TenantPolicy(allowed_models=("echo", "digits@1"))
    assert policy.allows_model("echo")
    assert policy.allows_model("echo@3")
    assert policy.allows_model("digits@1")
    assert not policy.allows_model("digits")
    assert not policy.allows_model("digits@2")
    assert not policy.allows_model("sleep")
    assert not policy.allows_model("ech")
    assert not TenantPolicy(allowed_models=()).allows_model("echo")


@pytest.mark.parametrize(
    ("max_priority", "allowed"),
    [("high", {"high", "normal", "low"}), ("normal", {"normal", "low"}), ("low", {"low"})],
)
def test_policy_allows_priority(max_priority: str, allowed: set[str]) -> None:
    policy = TenantPolicy(max_priority=max_priority)
    for priority in ("high", "normal", "low"):
        assert policy.allows_priority(priority) is (priority in allowed)


def test_policy_json_round_trip() -> None:
    for policy in (TenantPolicy(), TenantPolicy(("echo", "digits@1"), "low")):
        assert TenantPolicy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    assert TenantPolicy.from_json(None) == TenantPolicy()


def test_tenant_without_keys_fails_cleanly_or_rotates(path: Path) -> None:
    doc = _valid_doc()
    doc["tenants"]["acme"]["keys"] = []
    _write_private(path, json.dumps(doc).encode())
    try:
        ring, version = load_keyring(path).with_rotation("acme")
    except KeyringError:
        return
    assert version == 1
    assert ring.tenant("acme").primary().version == 1
