"""Redis Sentinel and chosen durability against real servers (docs/scaling.md).

One `SentinelGroup` (a primary, a replica, three sentinels; passwords on the
data nodes and on the sentinels) for the module;
nothing here fails over (tests/reliability/test_failover.py does). Checked:
clients and workers find the primary through ``sentinel://`` URLs, the
async client and the gateway's factory too; ``MAAS_REDIS_WAIT_REPLICAS``
asking for more replicas than there are fails a submit with the job ids and
hands a finished job back at the worker rather than acknowledging it; and
``maas-worker acl --apply`` finds every data node.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from maas_worker import Client, ServiceUnavailable
from maas_worker.backend import keyspace
from maas_worker.backend.redis import async_redis_client, backend_client, redis_client
from maas_worker.local.embedded import DEFAULT_MASTER_NAME, SentinelGroup
from maas_worker.settings import Settings
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, save_keyring

from .conftest import WAIT_S, Stack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    # Passwords on the data nodes (in the URL) and on the sentinels themselves.
    with SentinelGroup(
        replicas=1, sentinels=3, password="node-pw", sentinel_password="sentinel-pw"
    ) as g:
        yield g


@pytest.fixture
def stack(group: SentinelGroup, tmp_path: Path) -> Iterator[Stack]:
    keyring_path = tmp_path / "keyring.json"
    save_keyring(keyring_path, Keyring().with_new_tenant("acme"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_BROKER_URL=group.url(),
        MAAS_REDIS_SENTINEL_MASTER=DEFAULT_MASTER_NAME,
        MAAS_REDIS_SENTINEL_PASSWORD="sentinel-pw",
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_TENANT="acme",
        MAAS_MODEL_DIR=str(tmp_path / "models"),
        MAAS_METRICS_PORT="0",
        MAAS_REDIS_WAIT_TIMEOUT_MS="200",
    )
    backend = backend_client(Settings.from_env(env))
    s = Stack(group.url(), tmp_path, keyring_path, env, backend)
    try:
        yield s
    finally:
        for w in s.workers:
            w.stop(timeout_s=5)
        backend.flushdb()  # the group's own servers, shared by this module only
        backend.close()


def test_clients_and_workers_find_the_primary_and_wait_for_the_replica(
    group: SentinelGroup, stack: Stack
) -> None:
    stack.env["MAAS_REDIS_WAIT_REPLICAS"] = "1"
    stack.start_worker("s1", concurrency=1)
    with stack.client("acme") as client:
        job = client.submit("echo", {"n": 1})
        # Acknowledged after WAIT: the replica holds the job's queued marker already.
        node = group.replicas()[0]
        replica = redis_client(
            f"redis://:node-pw@127.0.0.1:{node.port}/0", tls=stack.settings.redis_tls
        )
        assert replica.exists(keyspace.submitted("acme", job.id))
        assert job.result(timeout=WAIT_S) == {"echo": {"n": 1}}
        wait_for(lambda: replica.exists(keyspace.result("acme", job.id)), WAIT_S, "the result")
        replica.close()
    assert stack.outcomes(job.id) == ["succeeded"]

    async def ping() -> bool:
        s = stack.settings
        client = async_redis_client(s.broker_url, tls=s.redis_tls, ha=s.redis_ha)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping())


def test_a_submit_not_confirmed_by_enough_replicas_fails_with_its_job_ids(stack: Stack) -> None:
    stack.env["MAAS_REDIS_WAIT_REPLICAS"] = "2"  # there is one
    with stack.client("acme") as client, pytest.raises(ServiceUnavailable) as caught:
        client.submit_many("echo", [{"n": 1}, {"n": 2}])
    assert "1 of 2 replica(s) confirmed within 200 ms" in str(caught.value)
    assert "check their status" in str(caught.value)
    assert len(caught.value.job_ids) == 2
    # Queued on the primary all the same (no failover happened): status says so.
    with stack.client("acme") as client:
        assert {client.job(j).status() for j in caught.value.job_ids} == {"queued"}


@pytest.mark.parametrize(
    ("args", "hand_back"),
    [
        (("--celery-tasks",), "NotReplicated; requeueing"),
        ((), "NotReplicated; handing the unfinished jobs back"),
    ],
    ids=["task", "batch"],
)
def test_a_worker_does_not_acknowledge_a_result_the_replicas_did_not_confirm(
    stack: Stack, args: tuple[str, ...], hand_back: str
) -> None:
    with stack.client("acme") as client:
        job = client.submit("echo", {"n": 7})  # the client waits for no replica
    stack.start_worker("s2", concurrency=1, env={"MAAS_REDIS_WAIT_REPLICAS": "2"}, args=args)
    assert job.result(timeout=WAIT_S) == {"echo": {"n": 7}}
    # Stored, but not confirmed: handed back instead of acknowledged.
    wait_for(lambda: hand_back in stack.worker_logs(), WAIT_S, "the hand-back")


def test_acl_apply_finds_every_data_node(group: SentinelGroup, stack: Stack) -> None:
    nodes = acl.data_nodes(group.url(), stack.settings)
    ports = [int(n.rsplit(":", 1)[1].split("/")[0]) for n in nodes]
    assert ports[0] == group.primary_port()
    assert sorted(ports) == sorted(n.port for n in group.nodes)


#: The two users Sentinel and replication need on data nodes with an ACL file, as
#: docs/scaling.md tells the operator to append them.
_HA_USERS = (
    "user replica-user on >replica-pw +psync +replconf +ping\n"
    "user sentinel-user on >sentinel-user-pw allchannels +multi +slaveof +ping +exec "
    "+subscribe +config|rewrite +role +publish +info +client|setname +client|kill "
    "+script|kill\n"
)


def test_acl_apply_loads_the_acl_on_every_data_node(tmp_path: Path) -> None:
    """Data nodes on one ACL file (``default`` off, the roles, the two users above):
    a tenant added later gets its user on the primary AND the replica through
    ``acl.apply`` with the ``sentinel://`` URL (ACL changes are not replicated), and
    its producer submits through Sentinel with it."""
    keyring_path = tmp_path / "keyring.json"
    acl_file, passwords_dir = tmp_path / "users.acl", tmp_path / "passwords"
    ring = Keyring().with_new_tenant("acme")
    save_keyring(keyring_path, ring)
    acl.generate(ring.tenants, acl_file=acl_file, passwords_dir=passwords_dir)
    acl_file.write_text(acl_file.read_text() + _HA_USERS)
    operator = (passwords_dir / "operator").read_text().strip()
    node_args = ("--aclfile", str(acl_file), "--masteruser", "replica-user")
    with SentinelGroup(
        replicas=1,
        sentinels=3,
        node_args=(*node_args, "--masterauth", "replica-pw"),
        node_auth=("operator", operator),
        sentinel_auth=("sentinel-user", "sentinel-user-pw"),
    ) as group:
        ring = ring.with_new_tenant("globex")
        save_keyring(keyring_path, ring)
        acl.generate(ring.tenants, acl_file=acl_file, passwords_dir=passwords_dir)
        acl_file.write_text(acl_file.read_text() + _HA_USERS)
        passwords = {p.name: p.read_text().strip() for p in passwords_dir.iterdir()}
        env = {
            "MAAS_BROKER_URL": group.url(),
            "MAAS_REDIS_SENTINEL_MASTER": DEFAULT_MASTER_NAME,
            "MAAS_KEYRING": str(keyring_path),
            "MAAS_DIAGNOSTIC_MODELS": "1",
        }
        acl.apply(group.url(), operator, passwords, Settings.from_env(env))
        for node in group.nodes:  # the new user on every node, the replica too
            client = redis.Redis(
                port=node.port, username="producer-globex", password=passwords["producer-globex"]
            )
            assert client.ping()
            client.close()
        url = acl.role_url(group.url(), "producer-globex", passwords["producer-globex"])
        producer = Settings.from_env({**env, "MAAS_BROKER_URL": url, "MAAS_TENANT": "globex"})
        with Client(settings=producer) as client:
            assert client.submit("echo", {"n": 1}).status() == "queued"
        group.wait_replicated()  # replication still authenticates after the reload
