"""``maas-worker server``: the bundled Valkey as a local Redis, for development and the README.

Unlike `EmbeddedRedis` (a throw-away server on a free port for the demo and
the tests), this one behaves like a Redis a developer runs by hand:

- it listens on 127.0.0.1 only, on the port asked for (6379 by default, the
  port ``MAAS_BROKER_URL`` defaults to), with no password: loopback is its only
  protection, so there is no option to listen elsewhere (a shared Redis wants
  ACLs and TLS: docs/operations.md);
- its data persists in a folder of its own (an append-only file), by default
  ``$XDG_DATA_HOME/maas-worker/server-<port>`` (``~/.local/share/...``), with its
  log and pid file beside it;
- it is ready when it says so: the URL is printed only once the server on the
  port answers and is this very process (``INFO``'s ``process_id`` is the pid
  it wrote), never another server that held the port already;
- ``--detach`` returns once it is ready, as ``redis-server --daemonize yes``
  would but without its race; ``--stop`` stops the server of that folder by its
  pid file, after checking the pid is a Valkey server on that port: it never
  sends SHUTDOWN to whatever answers on the port (that could be a system Redis).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import redis

from maas_worker.children import ends_with_parent
from maas_worker.errors import ConfigError
from maas_worker.local.embedded import server_binary

#: ``maas-worker server``'s port by default: the one ``MAAS_BROKER_URL`` defaults to.
DEFAULT_SERVER_PORT = 6379
#: Seconds to wait for the server to answer (it loads its append-only file first).
READY_TIMEOUT_S = 30.0
#: Seconds to wait for the server to exit after SIGTERM (it flushes its file).
STOP_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
PID_FILE = "valkey.pid"
LOG_FILE = "valkey.log"


def default_data_dir(port: int, env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/maas-worker/server-<port>`` (``~/.local/share/...`` without it)."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "maas-worker" / f"server-{port}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to stop
        return True
    return True


@dataclass(frozen=True)
class LocalServer:
    """The bundled server on ``port`` with its data in ``data_dir``."""

    port: int
    data_dir: Path

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"invalid port {self.port} (1..65535)")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``: what ``MAAS_BROKER_URL`` should be."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid_path(self) -> Path:
        """The pid file the server writes at start and removes at a clean exit."""
        return self.data_dir / PID_FILE

    @property
    def log_path(self) -> Path:
        """The server's log."""
        return self.data_dir / LOG_FILE

    def command(self, *, daemonize: bool) -> list[str]:
        """The server's command line."""
        return [
            str(server_binary()),
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--protected-mode",
            "yes",
            "--dir",
            str(self.data_dir),
            # Persistent as a real server: every write goes to the append-only
            # file (fsync each second), loaded again at the next start.
            "--appendonly",
            "yes",
            "--save",
            "",
            "--pidfile",
            str(self.pid_path),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "yes" if daemonize else "no",
        ]

    # -- state ------------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The pid in the pid file if that process is this port's Valkey server, else None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _alive(pid):
            return None
        # A stale file's pid may have been reused by anything: only a server
        # whose title names this port is ours (Linux; elsewhere the pid is trusted).
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "server" not in title or f":{self.port}" not in title:
                return None
        return pid

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the server binds: a connection in TIME_WAIT does not hold the port.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, self.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {self.port} is in use on {LOOPBACK} (another Redis?): "
                        "choose another with --port"
                    ) from None
                raise ConfigError(
                    f"cannot listen on {LOOPBACK}:{self.port}: {exc.strerror}"
                ) from None

    def _prepare(self) -> None:
        pid = self.running_pid()
        if pid is not None:
            raise ConfigError(
                f"a server is already running from {self.data_dir} (pid {pid}): "
                f"{self.url}; stop it with --stop"
            )
        self._check_port_free()
        # A pid file left by a server that did not exit cleanly names a dead process
        # (or, by now, someone else's): readiness must wait for the new server's own.
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.data_dir}: {exc.strerror}") from None

    def _answering_pid(self) -> int | None:
        """The pid of the server answering on the port (None: none answers yet)."""
        client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1.0)
        try:
            info = client.info("server")
            return int(info["process_id"])
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return None
        except (redis.ResponseError, KeyError, ValueError):  # not a server like ours
            return -1
        finally:
            client.close()

    def _failure(self, what: str) -> ConfigError:
        tail = ""
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
            tail = lines[-1].split(" * ", 1)[-1].split(" # ", 1)[-1] if lines else ""
        return ConfigError(f"{what}{': ' + tail if tail else ''} (log: {self.log_path})")

    def _wait_ready(
        self, pid_of: Callable[[], int | None], exited: Callable[[], bool], timeout_s: float
    ) -> int:
        """Wait until the server ``pid_of`` names answers on the port; its pid."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if exited():
                raise self._failure("the server exited during startup")
            pid = pid_of()
            if pid is not None and self._answering_pid() == pid:
                return pid
            time.sleep(0.02)
        raise self._failure(f"the server did not answer within {timeout_s:g} s")

    # -- start and stop ---------------------------------------------------------------------
    def start_detached(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start the server in the background; return its pid once it accepts connections."""
        self._prepare()
        with tempfile.TemporaryFile() as err:
            # Valkey forks and the parent exits at once; the server writes the pid file.
            done = subprocess.run(
                self.command(daemonize=True),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                check=False,
            )
            if done.returncode != 0:
                err.seek(0)
                text = err.read().decode(errors="replace").strip().splitlines()
                raise ConfigError(f"the server did not start: {text[-1] if text else 'no output'}")

        def pid_of() -> int | None:
            try:
                return int(self.pid_path.read_text().strip())
            except (OSError, ValueError):
                return None  # not written yet

        def exited() -> bool:
            pid = pid_of()
            return pid is not None and not _alive(pid)

        return self._wait_ready(pid_of, exited, timeout_s)

    def run_foreground(
        self, on_ready: Callable[[int], None], timeout_s: float = READY_TIMEOUT_S
    ) -> int:
        """Run the server until SIGINT or SIGTERM; ``on_ready(pid)`` once it accepts connections.

        Returns 0 after a stop asked for by a signal; raises `ConfigError` if the
        server did not start or exited on its own.
        """
        self._prepare()
        with tempfile.TemporaryFile() as err:
            return self._supervise(err, on_ready, timeout_s)

    def _supervise(self, err: IO[bytes], on_ready: Callable[[int], None], timeout_s: float) -> int:
        """`run_foreground`'s body; the server's early stderr goes to ``err``."""
        # Its own session: Ctrl-C reaches this process only, which stops the
        # server once (SIGTERM: it flushes its append-only file and exits).
        proc = subprocess.Popen(
            self.command(daemonize=False),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            # This process SIGKILLed: the server still stops (SIGTERM: it
            # flushes its append-only file) instead of holding port and data.
            preexec_fn=ends_with_parent(),  # noqa: PLW1509 (children.py: no lock taken)
        )
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                pid = self._wait_ready(lambda: proc.pid, lambda: proc.poll() is not None, timeout_s)
            except ConfigError:
                if stopping:
                    proc.wait()
                    return 0
                err.seek(0)
                early = err.read().decode(errors="replace").strip().splitlines()
                if early:  # a bad option: said on stderr before the log is open
                    raise ConfigError(f"the server did not start: {early[-1]}") from None
                raise
            on_ready(pid)
            code = proc.wait()
            if not stopping:
                raise self._failure(f"the server exited on its own (status {code})")
            return 0
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the server of this folder and wait until it has exited; its pid."""
        pid = self.running_pid()
        if pid is None:
            raise ConfigError(
                f"no server running from {self.data_dir} (port {self.port}; "
                "pass the --port and --dir it was started with)"
            )
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ConfigError(f"the server (pid {pid}) did not stop within {timeout_s:g} s")
            time.sleep(0.02)
        return pid
