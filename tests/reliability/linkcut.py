"""A TCP relay between one process and Redis that a test can cut and restore.

A partition between one worker host and Redis, without network namespaces:
the worker is given the relay's address; `LinkCut.cut` closes every
connection through it and refuses new ones (the worker sees its connections
drop and every reconnect fail), `LinkCut.restore` lets connections through
again. Everything else (other workers, clients, the test) reaches Redis
directly.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from maas_worker.local.embedded import free_port


class LinkCut:
    """Relay ``127.0.0.1:<port>`` to ``upstream_port``; `cut` and `restore` the link."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._open = True
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, name="linkcut", daemon=True).start()

    @property
    def url(self) -> str:
        """A Redis URL through the relay."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Drop every connection through the relay and refuse new ones."""
        with self._lock:
            self._open = False
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        """Let connections through again."""
        with self._lock:
            self._open = True

    def close(self) -> None:
        """Cut the link and stop listening."""
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
