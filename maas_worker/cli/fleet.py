"""``maas-worker audit|stats|scale|metrics``: what the fleet is doing, read from Redis."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from maas_worker.cli.context import Command, json_option, pass_settings
from maas_worker.errors import ConfigError
from maas_worker.settings import Settings

#: Audit records ``audit`` prints by default.
DEFAULT_AUDIT_LIMIT = 50


@click.command(cls=Command, short_help="security events, newest first")
@json_option("one JSON object per record instead of text")
@click.option(
    "--limit", type=int, default=DEFAULT_AUDIT_LIMIT, help="how many records (default 50)"
)
@pass_settings
def audit(settings: Settings, as_json: bool, limit: int) -> int:
    """Security events (refused, tampered, expired jobs...), newest first."""
    from maas_worker.backend.audit import AuditLog
    from maas_worker.backend.redis import backend_client

    records = AuditLog(backend_client(settings), maxlen=settings.audit_maxlen).latest(limit)
    if not records and not as_json:
        # Said on stderr: stdout stays the (empty) list, and --json stays silent.
        print("no audit records", file=sys.stderr)
    for rec in records:
        if as_json:
            print(json.dumps(rec.to_json()))
        else:
            when = datetime.fromtimestamp(rec.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(
                f"{when}  {rec.reason:<12} tenant={rec.tenant or '-'}"
                f"{'' if rec.verified else '(unverified)'}  job={rec.job_id}  "
                f"worker={rec.worker}{'  ' + rec.detail if rec.detail else ''}"
            )
    return 0


def _wait_for_samples(backend: Any, settings: Settings, wait_s: float) -> None:
    """Return once a worker node is live and every live one has a current sample,
    or after ``wait_s`` seconds.

    A node is live if it sent its heartbeat within `catalog.NODE_LIVE_S`. With
    none live yet, a worker may be starting: that is waited for too.
    """
    from maas_worker.backend import keyspace
    from maas_worker.backend.catalog import NODE_LIVE_S
    from maas_worker.monitoring.samples import SampleStore

    store = SampleStore(backend, interval_s=settings.sample_interval_s)
    deadline = time.monotonic() + wait_s
    while True:
        live = {
            n.decode()
            for n in backend.zrangebyscore(keyspace.NODES, time.time() - NODE_LIVE_S, "+inf")
        }
        if (live and not live - set(store.latest())) or time.monotonic() >= deadline:
            return
        time.sleep(0.1)


@click.command(cls=Command, short_help="each worker's latest resource sample, and the backlog")
@json_option("one JSON document instead of text")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="S",
    help="wait up to S seconds for a live worker and every live worker's first sample "
    "(a worker or beat that just started)",
)
@pass_settings
def stats(settings: Settings, as_json: bool, wait_s: float) -> int:
    """Each worker's latest resource sample, and the backlog of each queue.

    Beat asks every worker for a sample when it starts and then each
    $MAAS_SAMPLE_INTERVAL_S: a worker with no current sample is one that
    started since, or a deployment without `maas-worker beat`.
    """
    from maas_worker.backend import keyspace
    from maas_worker.backend.catalog import NODE_LIVE_S
    from maas_worker.backend.redis import backend_client
    from maas_worker.monitoring.fleet import read_fleet
    from maas_worker.monitoring.samples import summarize

    # redis-py types replies as unions; these are plain bytes/float replies.
    backend: Any = backend_client(settings)
    if wait_s:
        _wait_for_samples(backend, settings, wait_s)
    reading = read_fleet(settings, backend=backend)
    now = time.time()
    seen = {
        n.decode(): score for n, score in backend.zrange(keyspace.NODES, 0, -1, withscores=True)
    }
    names = sorted(set(seen) | set(reading.samples))
    workers: list[dict[str, Any]] = [
        {
            "worker": name,
            # Down after NODE_LIVE_S of silence (three missed heartbeats), up at its next.
            "state": "up" if name in seen and now - seen[name] <= NODE_LIVE_S else "down",
            "last_seen_s_ago": round(now - seen[name], 1) if name in seen else None,
            "sample": reading.samples.get(name),
        }
        for name in names
    ]
    backlog = reading.backlog
    if as_json:
        print(
            json.dumps(
                {
                    "backlog": dict(backlog.depth),
                    "oldest_age_s": dict(backlog.oldest_age_s),
                    "backlog_by_tenant": {p: dict(t) for p, t in backlog.tenant_depth.items()},
                    "sample_interval_s": settings.sample_interval_s,
                    "down_after_s": NODE_LIVE_S,
                    "workers": workers,
                }
            )
        )
        return 0
    oldest = backlog.oldest_s
    print(
        "backlog: "
        + "  ".join(f"{k}={v}" for k, v in backlog.depth.items())
        + (f"  (oldest job waiting {oldest:.1f} s)" if oldest is not None else "")
    )
    per_tenant = backlog.by_tenant()
    if per_tenant:
        # The busiest first, at most ten (the JSON has them all, per priority).
        busiest = sorted(per_tenant.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        print("by tenant: " + "  ".join(f"{t}={n}" for t, n in busiest))
    for w in workers:
        seen_text = "never" if w["last_seen_s_ago"] is None else f"{w['last_seen_s_ago']} s ago"
        if w["state"] == "down":
            print(
                f"{w['worker']}  DOWN (seen {seen_text}; a node is down after "
                f"{NODE_LIVE_S:g} s without a heartbeat)"
            )
            continue
        sample = w["sample"]
        if sample is None:
            print(
                f"{w['worker']}  (seen {seen_text}; no current sample: beat samples every "
                f"{settings.sample_interval_s:g} s; is `maas-worker beat` running?)"
            )
            continue
        text = summarize(sample)
        print(f"{w['worker']}  (seen {seen_text}; sampled {now - sample['at']:.1f} s ago)")
        print(f"    cpu {text['cpu']}  memory {text['memory']}  swap {text['swap']}")
        print(
            f"    load {text['load']}  pool {text['pool']}  gpu {text['gpu']}  jobs {text['jobs']}"
        )
    return 0


@click.command(cls=Command, short_help="how many worker nodes the backlog calls for")
@json_option("one JSON document instead of text")
@pass_settings
def scale(settings: Settings, as_json: bool) -> int:
    """How many worker nodes the backlog calls for (MAAS_FLEET_* sets the policy)."""
    from maas_worker.monitoring.fleet import read_fleet

    reading = read_fleet(settings)
    advice = reading.advice
    if as_json:
        backlog = reading.backlog
        print(
            json.dumps(
                {
                    **advice.to_json(),
                    "backlog_by_priority": dict(backlog.depth),
                    "backlog_by_tenant": backlog.by_tenant(),
                }
            )
        )
        return 0
    print(f"desired worker nodes: {advice.desired_nodes} (now {advice.current_nodes})")
    print(
        f"  {advice.reason}; backlog {advice.backlog}, throughput "
        f"{advice.throughput_jobs_per_s:g} jobs/s, target wait {advice.target_wait_s:g} s"
    )
    return 0


@click.command(cls=Command, short_help="serve the fleet's Prometheus metrics")
@click.option("--port", type=int, help="default $MAAS_FLEET_METRICS_PORT or 9541")
@click.option("--address", help="default $MAAS_METRICS_ADDRESS or 127.0.0.1")
@pass_settings
def metrics(settings: Settings, port: int | None, address: str | None) -> int:
    """Serve the fleet's Prometheus metrics (one exporter per deployment) until stopped."""
    import threading

    from maas_worker.monitoring.exporter import FleetCollector
    from maas_worker.monitoring.metrics import serve

    port = settings.fleet_metrics_port if port is None else port
    address = address or settings.metrics_address
    if port == 0:
        raise ConfigError("the fleet exporter needs a port (--port or MAAS_FLEET_METRICS_PORT)")
    if serve(FleetCollector(settings), port=port, address=address) is None:
        raise ConfigError(f"cannot serve metrics on {address}:{port} (port in use?)")
    print(f"maas-worker: fleet metrics on http://{address}:{port}/metrics", file=sys.stderr)
    threading.Event().wait()  # until a signal ends the process
    return 0
