"""The Redis roles for a deployment with queue shards (`acl.ShardLayout`), without a server.

Every broker key, channel and selector is given under each shard's prefix; a
producer's under its own shard's only. tests/integration/test_acl_shards.py
loads such a file into a real server and runs every role.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from maas_worker.broker import shards
from maas_worker.cli import main
from maas_worker.settings import Settings
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, save_keyring

N = 3
LAYOUT = acl.ShardLayout(N, sharded=True)
TAGS = [shards.prefix(k, sharded=True) for k in range(N)]
#: A key or channel rule (``~k``, ``%R~k``, ``&c``) and its pattern.
PATTERN = re.compile(r"^\(?(?:%[RW]+~|~|&)(?P<pattern>[^ )]+)\)?$")


def patterns(rules: list[str]) -> list[str]:
    """Every key and channel pattern in ``rules`` (selectors opened)."""
    out = []
    for rule in rules:
        for word in rule.split():
            if m := PATTERN.match(word):
                out.append(m["pattern"])
    return out


def test_the_layout_follows_the_settings() -> None:
    def layout(**env: str) -> acl.ShardLayout:
        return acl.ShardLayout.of(Settings.from_env({"MAAS_BROKER_URL": "redis://h/0", **env}))

    assert layout() == acl.UNSHARDED
    assert acl.UNSHARDED.prefixes == [""]
    assert layout(MAAS_QUEUE_SHARDS="3") == LAYOUT
    assert LAYOUT.prefixes == TAGS
    # A Redis Cluster with one shard: still under its tag.
    assert layout(MAAS_REDIS_CLUSTER="1") == acl.ShardLayout(1, sharded=True, cluster=True)
    assert layout(MAAS_REDIS_CLUSTER="1").prefixes == ["{maas-q0}"]


@pytest.mark.parametrize("role", ["producer-acme", "gateway", "beat", "monitor", "flower"])
def test_on_a_cluster_every_role_may_ask_where_the_slots_are(role: str) -> None:
    on_cluster = acl.ShardLayout(N, sharded=True, cluster=True)
    rules = acl.role_rules(role, tenants=("acme",), layout=on_cluster)
    assert rules.count("+cluster|slots") == 1
    assert "+cluster|slots" not in acl.role_rules(role, tenants=("acme",), layout=LAYOUT)


def test_the_default_layout_changes_no_rule() -> None:
    for role in [*acl.ROLES, "producer-acme", "gateway"]:
        default = acl.role_rules(role, dbs=(0, 2), tenants=("acme", "globex"))
        same = acl.role_rules(role, dbs=(0, 2), tenants=("acme", "globex"), layout=acl.UNSHARDED)
        assert default == same


@pytest.mark.parametrize("tenant", ["acme", "globex", "initech"])
def test_a_producer_touches_broker_keys_on_its_own_shard_only(tenant: str) -> None:
    own = TAGS[shards.shard_of(tenant, N)]
    rules = acl.producer_rules(tenant, LAYOUT)
    broker = [p for p in patterns(rules) if p.startswith("{maas-q")]
    # Its lists of each queue, the arrivals, the wake-up list: all on its shard.
    assert len(broker) == 3 + 3 + 3 + 1
    assert all(p.startswith(own) for p in broker)
    assert {p[len(own) :] for p in broker if p.endswith(f".{tenant}")} == {
        f"maas.{prio}.{tenant}" for prio in ("high", "normal", "low")
    }
    # No unprefixed broker key either (maas.<prio>..., maas:wake, maas:arrivals:...).
    assert not [p for p in patterns(rules) if p.startswith(("maas.", "maas:wake", "maas:arr"))]


def test_the_gateway_has_each_tenants_lists_on_that_tenants_shard() -> None:
    tenants = ("acme", "globex", "initech")
    rules = acl.gateway_rules(tenants, LAYOUT)
    found = set(patterns(rules))
    for t in tenants:
        own = TAGS[shards.shard_of(t, N)]
        assert f"{own}maas.normal.{t}" in found
        assert not {f"{tag}maas.normal.{t}" for tag in TAGS if tag != own} & found


@pytest.mark.parametrize("role", ["worker", "monitor", "flower", "beat"])
def test_the_deployment_roles_reach_every_shard_and_no_unprefixed_broker_key(role: str) -> None:
    found = patterns(acl.role_rules(role, dbs=(0,), layout=LAYOUT))
    for tag in TAGS:
        assert any(p.startswith(tag) for p in found), (role, tag)
    # Channels carry kombu's global_keyprefix before the fanout prefix.
    channels = [p for p in found if "/0." in p]
    assert bool(channels) is (role != "monitor")  # the monitor uses no Pub/Sub
    assert all(p.startswith("{maas-q") for p in channels)
    # Unprefixed: the result store's keys only.
    assert all(p.startswith(("{maas-q", "maas:")) for p in found), found
    assert not [p for p in found if p.startswith(("maas:wake", "maas:ring", "maas:arrivals"))]


def test_the_command_writes_the_roles_of_the_settings_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MAAS_"):
            monkeypatch.delenv(name)
    keyring = tmp_path / "keyring.json"
    save_keyring(keyring, Keyring().with_new_tenant("acme"))
    monkeypatch.setenv("MAAS_KEYRING", str(keyring))
    monkeypatch.setenv("MAAS_BROKER_URL", "redis://operator:x@redis.internal:6379/0")
    monkeypatch.setenv("MAAS_QUEUE_SHARDS", str(N))
    monkeypatch.chdir(tmp_path)
    assert main(["acl"]) == 0
    text = (tmp_path / "users.acl").read_text()
    acme = TAGS[shards.shard_of("acme", N)]
    assert f"%W~{acme}maas.normal.acme" in text
    assert all(f"&{tag}/0.celeryev/*" in text for tag in TAGS)
