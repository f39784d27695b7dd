"""``maas-worker keys init|policy|rotate|promote|retire|list|export``: tenant keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from maas_worker.cli.context import Group, json_option, pass_settings
from maas_worker.protocol import MAX_TENANT_WEIGHT, PRIORITIES
from maas_worker.settings import Settings

TENANT_HELP = "the tenant (a lowercase name)"


@click.group(cls=Group, no_args_is_help=False, short_help="manage tenant keys")
def keys() -> None:
    """Manage tenant keys."""


@keys.command(short_help="create a tenant with a fresh primary key")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--allow-models", help="comma-separated models the tenant may use (default all)")
@click.option(
    "--max-priority",
    type=click.Choice(PRIORITIES),
    default="high",
    help="the highest priority the tenant may submit at (default high)",
)
@click.option(
    "--allow-signers",
    help="comma-separated key ids of the model signers "
    "whose models the tenant may run (default: every trusted signer)",
)
@pass_settings
def init(
    settings: Settings,
    tenant: str,
    allow_models: str | None,
    max_priority: str,
    allow_signers: str | None,
) -> int:
    """Create a tenant with a fresh primary key."""
    from maas_worker.tenancy.keyring import TenantPolicy, edit_keyring

    path = settings.keyring_path
    policy = TenantPolicy(
        tuple(m for m in allow_models.split(",") if m) if allow_models else None, max_priority
    )
    if allow_signers:
        policy = TenantPolicy.from_json(
            {**policy.to_json(), "allowed_signers": [s for s in allow_signers.split(",") if s]}
        )
    with edit_keyring(path, create=True) as editor:
        editor.ring = editor.ring.with_new_tenant(tenant, policy)
    print(f"tenant {tenant}: key version 1 is primary ({path})")
    return 0


@keys.command(short_help="show or change a tenant's policy and quotas")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--allow-models", help="comma-separated models, or * for all")
@click.option(
    "--max-priority",
    type=click.Choice(PRIORITIES),
    help="the highest priority the tenant may submit at",
)
@click.option("--rate", type=float, help="jobs per second (0 = unlimited)")
@click.option("--burst", type=int, help="jobs allowed in one burst")
@click.option("--max-in-flight", type=int, help="jobs queued or running at once (0 = no cap)")
@click.option(
    "--allow-signers", help="comma-separated model signer key ids, or * for every trusted signer"
)
@click.option(
    "--weight",
    type=click.IntRange(1, MAX_TENANT_WEIGHT),
    help="fair share: jobs taken per turn while other tenants wait too (default 1)",
)
@pass_settings
def policy(
    settings: Settings,
    *,
    tenant: str,
    allow_models: str | None,
    max_priority: str | None,
    rate: float | None,
    burst: int | None,
    max_in_flight: int | None,
    allow_signers: str | None,
    weight: int | None,
) -> int:
    """Show or change a tenant's policy and quotas (options not given stay as they are)."""
    from maas_worker.tenancy.keyring import TenantPolicy, edit_keyring

    with edit_keyring(settings.keyring_path) as editor:
        current = editor.ring.tenant(tenant).policy
        models = current.allowed_models
        if allow_models is not None:
            models = (
                tuple(m for m in allow_models.split(",") if m)
                if allow_models not in ("", "*")
                else None
            )
        updated = dataclasses.replace(
            current,
            allowed_models=models,
            max_priority=max_priority or current.max_priority,
            rate_per_s=current.rate_per_s if rate is None else rate,
            burst=current.burst if burst is None else burst,
            max_in_flight=current.max_in_flight if max_in_flight is None else max_in_flight,
            weight=current.weight if weight is None else weight,
        )
        if allow_signers is not None:
            ids = None if allow_signers in ("", "*") else [s for s in allow_signers.split(",") if s]
            updated = dataclasses.replace(
                updated,
                allowed_signers=TenantPolicy.from_json({"allowed_signers": ids}).allowed_signers,
            )  # validates the ids
        editor.ring = editor.ring.with_policy(tenant, updated)
    print(f"tenant {tenant}: {json.dumps(updated.to_json())}")
    return 0


@keys.command(short_help="add a new key version and make it primary")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--stage", is_flag=True, help="add it decrypt-only (step 1 of a multi-host rotation)")
@pass_settings
def rotate(settings: Settings, tenant: str, stage: bool) -> int:
    """Add a new key version and make it primary (or, with --stage, decrypt-only)."""
    from maas_worker.tenancy.keyring import edit_keyring

    with edit_keyring(settings.keyring_path) as editor:
        editor.ring, version = editor.ring.with_rotation(tenant, stage=stage)
    what = "decrypt-only (promote it once every host has it)" if stage else "primary"
    print(f"tenant {tenant}: key version {version} is {what}")
    return 0


def _set_state(settings: Settings, tenant: str, version: int, state: str, *, force: bool) -> int:
    from maas_worker.errors import KeyringError
    from maas_worker.tenancy.keyring import Keyring, KeyState, edit_keyring

    def has_primary(ring: Keyring) -> bool:
        return any(kv.state == "primary" for kv in ring.tenant(tenant).versions)

    new_state: KeyState = "primary" if state == "primary" else "retired"
    with edit_keyring(settings.keyring_path) as editor:
        ring = editor.ring.with_state(tenant, version, new_state)
        # A tenant without a primary cannot seal a job: every client's submit fails.
        if not force and has_primary(editor.ring) and not has_primary(ring):
            raise KeyringError(
                f"would leave tenant {tenant!r} with no primary key: every submit would fail; "
                f"rotate first (maas-worker keys rotate --tenant {tenant}) or pass --force"
            )
        editor.ring = ring
    print(f"tenant {tenant}: key version {version} is {new_state}")
    return 0


@keys.command(short_help="make a version primary")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--version", type=int, required=True, help="the key version to make primary")
@pass_settings
def promote(settings: Settings, tenant: str, version: int) -> int:
    """Make a key version primary (new jobs are sealed with it)."""
    return _set_state(settings, tenant, version, "primary", force=False)


@keys.command(short_help="retire a version")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--version", type=int, required=True, help="the key version to retire")
@click.option(
    "--force",
    is_flag=True,
    help="retire it even if it is the tenant's primary (every submit then fails until a rotate)",
)
@pass_settings
def retire(settings: Settings, tenant: str, version: int, force: bool) -> int:
    """Retire a key version (jobs sealed with it are refused from then on).

    The tenant's primary is retired only with --force: rotate first.
    """
    return _set_state(settings, tenant, version, "retired", force=force)


@keys.command("list", short_help="tenants, versions and states (never secrets)")
@json_option('one JSON document instead of a table: {"tenants": [{"tenant", "versions"}]}')
@pass_settings
def list_keys(settings: Settings, as_json: bool) -> int:
    """Tenants, key versions and their states (never secrets)."""
    from maas_worker.tenancy.keyring import load_keyring

    rows = load_keyring(settings.keyring_path).summary()
    if as_json:
        tenants: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            tenants.setdefault(row["tenant"], []).append(
                {k: v for k, v in row.items() if k != "tenant"}
            )
        doc = [{"tenant": name, "versions": versions} for name, versions in tenants.items()]
        print(json.dumps({"tenants": doc}))
    else:
        print(f"{'TENANT':<24} {'VERSION':>7}  {'STATE':<13} CREATED")
        for row in rows:
            print(
                f"{row['tenant']:<24} {row['version']:>7}  {row['state']:<13} {row['created_at']}"
            )
    return 0


@keys.command(short_help="write a keyring holding one tenant (for its clients), or a gateway's")
@click.option("--tenant", help="the tenant to export (with --mac-only: default every tenant)")
@click.option(
    "--out",
    required=True,
    help="the keyring file to write (mode 0600; a missing folder is created, mode 0700)",
)
@click.option("--force", is_flag=True, help="replace the file if it exists")
@click.option(
    "--mac-only",
    is_flag=True,
    help="a gateway keyring: MAC keys and bearer-token hashes, no key that decrypts "
    "(docs/gateway.md)",
)
@pass_settings
def export(settings: Settings, tenant: str | None, out: str, force: bool, mac_only: bool) -> int:
    """Write a keyring holding one tenant's keys (for that tenant's clients).

    With --mac-only, write the keyring of `maas-worker gateway` instead: each
    tenant's MAC keys and the hash of its bearer token, nothing that opens an
    envelope. An existing file is replaced only with --force (after a rotation, say).
    """
    from maas_worker.errors import KeyringError
    from maas_worker.tenancy.gatekeys import GatewayKeyring, save_gateway_keyring
    from maas_worker.tenancy.keyring import load_keyring, save_keyring

    if tenant is None and not mac_only:
        raise KeyringError("--tenant is required (only --mac-only exports every tenant)")
    ring = load_keyring(settings.keyring_path)
    if tenant is not None:
        ring = ring.only(tenant)
    path = Path(out)
    if path.is_dir():
        raise KeyringError(f"{out} is a directory: --out names the keyring file to write")
    if not force and (path.exists() or path.is_symlink()):
        raise KeyringError(f"{out} already exists: pass --force to replace it")
    try:
        if mac_only:
            save_gateway_keyring(path, GatewayKeyring.from_keyring(ring))
        else:
            save_keyring(path, ring)
    except OSError as exc:
        raise KeyringError(f"cannot write {out}: {exc.strerror}") from None
    what = f"tenant {tenant} only" if tenant else "every tenant"
    kind = "gateway keyring (MAC keys only)" if mac_only else "keyring"
    print(f"wrote {out}: {kind} with {what} (mode 0600)")
    return 0


@keys.command(short_help="write a tenant's gateway bearer token to a file")
@click.option("--tenant", required=True, help="the tenant")
@click.option("--out", required=True, help="the file to write (mode 0600)")
@click.option("--force", is_flag=True, help="replace the file if it exists")
@pass_settings
def bearer(settings: Settings, tenant: str, out: str, force: bool) -> int:
    """Write the bearer token ``tenant`` presents to the gateway (its primary key version's).

    The token is derived from the tenant's root secret (docs/gateway.md), so a
    client holding the tenant's keyring can derive it itself; this writes it for
    tools such as curl.
    """
    from maas_worker.errors import KeyringError
    from maas_worker.files import write_atomic
    from maas_worker.tenancy.gatekeys import bearer_token
    from maas_worker.tenancy.keyring import load_keyring

    kv = load_keyring(settings.keyring_path).tenant(tenant).primary()
    path = Path(out)
    if not force and (path.exists() or path.is_symlink()):
        raise KeyringError(f"{out} already exists: pass --force to replace it")
    write_atomic(path, bearer_token(kv.secret, tenant, kv.version).encode(), private=True)
    print(f"wrote {out}: the bearer token of tenant {tenant}, key version {kv.version} (mode 0600)")
    return 0
