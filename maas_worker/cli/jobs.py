"""``maas-worker submit|status|cancel|result``: a producer's jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from maas_worker.cli.context import Command, Invocation, json_option, pass_invocation, tenant_option
from maas_worker.errors import ConfigError, JobError, MaasError, UnknownJob
from maas_worker.protocol import PRIORITIES
from maas_worker.settings import MAX_JOB_TTL_S

#: Seconds ``submit --wait`` and ``result`` wait for a result by default.
DEFAULT_WAIT_S = 60.0


def _client(inv: Invocation, tenant: str | None) -> Any:
    from maas_worker.client.client import Client

    settings = inv.settings_for(tenant)
    if settings.tenant is None:  # said here in the flag's words, not Client's keyword's
        raise ConfigError("no tenant: pass --tenant or set MAAS_TENANT")
    return Client(settings=settings)


def _read_input(text: str | None, input_file: str | None) -> Any:
    if input_file:
        try:
            text = Path(input_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {input_file}: {exc.strerror}") from None
    try:
        return json.loads(text or "")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--input is not valid JSON ({exc.msg} at position {exc.pos})") from None


class _SubmitCommand(Command):
    """``submit``: exactly one of --input and --input-file, and a --ttl in bounds, checked as
    the line is parsed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse, then refuse both or neither input option (argparse's words), or a bad --ttl."""
        rest = super().parse_args(ctx, args)
        given = [ctx.params.get(name) is not None for name in ("input_text", "input_file")]
        if all(given):
            raise click.UsageError("argument --input-file: not allowed with argument --input", ctx)
        if not any(given):
            raise click.UsageError("one of the arguments --input --input-file is required", ctx)
        ttl = ctx.params.get("ttl")
        if ttl is not None and not 0 < ttl <= MAX_JOB_TTL_S:
            raise click.UsageError(f"--ttl must be 1..{MAX_JOB_TTL_S} seconds", ctx)
        return rest


@click.command(cls=_SubmitCommand, short_help="submit a job")
@click.option("--model", required=True, help="the model to run (name or name@version)")
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default="normal",
    help="the job's queue (default normal)",
)
@click.option("--input", "input_text", help="the input as JSON")
@click.option("--input-file", help="a file holding the input as JSON")
@click.option("--wait", is_flag=True, help="wait and print the result as JSON")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_WAIT_S,
    help="seconds --wait waits for the result (default 60)",
)
@click.option(
    "--ttl",
    type=int,
    help=f"seconds the job may wait in the queue (1..{MAX_JOB_TTL_S}; default $MAAS_JOB_TTL_S)",
)
@tenant_option()
@pass_invocation
def submit(
    inv: Invocation,
    *,
    model: str,
    priority: str,
    input_text: str | None,
    input_file: str | None,
    wait: bool,
    timeout: float,
    ttl: int | None,
    tenant: str | None,
) -> int:
    """Submit a job; print its id, or with --wait its result as JSON.

    Exactly one of --input and --input-file gives the input.
    """
    inputs = _read_input(input_text, input_file)
    job = _client(inv, tenant).submit(model, inputs, priority=priority, ttl_s=ttl)
    idle = job.worker_live is False
    if not wait:
        if idle:
            print(f"queued; no worker is consuming right now (job {job.id})", file=sys.stderr)
        print(job.id)
        return 0
    notice = "; no worker is consuming right now" if idle else ""
    try:
        # The id at once, so that whatever happens while waiting, the job can be found.
        print(f"job {job.id} queued{notice}", file=sys.stderr, flush=True)
        output = job.result(timeout=timeout)
    except KeyboardInterrupt:
        print(_interrupted(job), file=sys.stderr)
        raise  # main() exits 130
    print(json.dumps(output))
    return 0


def _interrupted(job: Any) -> str:
    """What Ctrl-C during ``submit --wait`` leaves behind: the job, and how to stop it."""
    try:
        state = job.info().state
    except MaasError as exc:
        return f"job {job.id} was left waiting; its state is unknown now ({exc})"
    if state in ("queued", "running"):
        then = "it will run" if state == "queued" else "it will finish"
        return f"job {job.id} is still {state} ({then}; maas-worker cancel {job.id} to stop it)"
    return f"job {job.id} is {state} (maas-worker status {job.id})"


@click.command(
    cls=Command, short_help="a job's state (and the reason if it failed or was rejected)"
)
@click.argument("job_id")
@json_option('{"job_id", "state", "reason"}')
@tenant_option("the job's tenant (default: $MAAS_TENANT)")
@pass_invocation
def status(inv: Invocation, job_id: str, as_json: bool, tenant: str | None) -> int:
    """Print a job's state (and the reason if it failed or was rejected)."""
    info = _client(inv, tenant).job(job_id).info()
    if as_json:
        print(json.dumps(info.as_dict()))
    else:
        print(info.state + (f" ({info.reason})" if info.reason else ""))
    return 0


@click.command(cls=Command, short_help="cancel a queued or running job")
@click.argument("job_id")
@tenant_option("the job's tenant (default: $MAAS_TENANT)")
@pass_invocation
def cancel(inv: Invocation, job_id: str, tenant: str | None) -> int:
    """Cancel a queued or running job of the client's own tenant."""
    job = _client(inv, tenant).job(job_id)
    if not job.cancel():
        raise JobError(job_id, f"already {job.status()}; nothing to cancel")
    print(job.status())
    return 0


@click.command(cls=Command, short_help="wait for a job's result and print it as JSON")
@click.argument("job_id")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_WAIT_S,
    help="seconds to wait for the result (default 60)",
)
@tenant_option("the job's tenant (default: $MAAS_TENANT)")
@pass_invocation
def result(inv: Invocation, job_id: str, timeout: float, tenant: str | None) -> int:
    """Wait for a job's result and print it as JSON."""
    job = _client(inv, tenant).job(job_id)
    if not job.exists():  # no result will ever come: say so now, not after the timeout
        raise UnknownJob(job_id, "unknown job (never submitted, or expired)")
    print(json.dumps(job.result(timeout=timeout)))
    return 0
