"""The ``maas-worker`` command line (also ``python -m maas_worker``).

Every failure prints one line, ``maas-worker: error: ...``, on stderr and
exits non-zero; stdout carries only results (job ids, JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from maas_worker.errors import ConfigError, JobError, MaasError, connection_cause
from maas_worker.protocol import PRIORITIES
from maas_worker.settings import Settings, redact_url

EXIT_ERROR = 1
EXIT_USAGE = 2
FLOWER_TASK_COLUMNS = "name,uuid,state,args,result,received,runtime,worker"


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(tenant=getattr(args, "tenant", None))


# -- keys ----------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    from maas_worker.tenancy.keyring import (
        Keyring,
        KeyState,
        TenantPolicy,
        edit_keyring,
        load_keyring,
    )

    settings = _settings(args)
    path = settings.keyring_path
    if args.keys_cmd == "list":
        rows = load_keyring(path).summary()
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(f"{'TENANT':<24} {'VERSION':>7}  {'STATE':<13} CREATED")
            for row in rows:
                print(f"{row['tenant']:<24} {row['version']:>7}  {row['state']:<13} "
                      f"{row['created_at']}")
        return 0
    if args.keys_cmd == "init":
        policy = TenantPolicy(
            tuple(m for m in args.allow_models.split(",") if m) if args.allow_models else None,
            args.max_priority)
        if args.allow_signers:
            policy = TenantPolicy.from_json({**policy.to_json(), "allowed_signers": [
                s for s in args.allow_signers.split(",") if s]})
        with edit_keyring(path, create=True) as box:
            box[0] = box[0].with_new_tenant(args.tenant, policy)
        print(f"tenant {args.tenant}: key version 1 is primary ({path})")
        return 0
    if args.keys_cmd == "policy":
        with edit_keyring(path) as box:
            current = box[0].tenant(args.tenant).policy
            models = current.allowed_models
            if args.allow_models is not None:
                models = tuple(m for m in args.allow_models.split(",") if m) \
                    if args.allow_models not in ("", "*") else None
            updated = dataclasses.replace(
                current,
                allowed_models=models,
                max_priority=args.max_priority or current.max_priority,
                rate_per_s=current.rate_per_s if args.rate is None else args.rate,
                burst=current.burst if args.burst is None else args.burst,
                max_in_flight=current.max_in_flight if args.max_in_flight is None
                else args.max_in_flight,
            )
            if args.allow_signers is not None:
                ids = None if args.allow_signers in ("", "*") else [
                    s for s in args.allow_signers.split(",") if s]
                updated = dataclasses.replace(updated, allowed_signers=TenantPolicy.from_json(
                    {"allowed_signers": ids}).allowed_signers)  # validates the ids
            box[0] = box[0].with_policy(args.tenant, updated)
        print(f"tenant {args.tenant}: {json.dumps(updated.to_json())}")
        return 0
    if args.keys_cmd == "rotate":
        with edit_keyring(path) as box:
            box[0], version = box[0].with_rotation(args.tenant, stage=args.stage)
        what = "decrypt-only (promote it once every host has it)" if args.stage else "primary"
        print(f"tenant {args.tenant}: key version {version} is {what}")
        return 0
    if args.keys_cmd in ("promote", "retire"):
        state: KeyState = "primary" if args.keys_cmd == "promote" else "retired"
        with edit_keyring(path) as box:
            box[0] = box[0].with_state(args.tenant, args.version, state)
        print(f"tenant {args.tenant}: key version {args.version} is {state}")
        return 0
    if args.keys_cmd == "export":
        from maas_worker.tenancy.keyring import save_keyring

        ring: Keyring = load_keyring(path).only(args.tenant)
        save_keyring(Path(args.out), ring)
        print(f"wrote {args.out} with tenant {args.tenant} only (mode 0600)")
        return 0
    raise ConfigError(f"unknown keys command {args.keys_cmd!r}")


# -- Celery processes --------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from maas_worker.app import app, celery_config
    from maas_worker.protocol import QUEUE_NAMES
    from maas_worker.tenancy.keyring import load_keyring

    settings = Settings.from_env()
    load_keyring(settings.keyring_path)  # refuse to start without a usable keyring
    from maas_worker.models.signing import TrustedSigners

    TrustedSigners.from_paths(settings.trusted_signers)  # ... or without its model signers
    app.conf.update(celery_config(settings))
    argv = ["worker", "-Q", ",".join(QUEUE_NAMES), "--loglevel", args.loglevel]
    if args.batch_consumer:
        # The job queues go to batch consumer processes (supervisor.py); the
        # Celery worker keeps remote control and the broadcast queue, and runs
        # the resource samples in its own process.
        if args.autoscale or args.pool:
            raise ConfigError("--batch-consumer sizes its own processes (--concurrency); "
                              "it does not take --autoscale or --pool")
        from maas_worker.protocol import MONITOR_EXCHANGE
        from maas_worker.worker.batch import supervisor

        supervisor.configure(processes=args.concurrency or os.cpu_count() or 1,
                             loglevel=args.loglevel)
        argv = ["worker", "-Q", MONITOR_EXCHANGE, "--pool", "solo", "--loglevel", args.loglevel]
    elif args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.autoscale:
        argv += ["--autoscale", args.autoscale]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if args.pool:
        argv += ["--pool", args.pool]
    app.worker_main(argv)
    return 0


def cmd_batch_consumer(args: argparse.Namespace) -> int:
    """One batch consumer process (started by ``worker --batch-consumer``)."""
    from maas_worker.worker.batch.consumer import serve

    return serve(name=args.name, loglevel=args.loglevel, ready_fd=args.ready_fd)


def cmd_beat(args: argparse.Namespace) -> int:
    from maas_worker.app import app, celery_config

    app.conf.update(celery_config(Settings.from_env()))
    app.start(["beat", "--loglevel", args.loglevel])
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from celery import Celery

    from maas_worker.app import celery_config
    from maas_worker.worker import control

    settings = Settings.from_env()
    auth = settings.flower_basic_auth
    if not auth and not args.unauthenticated:
        raise ConfigError("refusing to start Flower without authentication: set "
                          "MAAS_FLOWER_BASIC_AUTH=user:password (or pass --unauthenticated)")
    # Flower's own app, without the worker's modules (Flower imports an app's
    # modules, and the worker's install its transport, which takes with Lua),
    # and no expiry on its event and reply queues (kombu keeps expiring ones
    # with Lua): the flower Redis role runs no Lua and writes no queue
    # (acl.py). Nor does it sweep reserved messages back into the queues: it
    # reserves none (replies are taken unacknowledged), workers sweep.
    from kombu.transport import redis as kombu_redis

    kombu_redis.QoS.restore_visible = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    app = Celery("maas_worker")
    app.conf.update(celery_config(settings), control_queue_expires=None,
                    event_queue_expires=None)
    # Arguments and results are shown: jobs' are "<sealed envelope>" and None,
    # resource samples' result is the sample in readable form.
    argv = ["flower", f"--port={args.port}", f"--address={args.address}",
            f"--tasks_columns={FLOWER_TASK_COLUMNS}"]
    if auth:
        argv.append(f"--basic-auth={auth}")
        _authenticate_flower_metrics()
    # Its buttons (shut down, pool, consumers, rate limits, revoke) do what the
    # workers would allow, no more.
    control.lock_flower(settings.remote_control)
    app.start(argv)
    return 0


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


def cmd_ping(args: argparse.Namespace) -> int:
    """Ask one worker node to answer through the broker (a container's HEALTHCHECK)."""
    from celery.utils.nodenames import default_nodename
    from kombu.exceptions import OperationalError

    from maas_worker.app import app, celery_config
    from maas_worker.errors import ServiceUnavailable

    settings = Settings.from_env()
    app.conf.update(celery_config(settings))
    node = args.node or default_nodename(None)  # the worker's default: celery@<this host>
    try:
        replies = app.control.ping(destination=[node], timeout=args.timeout)
    except OperationalError as exc:
        raise ServiceUnavailable(
            f"broker unavailable ({redact_url(settings.broker_url)}: "
            f"{connection_cause(exc)})") from None
    if not any(node in reply for reply in replies or ()):
        raise ServiceUnavailable(f"worker {node} did not answer within {args.timeout:g} s")
    print(f"{node}: pong")
    return 0


# -- jobs ------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Any:
    from maas_worker.client.client import Client

    return Client(settings=_settings(args))


def _read_input(args: argparse.Namespace) -> Any:
    if args.input_file:
        try:
            text = Path(args.input_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.input_file}: {exc.strerror}") from None
    else:
        text = args.input
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--input is not valid JSON ({exc.msg} at position {exc.pos})") from None


def cmd_submit(args: argparse.Namespace) -> int:
    inputs = _read_input(args)
    client = _client(args)
    job = client.submit(args.model, inputs, priority=args.priority, ttl_s=args.ttl)
    if not args.wait:
        print(job.id)
        return 0
    print(json.dumps(job.result(timeout=args.timeout)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    info = _client(args).job(args.job_id).info()
    if args.json:
        print(json.dumps(info.as_dict()))
    else:
        print(info.state + (f" ({info.reason})" if info.reason else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    if not job.cancel():
        raise JobError(args.job_id, "already finished; nothing to cancel")
    print(job.status())
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).job(args.job_id).result(timeout=args.timeout)))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from maas_worker.backend.audit import AuditLog
    from maas_worker.worker.runtime import backend_client

    settings = _settings(args)
    records = AuditLog(backend_client(settings), maxlen=settings.audit_maxlen).latest(args.limit)
    for rec in records:
        if args.json:
            print(json.dumps(rec.to_json()))
        else:
            when = datetime.fromtimestamp(rec.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{when}  {rec.reason:<12} tenant={rec.tenant or '-'}"
                  f"{'' if rec.verified else '(unverified)'}  job={rec.job_id}  "
                  f"worker={rec.worker}{'  ' + rec.detail if rec.detail else ''}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from maas_worker.backend import keyspace
    from maas_worker.monitoring.fleet import read_fleet
    from maas_worker.monitoring.samples import summarize
    from maas_worker.worker.runtime import backend_client

    settings = _settings(args)
    # redis-py types replies as unions; these are plain bytes/float replies.
    backend: Any = backend_client(settings)
    reading = read_fleet(settings, backend=backend)
    now = time.time()
    seen = {n.decode(): score for n, score in backend.zrange(keyspace.NODES, 0, -1,
                                                             withscores=True)}
    names = sorted(set(seen) | set(reading.samples))
    workers: list[dict[str, Any]] = [
        {"worker": name,
         "last_seen_s_ago": round(now - seen[name], 1) if name in seen else None,
         "sample": reading.samples.get(name)}
        for name in names]
    backlog = reading.backlog
    if args.json:
        print(json.dumps({"backlog": dict(backlog.depth),
                          "oldest_age_s": dict(backlog.oldest_age_s),
                          "sample_interval_s": settings.sample_interval_s,
                          "workers": workers}))
        return 0
    oldest = backlog.oldest_s
    print("backlog: " + "  ".join(f"{k}={v}" for k, v in backlog.depth.items())
          + (f"  (oldest job waiting {oldest:.1f} s)" if oldest is not None else ""))
    for w in workers:
        seen_text = "never" if w["last_seen_s_ago"] is None else f"{w['last_seen_s_ago']} s ago"
        sample = w["sample"]
        if sample is None:
            print(f"{w['worker']}  (seen {seen_text}; no current sample)")
            continue
        text = summarize(sample)
        print(f"{w['worker']}  (seen {seen_text}; sampled {now - sample['at']:.1f} s ago)")
        print(f"    cpu {text['cpu']}  memory {text['memory']}  swap {text['swap']}")
        print(f"    load {text['load']}  pool {text['pool']}  gpu {text['gpu']}  "
              f"jobs {text['jobs']}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from maas_worker.monitoring.fleet import read_fleet

    settings = _settings(args)
    reading = read_fleet(settings)
    advice = reading.advice
    if args.json:
        print(json.dumps({**advice.to_json(), "backlog_by_priority": dict(reading.backlog.depth)}))
        return 0
    print(f"desired worker nodes: {advice.desired_nodes} (now {advice.current_nodes})")
    print(f"  {advice.reason}; backlog {advice.backlog}, throughput "
          f"{advice.throughput_jobs_per_s:g} jobs/s, target wait {advice.target_wait_s:g} s")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    import threading

    from maas_worker.monitoring.exporter import FleetCollector
    from maas_worker.monitoring.metrics import serve

    settings = _settings(args)
    port = settings.fleet_metrics_port if args.port is None else args.port
    address = args.address or settings.metrics_address
    if port == 0:
        raise ConfigError("the fleet exporter needs a port (--port or MAAS_FLEET_METRICS_PORT)")
    if serve(FleetCollector(settings), port=port, address=address) is None:
        raise ConfigError(f"cannot serve metrics on {address}:{port} (port in use?)")
    print(f"maas-worker: fleet metrics on http://{address}:{port}/metrics", file=sys.stderr)
    threading.Event().wait()  # until a signal ends the process
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    from maas_worker.tenancy import acl

    return acl.run(args, _settings(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from maas_worker.local.demo import run_demo

    return run_demo(jobs_per_priority=args.jobs)


def cmd_models(args: argparse.Namespace) -> int:
    from maas_worker.cli import models

    return models.run(args)


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(prog="maas-worker",
                                description="Secure asynchronous model-inference jobs.")
    p.add_argument("--broker-url", help="Redis URL (default: $MAAS_BROKER_URL)")
    p.add_argument("--keyring", help="keyring file (default: $MAAS_KEYRING)")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="manage tenant keys")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    k = ks.add_parser("init", help="create a tenant with a fresh primary key")
    k.add_argument("--tenant", required=True)
    k.add_argument("--allow-models", help="comma-separated models the tenant may use (default all)")
    k.add_argument("--max-priority", choices=PRIORITIES, default="high")
    k.add_argument("--allow-signers", help="comma-separated key ids of the model signers "
                   "whose models the tenant may run (default: every trusted signer)")
    k = ks.add_parser("policy", help="show or change a tenant's policy and quotas")
    k.add_argument("--tenant", required=True)
    k.add_argument("--allow-models", help="comma-separated models, or * for all")
    k.add_argument("--max-priority", choices=PRIORITIES)
    k.add_argument("--rate", type=float, help="jobs per second (0 = unlimited)")
    k.add_argument("--burst", type=int, help="jobs allowed in one burst")
    k.add_argument("--max-in-flight", type=int, help="jobs queued or running at once (0 = no cap)")
    k.add_argument("--allow-signers",
                   help="comma-separated model signer key ids, or * for every trusted signer")
    k = ks.add_parser("rotate", help="add a new key version and make it primary")
    k.add_argument("--tenant", required=True)
    k.add_argument("--stage", action="store_true",
                   help="add it decrypt-only (step 1 of a multi-host rotation)")
    for name, text in (("promote", "make a version primary"), ("retire", "retire a version")):
        k = ks.add_parser(name, help=text)
        k.add_argument("--tenant", required=True)
        k.add_argument("--version", type=int, required=True)
    k = ks.add_parser("list", help="tenants, versions and states (never secrets)")
    k.add_argument("--json", action="store_true")
    k = ks.add_parser("export", help="write a keyring holding one tenant (for its clients)")
    k.add_argument("--tenant", required=True)
    k.add_argument("--out", required=True)

    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--concurrency", type=int)
    w.add_argument("--autoscale", metavar="MAX,MIN")
    w.add_argument("--hostname", "-n", help="node name (default celery@HOST)")
    # "threads" is for dynamic batching (MAAS_BATCH): there a running job
    # cannot be interrupted, only failed at its soft limit (docs/compute.md).
    w.add_argument("--pool", choices=("prefork", "solo", "threads"))
    w.add_argument("--batch-consumer", action="store_true",
                   help="take the job queues in batches: one round trip per stage for many "
                   "jobs, one model call per batch (--concurrency processes; docs/operations.md)")
    w.add_argument("--loglevel", default="INFO")
    bc = sub.add_parser("batch-consumer", help=argparse.SUPPRESS)
    bc.add_argument("--name", default="consumer")
    bc.add_argument("--ready-fd", type=int)
    bc.add_argument("--loglevel", default="INFO")
    b = sub.add_parser("beat", help="run Celery beat (exactly one per deployment)")
    b.add_argument("--loglevel", default="INFO")
    f = sub.add_parser("flower", help="run Flower (authentication required)")
    f.add_argument("--port", type=int, default=5555)
    f.add_argument("--address", default="127.0.0.1")
    f.add_argument("--unauthenticated", action="store_true",
                   help="allow Flower without authentication (local debugging only)")
    pi = sub.add_parser("ping", help="check that a worker node answers (exit 1 if not)")
    pi.add_argument("--node", help="worker node name (default: celery@<this host>)")
    pi.add_argument("--timeout", type=float, default=5.0)

    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("--model", required=True)
    s.add_argument("--priority", choices=PRIORITIES, default="normal")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="the input as JSON")
    src.add_argument("--input-file", help="a file holding the input as JSON")
    s.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--ttl", type=int, help="seconds the job may wait in the queue")
    s.add_argument("--tenant", help="tenant (default: $MAAS_TENANT)")

    st = sub.add_parser("status", help="a job's state (and the reason if it failed)")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true", help='{"job_id", "state", "reason"}')
    st.add_argument("--tenant")
    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("job_id")
    c.add_argument("--tenant")
    r = sub.add_parser("result", help="wait for a job's result and print it as JSON")
    r.add_argument("job_id")
    r.add_argument("--timeout", type=float, default=60.0)
    r.add_argument("--tenant")

    a = sub.add_parser("audit", help="security events, newest first")
    a.add_argument("--json", action="store_true")
    a.add_argument("--limit", type=int, default=50)
    sa = sub.add_parser("stats", help="each worker's latest resource sample, and the backlog")
    sa.add_argument("--json", action="store_true")
    sc = sub.add_parser("scale", help="how many worker nodes the backlog calls for")
    sc.add_argument("--json", action="store_true")
    me = sub.add_parser("metrics", help="serve the fleet's Prometheus metrics")
    me.add_argument("--port", type=int, help="default $MAAS_FLEET_METRICS_PORT or 9541")
    me.add_argument("--address", help="default $MAAS_METRICS_ADDRESS or 127.0.0.1")
    from maas_worker.tenancy import acl

    acl.add_parser(sub)
    d = sub.add_parser("demo", help="run the whole system locally and exit")
    d.add_argument("--jobs", type=int, default=2, help="echo jobs per priority")
    from maas_worker.cli import models as model_commands

    model_commands.add_parser(sub)
    return p


COMMANDS = {
    "keys": cmd_keys, "worker": cmd_worker, "batch-consumer": cmd_batch_consumer,
    "beat": cmd_beat, "flower": cmd_flower,
    "submit": cmd_submit, "status": cmd_status, "cancel": cmd_cancel, "result": cmd_result,
    "audit": cmd_audit, "ping": cmd_ping,
    "stats": cmd_stats, "demo": cmd_demo, "models": cmd_models,
    "scale": cmd_scale, "metrics": cmd_metrics, "acl": cmd_acl,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Global flags override the environment for this process and every process
    # it starts (worker pool children read their settings from it).
    if args.broker_url:
        os.environ["MAAS_BROKER_URL"] = args.broker_url
    if args.keyring:
        os.environ["MAAS_KEYRING"] = args.keyring
    try:
        return COMMANDS[args.command](args)
    except MaasError as exc:
        print(f"maas-worker: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except redis.RedisError as exc:
        s = Settings.from_env()
        where = redact_url(s.broker_url) if s.result_backend == s.broker_url else \
            f"broker {redact_url(s.broker_url)} or result backend {redact_url(s.result_backend)}"
        print(f"maas-worker: error: Redis unavailable ({where}): {connection_cause(exc)}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
