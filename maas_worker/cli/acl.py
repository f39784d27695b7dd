"""``maas-worker acl``: least-privilege Redis ACL users, one per role and tenant."""

from __future__ import annotations

import argparse

import click

from maas_worker.cli.context import Command, pass_settings
from maas_worker.settings import Settings


@click.command(
    cls=Command,
    short_help="write least-privilege Redis ACL users, one per role and tenant "
    "(docs/operations.md)",
)
@click.option(
    "--acl-file", default="users.acl", help="the Redis ACL file to write (default ./users.acl)"
)
@click.option(
    "--passwords",
    default="redis-passwords",
    help="folder of the password files, one per user, kept when they exist "
    "(default ./redis-passwords)",
)
@click.option(
    "--tenant",
    multiple=True,
    help="a producer user for this tenant only (repeatable; default: every tenant in the keyring)",
)
@click.option(
    "--server",
    help="the server's URL, for the printed URLs and --apply "
    "(default: $MAAS_BROKER_URL; user and password ignored)",
)
@click.option(
    "--db",
    type=int,
    multiple=True,
    help="database number the deployment uses (repeatable; default: the server URL's)",
)
@click.option("--urls", is_flag=True, help="print the URLs with their passwords (default: ****)")
@click.option(
    "--apply",
    is_flag=True,
    help="then, as the operator: ACL LOAD on the server and load the function library",
)
@click.option(
    "--load-functions",
    is_flag=True,
    help="only load the function library, with $MAAS_BROKER_URL's user",
)
@pass_settings
def acl(
    settings: Settings,
    *,
    acl_file: str,
    passwords: str,
    tenant: tuple[str, ...],
    server: str | None,
    db: tuple[int, ...],
    urls: bool,
    apply: bool,
    load_functions: bool,
) -> int:
    """Write least-privilege Redis ACL users, one per role and tenant, and print their URLs."""
    from maas_worker.tenancy import acl as acl_files

    # acl.run reads argparse's attribute names; repeatable options not given are None there.
    args = argparse.Namespace(
        acl_file=acl_file,
        passwords=passwords,
        tenant=list(tenant) or None,
        server=server,
        db=list(db) or None,
        urls=urls,
        apply=apply,
        load_functions=load_functions,
    )
    return acl_files.run(args, settings)
