"""``maas-worker worker|batch-consumer|beat|flower|ping|demo``: the long-running processes.

Celery's worker, beat and Flower read ``MAAS_*`` variables in their own
modules and child processes, so a global flag reaches them through the
environment of a fresh process image (`Invocation.exec_with_flags`), never by
this process writing its own ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import click

from maas_worker.cli.context import Command, Invocation, pass_invocation
from maas_worker.errors import ConfigError, connection_cause
from maas_worker.settings import redact_url

FLOWER_TASK_COLUMNS = "name,uuid,state,exception,args,result,received,runtime,worker"
#: Flower's listening port and address by default.
DEFAULT_FLOWER_PORT = 5555
DEFAULT_FLOWER_ADDRESS = "127.0.0.1"
#: Seconds ``ping`` waits for the node's answer by default.
DEFAULT_PING_TIMEOUT_S = 5.0

LOGLEVEL_HELP = "Celery's log level (default INFO)"


_loglevel = click.option("--loglevel", default="INFO", help=LOGLEVEL_HELP)


#: Options of Celery's pool: they choose the Celery-task mode (`worker_mode`).
POOL_OPTIONS = ("--autoscale", "--pool")


def worker_mode(
    settings_mode: str, *, batch_consumer: bool, celery_tasks: bool, pool_options: Sequence[str]
) -> str:
    """The mode ``maas-worker worker`` runs: ``"batch-consumer"`` or ``"celery-tasks"``.

    A mode flag decides; else a pool option (``--autoscale``, ``--pool``: only
    Celery's pool has them) means Celery tasks, so ``worker --autoscale MAX,MIN``
    keeps the meaning it has always had; else ``$MAAS_WORKER_MODE`` (default
    batch consumer). ``pool_options``: the pool options given. A pool option with
    ``--batch-consumer`` is a `ConfigError`, as are both mode flags.
    """
    if batch_consumer and celery_tasks:
        raise ConfigError("--batch-consumer and --celery-tasks exclude each other")
    if batch_consumer and pool_options:
        what = "is an option" if len(pool_options) == 1 else "are options"
        raise ConfigError(
            f"{' and '.join(pool_options)} {what} of Celery's pool (--celery-tasks), "
            "not of --batch-consumer: it runs --concurrency processes"
        )
    if batch_consumer:
        return "batch-consumer"
    if celery_tasks or pool_options:
        return "celery-tasks"
    return settings_mode


@click.command(cls=Command, short_help="run a worker node (batch consumers by default)")
@click.option(
    "--concurrency",
    type=int,
    help="batch consumer processes, or with --celery-tasks pool processes (threads with "
    "--pool threads); default: the number of CPUs",
)
@click.option(
    "--celery-tasks",
    is_flag=True,
    help="run one Celery task per job in Celery's pool instead of the batch consumers "
    "(also MAAS_WORKER_MODE=celery-tasks; implied by --autoscale and --pool)",
)
@click.option(
    "--batch-consumer",
    is_flag=True,
    help="batch consumer processes take the jobs: the default, so a no-op kept for existing "
    "command lines, except that it overrides MAAS_WORKER_MODE",
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="grow and shrink Celery's pool between MIN and MAX processes (implies --celery-tasks)",
)
@click.option(
    "--shards",
    metavar="LIST",
    help="the queue shards this node consumes, e.g. 0,2-3 (default: MAAS_WORKER_SHARDS, "
    "else all of MAAS_QUEUE_SHARDS); --celery-tasks: exactly one",
)
@click.option("--hostname", "-n", help="node name (default celery@HOST)")
# "threads" is for dynamic batching (MAAS_BATCH): there a running job
# cannot be interrupted, only failed at its soft limit (docs/compute.md).
@click.option(
    "--pool",
    type=click.Choice(("prefork", "solo", "threads")),
    help="Celery's pool (default prefork; threads for dynamic batching, MAAS_BATCH; "
    "implies --celery-tasks)",
)
@_loglevel
@pass_invocation
def worker(
    inv: Invocation,
    *,
    concurrency: int | None,
    celery_tasks: bool,
    batch_consumer: bool,
    autoscale: str | None,
    shards: str | None,
    hostname: str | None,
    pool: str | None,
    loglevel: str,
) -> int:
    """Run a worker node on the job queues (high, then normal, then low).

    By default batch consumer processes take the jobs, many per Redis round
    trip and per model call, each still checked, sealed, audited and
    acknowledged on its own; the Celery worker keeps the node's identity
    (ping, remote control, Flower, resource samples). With --celery-tasks
    (or MAAS_WORKER_MODE=celery-tasks) each job is one Celery task in
    Celery's pool instead (docs/operations.md, "Worker modes").
    """
    inv.exec_with_flags()
    if shards:
        # Read by this node's settings and by its consumer processes and pool children.
        os.environ["MAAS_WORKER_SHARDS"] = shards
    given = {"--autoscale": autoscale, "--pool": pool}
    pool_options = [name for name in POOL_OPTIONS if given[name]]
    settings = inv.settings
    mode = worker_mode(
        settings.worker_mode,
        batch_consumer=batch_consumer,
        celery_tasks=celery_tasks,
        pool_options=pool_options,
    )
    from maas_worker.app import app, configure
    from maas_worker.broker import shards as shard_rules
    from maas_worker.protocol import QUEUE_NAMES
    from maas_worker.tenancy.keyring import load_keyring

    consumed = shard_rules.consumed(settings)
    if mode == "celery-tasks" and len(consumed) != 1:
        # One Celery app has one broker connection, under one shard's key prefix.
        raise ConfigError(
            f"a --celery-tasks worker consumes exactly one queue shard, not {len(consumed)} "
            f"(MAAS_QUEUE_SHARDS={settings.redis_ha.queue_shards}): name one with --shards"
        )
    procs = concurrency or os.cpu_count() or 1
    if mode == "batch-consumer" and procs < len(consumed):
        raise ConfigError(
            f"{procs} batch consumer process(es) cannot consume {len(consumed)} queue shards: "
            "give --concurrency at least the number of shards (or fewer --shards)"
        )

    load_keyring(settings.keyring_path)  # refuse to start without a usable keyring
    from maas_worker.models.signing import TrustedSigners

    TrustedSigners.from_paths(settings.trusted_signers)  # ... or without its model signers
    # Credentials Redis refuses stop the worker itself (worker/node.py), under
    # `celery -A maas_worker.app worker` too.
    configure(app, settings)
    argv = ["worker", "-Q", ",".join(QUEUE_NAMES), "--loglevel", loglevel]
    if mode == "batch-consumer":
        # The job queues go to batch consumer processes (supervisor.py); the
        # Celery worker keeps remote control and the broadcast queue, and runs
        # the resource samples in its own process.
        from maas_worker.protocol import MONITOR_EXCHANGE
        from maas_worker.worker.batch import supervisor

        supervisor.configure(app, processes=procs, loglevel=loglevel)
        argv = ["worker", "-Q", MONITOR_EXCHANGE, "--pool", "solo", "--loglevel", loglevel]
    elif concurrency:
        argv += ["--concurrency", str(concurrency)]
    if autoscale:
        argv += ["--autoscale", autoscale]
    if pool:
        argv += ["--pool", pool]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv)
    return 0


@click.command("batch-consumer", cls=Command, hidden=True)
@click.option("--name", default="consumer", help="this consumer's name in logs and metrics")
@click.option(
    "--ready-fd", type=int, help="file descriptor to write to once ready (set by the supervisor)"
)
@click.option(
    "--siblings",
    type=click.IntRange(min=1),
    default=1,
    help="the node's consumer processes, this one included (they share the idle polling)",
)
@click.option("--shard", type=click.IntRange(min=0), default=0, help="the queue shard it consumes")
@_loglevel
@pass_invocation
def batch_consumer(
    inv: Invocation, *, name: str, ready_fd: int | None, siblings: int, shard: int, loglevel: str
) -> int:
    """One batch consumer process (started by ``worker``'s batch consumer mode)."""
    inv.exec_with_flags()
    from maas_worker.worker.batch.consumer import serve

    return serve(name=name, loglevel=loglevel, ready_fd=ready_fd, siblings=siblings, shard=shard)


@click.command(cls=Command, short_help="run Celery beat (exactly one per deployment)")
@_loglevel
@pass_invocation
def beat(inv: Invocation, loglevel: str) -> int:
    """Run Celery beat: the resource-sample schedule (exactly one per deployment)."""
    inv.exec_with_flags()
    from maas_worker.app import app, configure

    configure(app, inv.settings)
    app.start(["beat", "--loglevel", loglevel])
    return 0


#: Flower options ``maas-worker flower`` sets itself, and where they come from instead.
OWN_FLOWER_OPTIONS = {"basic-auth": "MAAS_FLOWER_BASIC_AUTH"}


def flower_options(args: Sequence[str]) -> list[str]:
    """Flower's own options given after ours, checked and in the ``--name=value`` form Flower takes.

    Flower reads its options with tornado, which silently drops arguments it
    does not know and fails with a traceback on ``--name value``: here an
    unknown option, a missing or bad value, or a stray argument is one usage
    error instead, and ``--name value`` is joined into ``--name=value``.
    """
    import copy
    import importlib

    from tornado.options import options as registry

    importlib.import_module("flower.options")  # defines Flower's options in tornado's registry

    out: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name == "--":
            raise click.UsageError(
                f"unexpected argument {arg!r}: Flower's options are --name=value",
                click.get_current_context(silent=True),
            )
        key = name[2:].replace("_", "-")  # tornado's spelling of an option's name
        option = registry._options.get(key)  # tornado keeps no public lookup with the type
        if option is None or key == "help":
            raise click.UsageError(
                f"no such Flower option: {name}",
                click.get_current_context(silent=True),
            )
        if key in OWN_FLOWER_OPTIONS:
            raise click.UsageError(
                f"{name} is set from {OWN_FLOWER_OPTIONS[key]}, not on the command line",
                click.get_current_context(silent=True),
            )
        if not eq and option.type is not bool:
            if not rest:
                raise click.UsageError(
                    f"Flower option {name} requires a value",
                    click.get_current_context(silent=True),
                )
            value = rest.pop(0)
        if eq or option.type is not bool:
            try:
                copy.copy(option).parse(value)  # a copy: the registry is Flower's to fill
            except Exception:  # tornado raises ValueError or its own Error
                raise click.UsageError(
                    f"invalid value for Flower option {name}: {value!r}",
                    click.get_current_context(silent=True),
                ) from None
            out.append(f"{name}={value}")
        else:
            out.append(name)
    return out


def flower_argv(
    *, port: int, address: str, basic_auth: str | None, extra: Sequence[str] = ()
) -> list[str]:
    """The command line handed to Flower: ours first, then ``extra`` (from `flower_options`)."""
    # A job's state and exception (its outcome and reason words) next to its
    # arguments and result, which show only "<sealed envelope>" and None.
    argv = [
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--tasks_columns={FLOWER_TASK_COLUMNS}",
    ]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    return [*argv, *extra]


@click.command(
    cls=Command,
    short_help="run Flower (authentication required)",
    context_settings={"ignore_unknown_options": True},
)
@click.option(
    "--port",
    type=int,
    default=DEFAULT_FLOWER_PORT,
    help="the port Flower listens on (default 5555)",
)
@click.option(
    "--address",
    default=DEFAULT_FLOWER_ADDRESS,
    help="the address Flower listens on (default 127.0.0.1)",
)
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="allow Flower without authentication (local debugging only)",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED, metavar="[FLOWER_OPTIONS]...")
@pass_invocation
def flower(
    inv: Invocation, port: int, address: str, unauthenticated: bool, flower_args: tuple[str, ...]
) -> int:
    """Run Flower, the monitoring web UI, behind $MAAS_FLOWER_BASIC_AUTH.

    Any further option is Flower's own and goes to Flower as given, e.g.
    --max_tasks=5000 --url_prefix=flower (the list: Flower's documentation,
    https://flower.readthedocs.io/en/latest/config.html).
    """
    inv.exec_with_flags()
    extra = flower_options(flower_args)  # a bad command line first, then the settings
    from celery import Celery

    from maas_worker.app import celery_config
    from maas_worker.monitoring import flowerbroker
    from maas_worker.worker import control

    settings = inv.settings
    auth = settings.flower_basic_auth
    argv = flower_argv(port=port, address=address, basic_auth=auth, extra=extra)
    if not auth and not unauthenticated:
        raise ConfigError(
            "refusing to start Flower without authentication: set "
            "MAAS_FLOWER_BASIC_AUTH=user:password (or pass --unauthenticated)"
        )
    # Flower's own app, without the worker's modules (Flower imports an app's
    # modules, and the worker's install its transport, which takes with Lua),
    # and no expiry on its event and reply queues (kombu keeps expiring ones
    # with Lua): the flower Redis role runs no Lua and writes no queue
    # (acl.py). Nor does it sweep reserved messages back into the queues: it
    # reserves none (replies are taken unacknowledged), workers sweep.
    from kombu.transport import redis as kombu_redis

    kombu_redis.QoS.restore_visible = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    app = Celery("maas_worker")
    app.conf.update(celery_config(settings), control_queue_expires=None, event_queue_expires=None)
    if auth:
        _authenticate_flower_metrics()
    # Its buttons (shut down, pool, consumers, rate limits, revoke) do what the
    # workers would allow, no more.
    control.lock_flower(settings.remote_control)
    # Its Broker page counts the jobs in the tenants' lists too (fair share).
    flowerbroker.install(settings)
    _stop_flower_cleanly_on_sigterm()
    app.start(argv)
    return 0


def _stop_flower_cleanly_on_sigterm() -> None:
    """Make SIGTERM stop Flower's event loop instead of raising SystemExit where it lands.

    Flower's handler calls ``sys.exit``: when the signal arrives while Python
    runs a weakref callback or a ``__del__`` (its event thread makes many),
    the SystemExit is swallowed ("Exception ignored in ...", a traceback in
    the log) and Flower serves on until it is killed. Stopping the loop from
    the loop ends ``Flower.start``; its ``atexit`` hook stops the rest.
    """
    import logging

    import flower.command  # type: ignore[import-untyped]
    from tornado.ioloop import IOLoop

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("flower.command").info("%s detected, shutting down", signum)
        loop = IOLoop.current()
        loop.add_callback(loop.stop)  # thread- and signal-safe: a write to the loop's waker

    # Flower installs the handler by this module-level name when it starts.
    flower.command.sigterm_handler = stop


def _authenticate_flower_metrics() -> None:
    """Make Flower's own ``/metrics`` ask for the credentials every other page asks for.

    Flower serves it without authentication (worker and task names, event
    counts); its ``/healthcheck`` stays open for container health checks.
    """
    import tornado.web
    from flower.views.monitor import Metrics  # type: ignore[import-untyped]

    if not getattr(Metrics.get, "maas_authenticated", False):
        guarded = tornado.web.authenticated(Metrics.get)
        guarded.maas_authenticated = True  # type: ignore[attr-defined]
        Metrics.get = guarded


@click.command(cls=Command, short_help="check that a worker node answers (exit 1 if not)")
@click.option("--node", help="worker node name (default: celery@<this host>)")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_PING_TIMEOUT_S,
    help="seconds to wait for the answer (default 5)",
)
@pass_invocation
def ping(inv: Invocation, node: str | None, timeout: float) -> int:
    """Ask one worker node to answer through the broker (a container's HEALTHCHECK)."""
    from celery.utils.nodenames import default_nodename
    from kombu.exceptions import OperationalError

    from maas_worker.app import app, configure
    from maas_worker.errors import ServiceUnavailable

    settings = inv.settings
    configure(app, settings)
    node = node or default_nodename(None)  # the worker's default: celery@<this host>
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    except OperationalError as exc:
        raise ServiceUnavailable(
            f"broker unavailable ({redact_url(settings.broker_url)}: {connection_cause(exc)})"
        ) from None
    if not any(node in reply for reply in replies or ()):
        raise ServiceUnavailable(f"worker {node} did not answer within {timeout:g} s")
    print(f"{node}: pong")
    return 0


@click.command(cls=Command, short_help="run the whole system locally and exit")
@click.option("--jobs", type=int, default=2, help="echo jobs per priority")
def demo(jobs: int) -> int:
    """Run the whole system locally (embedded Valkey, a worker, every priority) and exit."""
    from maas_worker.local.demo import run_demo

    return run_demo(jobs_per_priority=jobs)
