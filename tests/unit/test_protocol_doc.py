"""docs/protocol.md stays in step with the code that speaks the protocol.

The conformance test (tests/integration/test_protocol_conformance.py) proves a
producer following the page gets jobs run; these checks catch the page going
stale when a constant, a Redis role or the Python client's message changes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from maas_worker.backend import functions, keyspace
from maas_worker.broker import fetch
from maas_worker.client.core import INLINE_MAX_BYTES, ClientCore
from maas_worker.client.wire import MessageBuilder
from maas_worker.crypto.envelope import Header
from maas_worker.protocol import ARGS_REPR, QUEUE_NAMES, TASK_NAME
from maas_worker.settings import Settings
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, TenantPolicy

DOC = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"


def _header(issued: int = 1_700_000_000_000, ttl_ms: int = 600_000) -> Header:
    return Header("request", 1, issued, issued + ttl_ms, "normal", "acme", JOB, TASK_NAME, "echo")


def test_names_and_limits_are_the_codes() -> None:
    assert f"`{fetch.WAKE_KEY}`" in DOC
    assert f"LTRIM {fetch.WAKE_KEY} 0 {fetch.WAKE_MAX - 1}" in DOC
    assert INLINE_MAX_BYTES == 48 * 1024 and "48 KiB (49 152 bytes" in DOC
    assert f"`{TASK_NAME}`" in DOC and ARGS_REPR in DOC
    for queue in QUEUE_NAMES:
        assert f"`{queue}`" in DOC
    for name in (functions.LIBRARY, functions.CANCEL, functions.ADVISE_MANY, functions.MARK_QUEUED):
        assert f"`{name}`" in DOC
    assert str(keyspace.MAX_TTL_MS) in DOC
    assert keyspace.submitted("T", "J") == "maas:{T}:job:J"  # 3.9's key


def test_the_queued_marker_is_the_documented_command() -> None:
    settings = Settings(result_ttl_s=3600)
    core = ClientCore(settings=settings, keyring=Keyring().with_new_tenant("acme"), tenant="acme")
    header = _header()
    batch = core.marker_write([(header, b""), (header, b"")])
    # 3.9: the expiry in ms, decimal; EX (lifetime ms // 1000) + result TTL s; a batch's
    # markers in one FCALL, every key in KEYS, the fields in one string.
    assert batch.keys == [keyspace.submitted("acme", JOB)] * 2
    one = f"{header.expires_at_ms} {600 + 3600}"
    assert batch.args == ["mark", f"{one} {one}"]
    assert (
        "SET maas:{T}:job:<job> <expires_at_ms in decimal ASCII> "
        "EX <(expires_at_ms - issued_at_ms) // 1000 + result_ttl_s>"
    ) in DOC
    assert (
        f"FCALL {functions.MARK_QUEUED} <n> maas:{{T}}:job:<job 1> ... maas:{{T}}:job:<job n>\n"
        '      mark "<expires_at_ms 1> <ttl_s 1> ... <expires_at_ms n> <ttl_s n>"'
    ) in DOC


def test_the_producer_role_allows_what_the_page_lists() -> None:
    # 2.2: every command the role grants is in its table (the role changes, the page must).
    table = DOC.split("### 2.2 The Redis user", 1)[1].split("### 3.", 1)[0]
    granted = {
        rule[1:].split("|")[0].upper()
        for rule in re.findall(r"\+[a-z|]+", " ".join(acl.producer_rules("acme")))
        if rule not in ("+@connection",)
    }
    missing = sorted(c for c in granted if f"`{c}`" not in table and c not in table)
    assert not missing, f"docs/protocol.md 2.2 does not list {missing}"


def test_the_python_clients_entry_has_the_documented_fields() -> None:
    (text,) = MessageBuilder().messages("acme", [(_header(), b"\x01" * 100)], "maas.normal")
    entry = json.loads(text)
    example = DOC.split("The Python client sends this", 1)[1].split("```json", 1)[1]
    example = example.split("```", 1)[0]
    for part in ("headers", "properties"):
        for name in entry[part]:
            assert f'"{name}"' in example, f"3.6 does not show {part}.{name}"
    assert entry["properties"]["body_encoding"] == "base64"
    assert entry["headers"]["task"] == TASK_NAME
    assert entry["headers"]["id"] == JOB


def test_the_export_fields_are_documented() -> None:
    policy = TenantPolicy(("echo",), "normal", 5.0, 10, 3, allowed_signers=("ab" * 8,))
    doc = Keyring().with_new_tenant("acme", policy).to_json()
    section = DOC.split("### 2.1 The keyring export", 1)[1].split("### 2.2", 1)[0]
    assert set(doc) == {"format", "tenants"}
    tenant = doc["tenants"]["acme"]
    for name in tenant["policy"]:
        assert f"`policy.{name}`" in section
    for name in tenant["keys"][0]:
        assert f"`keys[].{name}`" in section
