"""Resource samples, stats, Prometheus endpoints and the fleet recommendation, for real.

Real Valkey, real workers, a real beat sending ``maas.sample`` through the
broadcast exchange every second. Every wait is on a condition.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from maas_worker.backend import keyspace
from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess
from maas_worker.monitoring.samples import SAMPLE_TTL_INTERVALS, SampleStore
from maas_worker.tenancy.keyring import save_keyring

from .conftest import Stack, _redis_url, make_keyring, wait_for
from .services import Service, http_get, start_worker

pytestmark = pytest.mark.integration
DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"
INTERVAL_S = 1.0
WAIT_S = 60.0


def documented_metrics() -> set[str]:
    """Metric names in docs/monitoring.md's tables (rows starting with a `maas_` name)."""
    return set(re.findall(r"^\| `(maas_[a-z0-9_]+)`", DOCS.read_text(), re.MULTILINE))


def exposed(text: str) -> set[str]:
    """Family names as Prometheus shows them (counters with ``_total``); parses strictly."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(f"{fam.name}_total" if fam.type == "counter" else fam.name)
    return names


def samples(stack: Stack) -> dict[str, dict[str, Any]]:
    return SampleStore(stack.backend, interval_s=INTERVAL_S).latest()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two workers (one autoscaled), beat every second, the fleet exporter."""
    tmp = tmp_path_factory.mktemp("monitored")
    url, server = _redis_url()
    keyring_path = tmp / "keyring.json"
    save_keyring(keyring_path, make_keyring())
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        {
            "MAAS_BROKER_URL": url,
            "MAAS_KEYRING": str(keyring_path),
            "MAAS_DIAGNOSTIC_MODELS": "1",
            "MAAS_TENANT": "acme",
            "MAAS_SAMPLE_INTERVAL_S": str(INTERVAL_S),
            "MAAS_METRICS_PORT": "0",
            "MAAS_AUTOSCALE_MAX_CPU_PCT": "100",
            "MAAS_AUTOSCALE_MAX_MEMORY_PCT": "100",
        }
    )
    stack = Stack(url, tmp, keyring_path, env, redis.Redis.from_url(url))
    ports = {"mon1": free_port(), "mon2": free_port(), "fleet": free_port()}
    services: list[Service] = []
    try:
        w1 = start_worker(stack, "mon1", env={"MAAS_METRICS_PORT": str(ports["mon1"])})
        w2 = start_worker(
            stack,
            "mon2",
            extra_args=("--autoscale", "2,1"),
            env={"MAAS_METRICS_PORT": str(ports["mon2"])},
        )
        services.append(Service(stack, "beat", "beat", "--loglevel", "WARNING"))
        services.append(Service(stack, "exporter", "metrics", "--port", str(ports["fleet"])))
        yield {"stack": stack, "workers": (w1, w2), "ports": ports, "services": services}
    finally:
        for svc in services:
            svc.stop()
        for w in stack.workers:
            w.stop(timeout_s=5)
        stack.backend.close()
        if server is not None:
            server.stop()


def test_stats_marks_a_silent_node_down_and_scale_does_not_count_it(
    monitored: dict[str, Any],
) -> None:
    stack: Stack = monitored["stack"]
    w1, w2 = monitored["workers"]
    wait_for(lambda: {w1.node, w2.node} <= set(samples(stack)), WAIT_S, "both samples")
    # A node whose last heartbeat is older than the stated silence, as a host
    # cut off by a partition leaves it (the heartbeat is all stats reads).
    down_after = json.loads(stack.cli("stats", "--json").stdout)["down_after_s"]
    stack.backend.zadd(keyspace.NODES, {"gone@host": time.time() - down_after - 5})
    doc = json.loads(stack.cli("stats", "--json").stdout)
    by_node = {w["worker"]: w for w in doc["workers"]}
    assert by_node["gone@host"]["state"] == "down"
    assert by_node["gone@host"]["last_seen_s_ago"] > down_after
    assert by_node[w1.node]["state"] == by_node[w2.node]["state"] == "up"
    text = stack.cli("stats").stdout
    assert "gone@host  DOWN (seen " in text
    assert f"down after {down_after:g} s without a heartbeat" in text
    assert json.loads(stack.cli("scale", "--json").stdout)["current_nodes"] == 2
    # Its heartbeat again: up at once.
    stack.backend.zadd(keyspace.NODES, {"gone@host": time.time()})
    doc = json.loads(stack.cli("stats", "--json").stdout)
    assert {w["worker"]: w["state"] for w in doc["workers"]}["gone@host"] == "up"
    assert json.loads(stack.cli("scale", "--json").stdout)["current_nodes"] == 3
    stack.backend.zrem(keyspace.NODES, "gone@host")


def test_stats_json_has_each_workers_latest_sample_and_the_backlog(
    monitored: dict[str, Any],
) -> None:
    stack: Stack = monitored["stack"]
    w1, w2 = monitored["workers"]
    wait_for(lambda: {w1.node, w2.node} <= set(samples(stack)), WAIT_S, "both samples")
    job = stack.client().submit("echo", {"text": "counted"}, priority="high")
    job.result(timeout=WAIT_S)
    out = stack.cli("stats", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {
        "backlog",
        "oldest_age_s",
        "backlog_by_tenant",
        "sample_interval_s",
        "down_after_s",
        "workers",
    }
    assert doc["backlog_by_tenant"] == {"high": {}, "normal": {}, "low": {}}
    assert set(doc["backlog"]) == set(doc["oldest_age_s"]) == {"high", "normal", "low"}
    assert all(isinstance(v, int) for v in doc["backlog"].values())
    assert doc["sample_interval_s"] == INTERVAL_S
    by_node = {w["worker"]: w for w in doc["workers"]}
    for node in (w1.node, w2.node):
        entry = by_node[node]
        assert isinstance(entry["last_seen_s_ago"], float)
        assert entry["state"] == "up"
        s = entry["sample"]
        assert s["node"] == node
        assert time.time() - s["at"] <= SAMPLE_TTL_INTERVALS * INTERVAL_S + 1
        assert {"percent", "per_core", "cores"} <= set(s["cpu"])
        assert {"total_bytes", "available_bytes", "used_percent"} <= set(s["memory"])
        assert {"used_percent"} <= set(s["swap"])
        assert len(s["load"]) == 3
        assert {"bytes_sent", "bytes_recv"} <= set(s["net"])
        assert s["pool"]["processes"] >= 1
        assert len(s["pool"]["rss_bytes"]) == len(s["pool"]["open_fds"]) == s["pool"]["processes"]
        assert {"finished", "busy_s", "per_s", "busy_fraction"} <= set(s["jobs"])
    # a job was counted by whichever node ran it, and shows in a later sample
    wait_for(
        lambda: sum(s["jobs"]["finished"] for s in samples(stack).values()) >= 1,
        WAIT_S,
        "the job counted in a sample",
    )
    text = stack.cli("stats")
    assert text.returncode == 0
    assert "backlog: high=0" in text.stdout
    assert w1.node in text.stdout and "per core" in text.stdout


def test_samples_never_carry_job_data(monitored: dict[str, Any]) -> None:
    stack: Stack = monitored["stack"]
    job = stack.client().submit("echo", {"text": "top-secret-payload"})
    job.result(timeout=WAIT_S)
    wait_for(lambda: samples(stack), WAIT_S, "a sample")
    dump = json.dumps(samples(stack))
    assert "top-secret-payload" not in dump
    assert job.id not in dump


def test_metrics_endpoints_parse_and_have_the_documented_names(monitored: dict[str, Any]) -> None:
    stack: Stack = monitored["stack"]
    ports = monitored["ports"]
    client = stack.client()
    for i in range(4):
        client.submit("echo", {"i": i}).result(timeout=WAIT_S)
    with pytest.raises(Exception):  # noqa: B017 - a failed job: counted with its reason
        client.submit("sleep", {"seconds": "forever"}).result(timeout=WAIT_S)
    # a real model: loaded (verified, opened) on first use, which is timed
    labels = client.submit("digits", {"inputs": [[0.0] * 64]}).result(timeout=WAIT_S)
    assert len(labels["labels"]) == 1

    def scrape(port: int) -> str | None:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        return body if status == 200 else None

    worker_texts = [
        wait_for(lambda p=ports[n]: scrape(p), WAIT_S, f"{n} metrics") for n in ("mon1", "mon2")
    ]
    fleet_text = wait_for(
        lambda: (t := scrape(ports["fleet"])) and "maas_worker_cpu_percent{" in t and t,
        WAIT_S,
        "fleet metrics with samples",
    )
    names = set().union(*(exposed(t) for t in worker_texts), exposed(fleet_text))
    documented = documented_metrics()
    assert len(documented) >= 30
    assert documented <= names, f"documented but not exposed: {documented - names}"
    ours = {n for n in names if n.startswith("maas_")}
    assert ours <= documented, f"exposed but not documented: {ours - documented}"
    # the values make sense
    joined = "\n".join(worker_texts)
    finished = sum(
        float(v)
        for v in re.findall(
            r'^maas_jobs_total\{outcome="succeeded",reason="none"\} (\S+)$', joined, re.M
        )
    )
    assert finished >= 4
    assert re.search(r'^maas_jobs_total\{outcome="failed",reason="bad_input"\} 1\.0$', joined, re.M)
    assert re.search(r'^maas_job_run_seconds_count\{model="echo"\} ', joined, re.M)
    assert re.search(
        r'^maas_model_load_seconds_count\{model="digits@[^"]+"\} 1\.0$', joined, re.M
    ), joined
    assert 'maas_autoscaler_max_pool_size{worker="mon2@' in worker_texts[1]
    assert "maas_autoscaler_pool_size" not in worker_texts[0]  # not autoscaled
    assert re.search(r'^maas_queue_depth\{priority="high"\} 0\.0$', fleet_text, re.M)
    assert re.search(r"^maas_fleet_desired_nodes 1\.0$", fleet_text, re.M)
    assert "top-secret" not in joined + fleet_text


def test_samples_from_two_nodes_expire_when_a_worker_stops(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(MAAS_SAMPLE_INTERVAL_S=str(INTERVAL_S), MAAS_METRICS_PORT="0")
    a = stack.start_worker("exp-a", concurrency=1)
    b = stack.start_worker("exp-b", concurrency=1)
    beat = Service(stack, "beat", "beat", "--loglevel", "WARNING")
    try:
        latest = wait_for(
            lambda: (s := samples(stack)) and {a.node, b.node} <= set(s) and s,
            WAIT_S,
            "samples from both nodes",
        )
        # each node sampled its own pool, not one node for all
        assert latest[a.node]["node"] == a.node and latest[b.node]["node"] == b.node
        pools = [set(_pool_pids(w)) for w in (a, b)]
        assert pools[0] and pools[1] and not pools[0] & pools[1]

        b.kill()  # a crash: no shutdown hook withdraws the sample, it expires
        killed_at = time.monotonic()
        wait_for(lambda: b.node not in samples(stack), WAIT_S, "the killed node's sample to expire")
        assert time.monotonic() - killed_at <= SAMPLE_TTL_INTERVALS * INTERVAL_S + 2
        assert a.node in samples(stack)  # the live node is still current
        assert stack.backend.ttl(f"maas:sample:{a.node}") <= SAMPLE_TTL_INTERVALS * INTERVAL_S

        a.stop()  # a clean stop withdraws at once
        assert a.node not in samples(stack)
    finally:
        beat.stop()


def _pool_pids(worker: WorkerProcess) -> list[int]:
    import psutil

    assert worker.proc is not None
    return [c.pid for c in psutil.Process(worker.proc.pid).children()]


def test_scale_json_recommends_more_nodes_for_a_larger_backlog(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(
        MAAS_FLEET_BACKLOG_PER_NODE="10", MAAS_FLEET_MAX_NODES="20", MAAS_FLEET_MIN_NODES="0"
    )
    client = stack.client()

    def advice() -> dict[str, Any]:
        out = stack.cli("scale", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    empty = advice()
    assert (empty["desired_nodes"], empty["backlog"]) == (0, 0)
    for i in range(5):
        client.submit("echo", {"i": i}, priority="low")
    small = advice()
    for i in range(40):
        client.submit("echo", {"i": i})
    large = advice()
    assert (small["backlog"], large["backlog"]) == (5, 45)
    assert small["desired_nodes"] == 1
    assert large["desired_nodes"] == 5
    assert large["desired_nodes"] > small["desired_nodes"]
    assert large["backlog_by_priority"] == {"high": 0, "normal": 40, "low": 5}
    assert large["backlog_by_tenant"] == {"acme": 45}
    # Another tenant's jobs: counted in the total and on their own.
    stack.client("globex").submit_many("echo", [{"g": i} for i in range(3)])
    both = advice()
    assert both["backlog"] == 48 and both["backlog_by_tenant"] == {"acme": 45, "globex": 3}
    assert both["backlog_by_priority"] == {"high": 0, "normal": 43, "low": 5}
    stats = json.loads(stack.cli("stats", "--json").stdout)
    assert stats["backlog_by_tenant"] == {
        "high": {},
        "normal": {"acme": 40, "globex": 3},
        "low": {"acme": 5},
    }
    assert "by tenant: acme=45  globex=3" in stack.cli("stats").stdout
    # the oldest job's age is read from the real queued messages
    assert large["oldest_age_s"] is not None and 0 <= large["oldest_age_s"] < WAIT_S
    assert large["current_nodes"] == 0
    text = stack.cli("scale")
    assert text.returncode == 0 and "desired worker nodes: 5" in text.stdout


def test_stats_wait_started_before_any_worker_shows_it_once_it_is_sampled(
    make_stack: Callable[..., Stack],
) -> None:
    """The README's `stats --wait 30` right after starting a worker: the node
    may not be announced yet; stats waits for it and its first sample."""
    stack = make_stack(MAAS_SAMPLE_INTERVAL_S=str(INTERVAL_S), MAAS_METRICS_PORT="0")
    stats = subprocess.Popen(
        [sys.executable, "-m", "maas_worker", "stats", "--wait", str(WAIT_S)],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    beat = None
    try:
        worker = stack.start_worker("late", concurrency=2)
        beat = Service(stack, "beat", "beat", "--loglevel", "WARNING")
        out, err = stats.communicate(timeout=WAIT_S + 30)
    finally:
        if stats.poll() is None:
            stats.kill()
        if beat is not None:
            beat.stop()
    assert stats.returncode == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith(worker.node)]
    assert rows and "sampled" in rows[0], out
