"""A Redis Cluster over TLS (#17): 3 primaries with a replica each, TLS only, on loopback.

Every node listens on TLS only (no plaintext port), and the cluster bus and
replication speak TLS too (`ClusterGroup` with ``tls_files``). The
certificates are docker/init-secrets.sh's, as an operator makes them: the
server's names 127.0.0.1 (an IP SAN), the address the nodes announce, so
every connection is verified against the CA, the shard connections found
through ``CLUSTER SLOTS`` and redis-py's cluster client alike. The whole
pipeline (``MAAS_REDIS_CLUSTER=1``, 3 shards, broker and result store on the
cluster) runs over ``rediss://`` in both worker modes. Needs ``openssl`` and
a server built with TLS (Debian's ``redis-server``; the embedded Valkey has
none): skipped without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas_worker import Client
from maas_worker.backend.redis import backend_client
from maas_worker.broker import shards
from maas_worker.errors import ConfigError, ServiceUnavailable
from maas_worker.local.embedded import ClusterGroup, TLSFiles
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import TenantPolicy, save_keyring

from .conftest import WAIT_S, WORKER_MODES, Stack, make_keyring

pytestmark = pytest.mark.integration

N = 3
TENANTS = {"initech": 0, "globex": 1, "acme": 2}
#: Every producer kind: sync and asyncio pinned connections, the gateway's pools.
KINDS = {"initech": "sync", "globex": "async", "acme": "gateway"}
INIT_SECRETS = Path(__file__).resolve().parents[2] / "docker" / "init-secrets.sh"


def _secrets(d: Path) -> Path:
    """docker/init-secrets.sh's CA and certificates in ``d``; their folder."""
    subprocess.run(["bash", str(INIT_SECRETS), str(d)], check=True, capture_output=True, timeout=60)
    return d / "secrets" / "tls"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (docker/init-secrets.sh needs it)")
    return _secrets(tmp_path_factory.mktemp("cluster-tls"))


@pytest.fixture(scope="module")
def cluster(tls_dir: Path) -> Iterator[ClusterGroup]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no TLS-capable redis-server here (the embedded Valkey has no TLS)")
    d = tls_dir
    files = TLSFiles(
        d / "redis.crt", d / "redis.key", d / "ca.crt", d / "client.crt", d / "client.key"
    )
    group = ClusterGroup(primaries=3, replicas=1, tls_files=files, binary=Path(binary)).start()
    try:
        yield group
    finally:
        group.stop()


def tls_env(cluster: ClusterGroup, tls_dir: Path, tmp: Path) -> dict[str, str]:
    keyring_path = tmp / "keyring.json"
    ring = make_keyring()
    for tenant in TENANTS:
        if tenant not in ring.tenants:
            ring = ring.with_new_tenant(tenant, TenantPolicy(("echo",), "normal"))
    save_keyring(keyring_path, ring)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_BROKER_URL=cluster.url,
        MAAS_REDIS_CLUSTER="1",
        MAAS_REDIS_CLUSTER_NODES=cluster.seeds,
        MAAS_QUEUE_SHARDS=str(N),
        MAAS_REDIS_TLS_CA=str(tls_dir / "ca.crt"),
        MAAS_REDIS_TLS_CERT=str(tls_dir / "client.crt"),
        MAAS_REDIS_TLS_KEY=str(tls_dir / "client.key"),
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_TENANT="acme",
        MAAS_METRICS_PORT="0",
        MAAS_MODEL_DIR=str(tmp / "models"),
    )
    return env


def test_the_nodes_listen_on_tls_only_and_announce_their_tls_ports(cluster: ClusterGroup) -> None:
    assert cluster.url.startswith("rediss://127.0.0.1:")
    for node in cluster.nodes:
        with cluster._client(node.port) as client:
            reply = client.execute_command("CLUSTER", "SLOTS")
            assert {int(n[1]) for _s, _e, *nodes in reply for n in nodes} <= {
                n.port for n in cluster.nodes
            }
            assert client.config_get("port")["port"] == "0"  # no plaintext listener
            assert client.config_get("tls-cluster")["tls-cluster"] == "yes"
    # The shards' tags land on 3 different primaries.
    assert len({cluster.owner(shards.prefix(k, sharded=True)).port for k in range(N)}) == N


@pytest.mark.parametrize("mode", list(WORKER_MODES))
def test_the_whole_pipeline_runs_over_tls_on_the_cluster(
    cluster: ClusterGroup, tls_dir: Path, tmp_path: Path, mode: str
) -> None:
    for node in cluster.primaries():  # a fresh deployment on the module's cluster
        with cluster._client(node.port) as client:
            client.flushall()
    env = tls_env(cluster, tls_dir, tmp_path)
    backend = backend_client(Settings.from_env(env))
    stack = Stack(cluster.url, tmp_path, tmp_path / "keyring.json", env, backend)  # type: ignore[arg-type]
    stack.worker_args = WORKER_MODES[mode]
    try:
        if mode == "batch":
            stack.start_worker("tc", concurrency=N)  # one consumer process per shard
        else:
            for k in range(N):  # a Celery-task node consumes one shard
                stack.start_worker(f"tc{k}", concurrency=1, args=("--shards", str(k)))
        for tenant in TENANTS:
            with stack.client(tenant, kind=KINDS[tenant]) as client:
                jobs = client.submit_many("echo", [{"t": tenant, "i": i} for i in range(4)])
                assert [j.result(timeout=WAIT_S) for j in jobs] == [
                    {"echo": {"t": tenant, "i": i}} for i in range(4)
                ]
        # Each shard's take ran (over TLS) on the primary serving its tag.
        for k in range(N):
            owner = cluster.owner(shards.prefix(k, sharded=True))
            with cluster._client(owner.port) as node:
                stats = node.info("commandstats")
            calls = (stats.get(c, {}).get("calls", 0) for c in ("cmdstat_eval", "cmdstat_evalsha"))
            assert sum(calls) > 0, owner.port
        logs = stack.worker_logs()
        assert "SSL" not in logs and "certificate verify failed" not in logs
    finally:
        stack.stop_gateway()
        for w in stack.workers:
            w.stop(timeout_s=5)
        backend.close()


def test_a_client_with_another_ca_is_refused_not_downgraded(
    cluster: ClusterGroup, tls_dir: Path, tmp_path: Path
) -> None:
    """Verification stays on: a CA that did not sign the nodes' certificate fails the
    handshake (one clean error), for the shard connections and the cluster client."""
    other = _secrets(tmp_path / "other")
    env = {**tls_env(cluster, tls_dir, tmp_path), "MAAS_REDIS_TLS_CA": str(other / "ca.crt")}
    with (
        pytest.raises((ServiceUnavailable, ConfigError)),
        Client(settings=Settings.from_env(env)) as client,
    ):
        client.submit("echo", {"n": 1})
