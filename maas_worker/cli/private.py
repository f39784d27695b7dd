"""``maas-worker private keygen|submit``: private inference (docs/private-inference.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from maas_worker.cli.context import Group, Invocation, pass_invocation, tenant_option
from maas_worker.cli.jobs import DEFAULT_WAIT_S, _client, _read_input
from maas_worker.errors import ConfigError


@click.group(cls=Group, no_args_is_help=False, short_help="private inference (CKKS)")
def private() -> None:
    """Private inference: models run on inputs encrypted under the tenant's own CKKS key."""


@private.command(short_help="create (or with --rotate, replace) the tenant's CKKS key")
@click.option("--rotate", is_flag=True, help="replace an existing key (old results stay sealed)")
@tenant_option()
@pass_invocation
def keygen(inv: Invocation, rotate: bool, tenant: str | None) -> int:
    """Create the tenant's CKKS key in $MAAS_PRIVATE_KEY_DIR and print its context digest.

    The secret key stays in that folder (mode 0600); jobs register the public context.
    """
    from maas_worker.private.ckks import SECRET_SUFFIX, SecretContext

    client = _client(inv, tenant)
    settings, name = client.settings, client.tenant
    folder: Path = settings.private_key_dir
    if (folder / f"{name}{SECRET_SUFFIX}").exists() and not rotate:
        raise ConfigError(
            f"tenant {name!r} already has a CKKS key in {folder} (--rotate replaces it)"
        )
    key = SecretContext.generate()
    # Recorded with the envelope key version it follows: the next rotation of the
    # envelope keys makes the client generate a new one (client/private.py).
    key.save(folder, name, envelope_version=client.envelope_version())
    n, bits = key.parameters
    print(f"{key.digest}  N={n} modulus={bits} bits  public context {len(key.public_bytes)} bytes")
    return 0


@private.command(short_help="run a model on encrypted vectors; print the decrypted result")
@click.option("--model", required=True, help="a model with private evaluation (digits-he)")
@click.option("--input", "input_text", help='the vectors as JSON: [[...], ...] or {"inputs": ...}')
@click.option("--input-file", help="a file holding the vectors as JSON")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_WAIT_S,
    help="seconds to wait for each job (default 60)",
)
@tenant_option()
@pass_invocation
def submit(
    inv: Invocation,
    *,
    model: str,
    input_text: str | None,
    input_file: str | None,
    timeout: float,
    tenant: str | None,
) -> int:
    """Encrypt each vector, submit one job each, wait, decrypt; print the result as JSON."""
    if (input_text is None) == (input_file is None):
        raise click.UsageError("exactly one of --input and --input-file is required")
    doc: Any = _read_input(input_text, input_file)
    vectors = doc.get("inputs") if isinstance(doc, dict) else doc
    if not isinstance(vectors, list):
        raise ConfigError('--input must be a list of vectors or {"inputs": [...]}')
    try:
        result = _client(inv, tenant).submit_private(model, vectors, timeout=timeout)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(result))
    return 0
