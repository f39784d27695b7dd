"""``maas-worker gateway``: the HTTP gateway (docs/gateway.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from maas_worker.cli.context import Command, pass_settings
from maas_worker.errors import ConfigError
from maas_worker.settings import Settings


@click.command(cls=Command, short_help="serve the HTTP gateway (submit from any language)")
@click.option("--address", help="default $MAAS_GATEWAY_ADDRESS or 127.0.0.1")
@click.option("--port", type=int, help="default $MAAS_GATEWAY_PORT or 9550")
@click.option("--gateway-keyring", "keyring", metavar="PATH", help="default $MAAS_GATEWAY_KEYRING")
@click.option("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
@click.option("--tls-key", metavar="PEM", help="the certificate's private key")
@click.option("--log-level", default="info", help="uvicorn's log level (default info)")
@pass_settings
def gateway(  # noqa: PLR0917 (click passes options by position)
    settings: Settings,
    address: str | None,
    port: int | None,
    keyring: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    log_level: str,
) -> int:
    """Serve the HTTP gateway: POST /v1/jobs takes envelopes sealed by the caller.

    It holds MAC keys only (`keys export --mac-only`): it authenticates jobs
    and can never read them. Needs the `gateway` extra (Starlette, uvicorn).
    """
    try:
        from maas_worker.gateway import run
    except ImportError as exc:
        raise ConfigError(
            f"the gateway needs its extra: pip install 'maas-worker[gateway]' ({exc.name} missing)"
        ) from None
    given: dict[str, Any] = {
        "address": address,
        "port": port,
        "keyring_path": Path(keyring) if keyring else None,
        "tls_cert": Path(tls_cert) if tls_cert else None,
        "tls_key": Path(tls_key) if tls_key else None,
    }
    g = replace(settings.gateway, **{k: v for k, v in given.items() if v is not None})
    from maas_worker.tenancy.gatekeys import load_gateway_keyring

    load_gateway_keyring(g.keyring_path)  # a missing or unsafe keyring: one line, before serving
    run(replace(settings, gateway=g), log_level=log_level)
    return 0
