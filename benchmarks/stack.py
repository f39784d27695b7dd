"""The benchmark stack's common setup: its environment, a one-worker stack, CPU readings.

Not a benchmark. Imported by the scripts in this folder as ``benchmarks.stack``
(each script puts the repository root on ``sys.path`` first, so the import
works both under ``python benchmarks/x.py`` and from the tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import redis

from maas_worker.client.client import Client
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, save_keyring


def bench_env(
    tmp: Path,
    server_url: str,
    *,
    tenant: str = "acme",
    keyring: Keyring | None = None,
    diagnostic_models: bool = True,
    **extra: str,
) -> dict[str, str]:
    """The environment of a benchmark's clients and workers on the server at ``server_url``.

    Writes ``keyring`` (default: a new keyring holding ``tenant`` alone) to
    ``tmp/keyring.json`` and returns this process's environment with every
    ``MAAS_*`` variable removed, then ``MAAS_BROKER_URL``, ``MAAS_KEYRING``,
    ``MAAS_TENANT`` and (with ``diagnostic_models``, for the ``echo`` model)
    ``MAAS_DIAGNOSTIC_MODELS=1`` set, then ``extra`` (``MAAS_NAME="value"``).

    The caller's ``MAAS_*`` variables are dropped because a benchmark's figures
    must depend on its own settings alone: a broker URL, keyring, worker mode
    or limit left in the shell would otherwise reach its workers and clients
    unseen.
    """
    path = tmp / "keyring.json"
    save_keyring(path, keyring if keyring is not None else Keyring().with_new_tenant(tenant))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(MAAS_BROKER_URL=server_url, MAAS_KEYRING=str(path), MAAS_TENANT=tenant)
    if diagnostic_models:
        env["MAAS_DIAGNOSTIC_MODELS"] = "1"
    env.update(extra)
    return env


def start_stack(
    tmp: Path, *, tenant: str, diagnostic_models: bool = True, **extra: str
) -> tuple[EmbeddedRedis, WorkerProcess, Client]:
    """An embedded server, one ready Celery-task worker with one pool process, and a client.

    The environment is `bench_env`'s (same arguments, ``extra`` set last); the worker logs to
    ``tmp/worker.log``. One pool process, so that jobs/s is per core. The
    caller stops the worker, then the server.
    """
    server = EmbeddedRedis().start()
    env = bench_env(tmp, server.url, tenant=tenant, diagnostic_models=diagnostic_models)
    env.update(extra)
    worker = WorkerProcess(
        env=env,
        name="bench",
        log_path=tmp / "worker.log",
        concurrency=1,
        extra_args=("--celery-tasks",),
    )
    worker.start()
    worker.wait_ready(redis.Redis.from_url(server.url))
    return server, worker, Client(settings=Settings.from_env(env))


def cpu_s(pid: int, *, tree: bool) -> float:
    """User + system CPU seconds of a process (with ``tree``, and of its live children)."""
    procs = [psutil.Process(pid)]
    if tree:
        procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total
