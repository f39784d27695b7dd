"""``maas-worker server``'s pieces that need no server: paths, command line, refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from maas_worker.cli import main
from maas_worker.errors import ConfigError
from maas_worker.local.server import LOOPBACK, LocalServer, default_data_dir


def test_the_data_folder_is_per_port_under_xdg_data_home(tmp_path: Path) -> None:
    assert default_data_dir(6390, {"XDG_DATA_HOME": str(tmp_path)}) == (
        tmp_path / "maas-worker" / "server-6390"
    )
    assert default_data_dir(6379, {}) == (
        Path.home() / ".local" / "share" / "maas-worker" / "server-6379"
    )


def test_the_server_listens_on_loopback_only_and_persists(tmp_path: Path) -> None:
    argv = LocalServer(6390, tmp_path).command(daemonize=True)
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options["--bind"] == LOOPBACK == "127.0.0.1"
    assert options["--protected-mode"] == "yes"
    assert options["--appendonly"] == "yes"  # a real server's data survives a restart
    assert options["--dir"] == str(tmp_path)
    assert options["--pidfile"] == str(tmp_path / "valkey.pid")
    assert options["--daemonize"] == "yes"
    assert argv.count("--bind") == 1


@pytest.mark.parametrize("port", [0, 70000])
def test_an_invalid_port_is_refused(port: int, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid port"):
        LocalServer(port, tmp_path)


def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^port {port} is in use on 127.0.0.1 .*--port$"):
            LocalServer(port, tmp_path).start_detached()
    assert not (tmp_path / "valkey.pid").exists()


def test_a_pid_file_naming_no_server_of_this_port_is_not_running(tmp_path: Path) -> None:
    server = LocalServer(6390, tmp_path)
    assert server.running_pid() is None  # no file
    (tmp_path / "valkey.pid").write_text("garbage\n")
    assert server.running_pid() is None
    # A live process that is not a Valkey server on this port (a reused pid): never stopped.
    (tmp_path / "valkey.pid").write_text(f"{os.getpid()}\n")
    assert server.running_pid() is None
    with pytest.raises(ConfigError, match="no server running from"):
        server.stop()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "valkey.pid").write_text(f"{dead.pid}\n")
    assert server.running_pid() is None


def test_detach_and_stop_together_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["server", "--port", "6390", "--dir", str(tmp_path), "--detach", "--stop"])
    assert code == 1
    assert capsys.readouterr().err == "maas-worker: error: --detach and --stop exclude each other\n"
