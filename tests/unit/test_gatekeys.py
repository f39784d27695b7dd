"""The gateway keyring: MAC keys and bearer hashes only, and the bearer token's derivation."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from maas_worker.crypto.envelope import Header, open_envelope, seal, verify
from maas_worker.errors import InvalidEnvelope, KeyringError
from maas_worker.tenancy.gatekeys import (
    GatewayKeyring,
    bearer_secret,
    bearer_token,
    load_gateway_keyring,
    save_gateway_keyring,
)
from maas_worker.tenancy.keyring import Keyring, KeyVersion, Tenant

ROOT = bytes(range(32))
#: docs/gateway.md's test vector: root secret 00..1f, tenant acme, key version 1.
VECTOR_SECRET = "af11204db159ab2ca7a2b48cf7bb757633a6686446dcad3d91b52f53feb60191"
VECTOR_TOKEN = "acme.1.rxEgTbFZqyynorSM97t1djOmaGRG3K09kbUvU_62AZE"


def _ring() -> Keyring:
    kv = KeyVersion(1, "primary", ROOT, "")
    return Keyring({"acme": Tenant("acme", (kv,))}).with_new_tenant("globex")


def test_bearer_token_vector() -> None:
    assert bearer_secret(ROOT, "acme", 1).hex() == VECTOR_SECRET
    assert bearer_token(ROOT, "acme", 1) == VECTOR_TOKEN


def test_vector_is_in_the_docs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "gateway.md").read_text()
    assert VECTOR_SECRET in doc and VECTOR_TOKEN in doc


def test_the_bearer_token_is_no_envelope_key() -> None:
    keys = _ring().tenant("acme").primary().keys("acme")
    assert bearer_secret(ROOT, "acme", 1) not in (keys.mac, keys.request_enc, keys.result_enc)


def test_export_holds_no_secret_and_no_encryption_key() -> None:
    ring = _ring()
    gate = GatewayKeyring.from_keyring(ring)
    text = json.dumps(gate.to_json())
    for tenant in ring.tenants.values():
        for kv in tenant.versions:
            keys = kv.keys(tenant.name)
            for secret in (kv.secret, keys.request_enc, keys.result_enc):
                assert secret.hex() not in text
                assert __import__("base64").b64encode(secret).decode() not in text
            token = bearer_token(kv.secret, tenant.name, kv.version)
            assert token not in text
    assert {k for t in gate.to_json()["tenants"].values() for e in t["keys"] for k in e} == {
        "version",
        "state",
        "mac",
        "bearer_sha256",
    }


def test_it_checks_a_mac_and_cannot_decrypt() -> None:
    ring = _ring()
    gate = GatewayKeyring.from_keyring(ring)
    header = Header("request", 1, 1_700_000_000_000, 1_700_000_300_000, "high", "acme",
                    "job-0001", "maas.infer", "echo@1")  # fmt: skip
    raw = seal(ring.tenant("acme").primary().keys("acme"), header, b'{"text":"hi"}')
    checked = verify(raw, expect="request", keyring=gate, max_bytes=4096, at_ms=1_700_000_000_000)
    assert checked.header.job_id == "job-0001"
    with pytest.raises(KeyringError):
        checked.decrypt()
    with pytest.raises(InvalidEnvelope):
        open_envelope(raw, expect="request", keyring=gate, max_bytes=4096, at_ms=1_700_000_000_000)
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(InvalidEnvelope):
        verify(forged, expect="request", keyring=gate, max_bytes=4096, at_ms=1_700_000_000_000)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "acme",
        "acme.1",
        "acme.1.",
        VECTOR_TOKEN + "A",
        VECTOR_TOKEN.replace("acme", "globex", 1),
        VECTOR_TOKEN.replace(".1.", ".2.", 1),
        VECTOR_TOKEN.replace(".1.", ".².", 1),
        "nobody.1." + VECTOR_TOKEN.rsplit(".", 1)[1],
    ],
)
def test_bearer_refuses_anything_but_the_token(token: str) -> None:
    gate = GatewayKeyring.from_keyring(_ring())
    assert gate.bearer_tenant(VECTOR_TOKEN) == "acme"
    assert gate.bearer_tenant(token) is None


def test_retired_versions_authenticate_nothing() -> None:
    ring = _ring().with_rotation("acme")[0]
    ring = ring.with_state("acme", 1, "retired")
    gate = GatewayKeyring.from_keyring(ring)
    assert gate.bearer_tenant(VECTOR_TOKEN) is None
    kv2 = ring.tenant("acme").primary()
    assert gate.bearer_tenant(bearer_token(kv2.secret, "acme", 2)) == "acme"


def test_file_round_trip_private(tmp_path: Path) -> None:
    gate = GatewayKeyring.from_keyring(_ring())
    path = tmp_path / "gw.json"
    save_gateway_keyring(path, gate)
    assert os.stat(path).st_mode & 0o077 == 0
    assert load_gateway_keyring(path) == gate
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match="group or others"):
        load_gateway_keyring(path)


def test_a_full_keyring_is_not_a_gateway_keyring() -> None:
    with pytest.raises(KeyringError, match="not a gateway keyring"):
        GatewayKeyring.from_json(_ring().to_json())
    with pytest.raises(KeyringError):
        Keyring.from_json({**GatewayKeyring.from_keyring(_ring()).to_json()})


def test_bearer_hash_is_sha256_of_the_text() -> None:
    gate = GatewayKeyring.from_keyring(_ring())
    kv = gate.tenants["acme"].primary()
    assert kv.bearer_sha256 == hashlib.sha256(VECTOR_TOKEN.encode()).digest()


def test_openapi_document_is_checked_in() -> None:
    from maas_worker.gateway.openapi import document

    path = Path(__file__).parents[2] / "docs" / "gateway-openapi.json"
    assert json.loads(path.read_text()) == document(), (
        "regenerate: python -m maas_worker.gateway.openapi > docs/gateway-openapi.json"
    )


def test_client_with_a_gateway_url_is_a_gateway_client(tmp_path: Path) -> None:
    from maas_worker import Client
    from maas_worker.client.viagateway import GatewayClient
    from maas_worker.errors import ConfigError
    from maas_worker.settings import Settings

    settings = Settings.from_env({"MAAS_TENANT": "acme", "HOME": str(tmp_path)})
    client = Client(settings=settings, keyring=_ring(), gateway_url="http://127.0.0.1:1/")
    assert isinstance(client, GatewayClient) and client.gateway_url == "http://127.0.0.1:1"
    assert type(Client(settings=settings, keyring=_ring())) is Client
    with pytest.raises(ConfigError):
        Client(settings=settings, keyring=_ring(), gateway_url="file:///etc/passwd")
