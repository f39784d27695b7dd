"""A gateway process for the integration tests, and a caller that seals its own envelopes.

The caller plays a service in another language: it seals with the tenant's
root secret (docs/envelope.md), presents the bearer token derived from it
(docs/gateway.md) and talks HTTP; the gateway it talks to holds the MAC-only
keyring `keys export --mac-only` writes.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from pathlib import Path
from typing import Any

import httpx

from maas_worker.crypto.envelope import Header, now_ms, open_envelope, seal
from maas_worker.tenancy.gatekeys import GatewayKeyring, bearer_token, save_gateway_keyring
from maas_worker.tenancy.keyring import load_keyring

from .conftest import WAIT_S, Stack, wait_for
from .services import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def export_gateway_keyring(stack: Stack, path: Path | None = None) -> Path:
    """What `keys export --mac-only` writes, from the stack's keyring."""
    path = path or stack.tmp / "gateway-keyring.json"
    save_gateway_keyring(path, GatewayKeyring.from_keyring(load_keyring(stack.keyring_path)))
    return path


class GatewayProcess:
    """``maas-worker gateway`` on a free port, serving ``stack``."""

    def __init__(
        self,
        stack: Stack,
        name: str = "gateway",
        *,
        verify: ssl.SSLContext | bool = True,
        **env: str,
    ) -> None:
        self.port = free_port()
        scheme = "https" if "MAAS_GATEWAY_TLS_CERT" in env else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        #: What httpx checks the server's certificate with (a CA file for TLS tests).
        self.verify = verify
        self.keyring_path = export_gateway_keyring(stack)
        self.service = Service(
            stack,
            name,
            "gateway",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            env={"MAAS_GATEWAY_KEYRING": str(self.keyring_path), **env},
        )

        def up() -> bool:
            assert self.service.alive(), self.service.log()
            try:
                resp = httpx.get(self.url + "/healthz", timeout=2, verify=self.verify)
                return resp.status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, WAIT_S, "the gateway's /healthz")

    def stop(self) -> None:
        self.service.stop()


class Caller:
    """One tenant calling the gateway: seals, submits, polls, opens."""

    def __init__(self, stack: Stack, gateway: GatewayProcess, tenant: str = "acme") -> None:
        self.stack = stack
        self.tenant = tenant
        self.ring = load_keyring(stack.keyring_path)
        kv = self.ring.tenant(tenant).primary()
        self.kv = kv
        self.token = bearer_token(kv.secret, tenant, kv.version)
        self.http = httpx.Client(
            base_url=gateway.url,
            verify=gateway.verify,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=WAIT_S,
        )

    def seal(
        self,
        inputs: Any,
        *,
        model: str = "echo",
        priority: str = "normal",
        ttl_s: int = 300,
        job_id: str | None = None,
        tenant: str | None = None,
        issued_ms: int | None = None,
    ) -> tuple[Header, bytes]:
        """A request envelope as any language would seal it."""
        import json

        tenant = tenant or self.tenant
        kv = self.ring.tenant(tenant).primary()
        issued = now_ms() if issued_ms is None else issued_ms
        header = Header(
            "request",
            kv.version,
            issued,
            issued + ttl_s * 1000,
            priority,
            tenant,
            job_id or str(uuid.uuid4()),
            "maas.infer",
            model,
        )
        body = json.dumps(inputs, separators=(",", ":")).encode()
        return header, seal(kv.keys(tenant), header, body)

    def submit(self, raw: bytes, **headers: str) -> httpx.Response:
        return self.http.post(
            "/v1/jobs",
            content=raw,
            headers={"Content-Type": "application/octet-stream", **headers},
        )

    def open(self, sealed_b64: str, job_id: str) -> dict[str, Any]:
        import base64
        import json

        header, body = open_envelope(
            base64.b64decode(sealed_b64),
            expect="result",
            keyring=self.ring,
            max_bytes=8 * 1024 * 1024,
        )
        assert header.job_id == job_id and header.tenant == self.tenant
        doc: dict[str, Any] = json.loads(body)
        return doc
