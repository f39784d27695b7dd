"""What every ``maas-worker`` command shares: the invocation's settings and its options.

The group's global flags (``--broker-url``, ``--keyring``) and the environment
make one `Settings`, built on first use by `Invocation.settings` and handed to
the commands through click's ``ctx.obj``. The CLI never writes its own
``os.environ``: a command that runs Celery's processes hands the flags to them
in an explicit environment (`Invocation.exec_with_flags`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import click

from maas_worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")

#: ``-h`` as well as ``--help``, as the argparse command line took.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def spell_out_prefixes(command: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with each long option given by a unique prefix spelled out in full.

    argparse took ``--conc 4`` for ``--concurrency 4`` and scripts may rely on
    it; click does not. A group only looks at its own options, before the
    subcommand's name; ``--`` ends the options.
    """
    longs = {
        name: param
        for param in command.get_params(ctx)
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    }
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or (isinstance(command, click.Group) and not arg.startswith("-")):
            out.extend(args[i:])  # the rest: operands, or the subcommand and its arguments
            break
        i += 1
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        matches = [n for n in longs if n.startswith(name)]
        if name not in longs and len(matches) == 1:
            name = matches[0]
        elif name not in longs and matches:
            raise click.UsageError(
                f"ambiguous option: {name} could match {', '.join(matches)}", ctx
            )
        out.append(name + eq + value)
        option = longs.get(name)
        if option is not None and not option.is_flag and not eq and i < len(args):
            out.append(args[i])  # the option's value, whatever it looks like
            i += 1
    return out


class Command(click.Command):
    """A command that takes a unique prefix of a long option, as argparse did."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse ``args`` once abbreviated long options are spelled out."""
        return super().parse_args(ctx, spell_out_prefixes(self, ctx, args))


class Group(click.Group):
    """A command group that lists its commands in the order they were added and takes a
    unique prefix of a long option, as argparse did."""

    command_class = Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse the group's own options once abbreviated ones are spelled out."""
        return super().parse_args(ctx, spell_out_prefixes(self, ctx, args))

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands, in the order they were added."""
        return list(self.commands)


@dataclasses.dataclass
class Invocation:
    """One run of the command line: its arguments and global flags (``ctx.obj``)."""

    #: The whole command line after the program name (exec'd again as it is).
    argv: tuple[str, ...] = ()
    broker_url: str | None = None
    keyring: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The global flags as `Settings` fields (an empty flag is not given)."""
        out: dict[str, Any] = {}
        if self.broker_url:
            out["broker_url"] = self.broker_url
        if self.keyring:
            out["keyring_path"] = Path(self.keyring)
        return out

    @cached_property
    def settings(self) -> Settings:
        """The environment plus the global flags, read once, when a command first needs them.

        Built lazily so a usage error or ``--help`` is answered before an invalid
        ``MAAS_*`` variable is reported, and commands that read no settings
        (``demo``) never fail on one.
        """
        return Settings.from_env(os.environ, **self.overrides())

    def settings_for(self, tenant: str | None) -> Settings:
        """`settings` with a command's ``--tenant`` (when given) in place of ``$MAAS_TENANT``."""
        if tenant is None:
            return self.settings
        return dataclasses.replace(self.settings, tenant=tenant)

    def child_env(self) -> dict[str, str]:
        """The environment of a process this command starts: ours with the flags in it."""
        env = dict(os.environ)
        if self.broker_url:
            env["MAAS_BROKER_URL"] = self.broker_url
        if self.keyring:
            env["MAAS_KEYRING"] = self.keyring
        return env

    def exec_with_flags(self) -> None:
        """Run this command line again in this process, in an environment carrying the flags.

        Celery's worker, beat and Flower (their modules, pool children and
        batch consumers) read the ``MAAS_*`` variables themselves; a global
        flag reaches them that way. Returns only when the environment already
        carries them (no flag, or this is the process exec'd with them).
        """
        env = self.child_env()
        if env == dict(os.environ):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # The same interpreter and package, not a shell: the argv is passed as it came.
        os.execve(sys.executable, [sys.executable, "-m", "maas_worker", *self.argv], env)  # noqa: S606


def invocation() -> Invocation:
    """The current command line's `Invocation` (the group puts it on the root context)."""
    obj = click.get_current_context().find_object(Invocation)
    if obj is None:  # a command invoked outside the maas-worker group
        raise RuntimeError("no maas-worker invocation in the click context")
    return obj


def pass_settings(f: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
    """Call the command with the invocation's `Settings` as its first argument."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return f(invocation().settings, *args, **kwargs)

    return wrapper


def pass_invocation(f: Callable[Concatenate[Invocation, P], R]) -> Callable[P, R]:
    """Call the command with the `Invocation` as its first argument."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return f(invocation(), *args, **kwargs)

    return wrapper


def json_option(help_text: str) -> Callable[[F], F]:
    """``--json``: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def tenant_option(help_text: str = "tenant (default: $MAAS_TENANT)") -> Callable[[F], F]:
    """``--tenant``: the tenant a producer command acts as."""
    return click.option("--tenant", help=help_text)
