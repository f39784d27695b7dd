"""The shipped scrape config and every query of the Grafana dashboard, on a real Prometheus.

Debian's ``prometheus`` package (`.ci/run` installs it where it can; the tests skip
without it). Real Valkey, two real workers with their metrics endpoints (one
autoscaled), beat sampling every second, the fleet exporter. Prometheus runs with
docker/prometheus.yml as shipped except for what cannot work outside compose: its
targets (Docker DNS names) are replaced by the test's own, and it scrapes every
second. Jobs of several outcomes and a backlog are produced, then every expression
of every panel of docker/grafana/dashboards/maas-worker.json is evaluated through
Prometheus' HTTP API, with Grafana's variables substituted as Grafana would, and
the answers are compared with what the test did. Every wait is on a condition.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from maas_worker.errors import JobFailed
from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings

from .attacker import Attacker
from .conftest import Stack, wait_for
from .services import Service, http_get, start_worker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="needs Prometheus on PATH (Debian: apt-get install prometheus)",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "docker" / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "maas-worker.json"
WAIT_S = 60.0
#: Scrape interval the derived config sets (the shipped one is 15 s).
SCRAPE_S = 1
#: Jobs of each outcome the test produces, in each of two rounds.
SUCCEEDED, FAILED = 3, 1
#: Low-priority jobs left waiting behind long high-priority ones (the backlog).
BACKLOG_LOW = 3
#: Labels Prometheus gives every series of a target (and the name), left out of comparisons.
TARGET = {"__name__", "instance", "job"}
#: Panels of quantiles and means per model (NaN for a model without jobs in the window).
LATENCY = {"Queue wait", "Run time by model", "Model load time"}
#: Panels that may answer nothing here: no GPU on this machine.
MAY_BE_EMPTY = {"GPU per worker"}


def derived_config(shipped: dict[str, Any], targets: dict[str, list[str]]) -> dict[str, Any]:
    """The shipped config with the test's targets per job and a 1 s scrape interval.

    Everything else of each scrape config (metrics path, relabelling, timeouts)
    is kept as shipped; only the service discovery, which names Docker DNS
    entries that do not exist here, is replaced by static targets.
    """
    config = json.loads(json.dumps(shipped))  # a deep copy
    config["global"] = {
        **config.get("global", {}),
        "scrape_interval": f"{SCRAPE_S}s",
        "scrape_timeout": f"{SCRAPE_S}s",
        "evaluation_interval": f"{SCRAPE_S}s",
    }
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        for key in ("scrape_interval", "scrape_timeout"):
            job.pop(key, None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    assert set(targets) == {job["job_name"] for job in config["scrape_configs"]}
    return config


class Prometheus:
    """A real ``prometheus`` on a free loopback port, with its own storage."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        (tmp / "tsdb").mkdir()
        self.log_path = tmp / "prometheus.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
        return http_get(f"{self.base}/-/ready")[0] == 200

    def api(self, path: str, **params: str) -> Any:
        status, body = http_get(f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body) if body else {}
        assert status == 200 and doc.get("status") == "success", (path, params, status, body)
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant query."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def grafana_regex(value: str) -> str:
    """A single variable value as Grafana puts it in a Prometheus regex (escaped twice:
    once for the regex, once for the PromQL string)."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr: str, *, node: str, window_s: int) -> str:
    """Grafana's variables in ``expr``: ``$node`` and the interval variables.

    ``$__rate_interval`` becomes a window covering the whole test (Grafana uses
    at least four scrape intervals; a dashboard looking at the last hour would
    see all of the test's jobs in its rate windows).
    """
    out = expr.replace("$__rate_interval", f"{window_s}s")
    out = out.replace("$__interval", f"{SCRAPE_S}s").replace("$__range", f"{window_s}s")
    out = out.replace("${node}", node).replace("$node", node)
    assert "$" not in out, f"a variable the test does not know: {out}"
    return out


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    panels = []
    for p in doc["panels"]:
        panels.extend(p.get("panels", []) if p["type"] == "row" else [p])
    return [(p["title"], t["refId"], t["expr"]) for p in panels for t in p["targets"]]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """``factory(config)``: a started, ready Prometheus, stopped at teardown."""
    started: list[Prometheus] = []

    def factory(config: dict[str, Any]) -> Prometheus:
        where = tmp_path / f"prometheus{len(started)}"
        where.mkdir()
        prom = Prometheus(config, where)
        started.append(prom)
        wait_for(prom.ready, WAIT_S, "Prometheus to be ready")
        return prom

    try:
        yield factory
    finally:
        for prom in started:
            prom.stop()


def test_promtool_accepts_the_shipped_and_the_derived_config(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    # The shipped file as it is: `worker` and `metrics` do not resolve here, but
    # promtool checks the syntax and every setting without resolving them.
    shipped = subprocess.run(
        ["promtool", "check", "config", str(SHIPPED)], capture_output=True, text=True, check=False
    )
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    derived = tmp_path / "derived.yml"
    derived.write_text(
        yaml.safe_dump(
            derived_config(
                yaml.safe_load(SHIPPED.read_text()),
                {"maas-worker": ["127.0.0.1:1"], "maas-fleet": ["127.0.0.1:2"]},
            )
        )
    )
    checked = subprocess.run(
        ["promtool", "check", "config", str(derived)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _jobs_round(stack: Stack, attacker: Attacker) -> list[str]:
    """One job of each kind: succeeded (echo, digits), failed (bad_input), rejected
    (policy, expired). Returns the ids of the rejected ones."""
    client = stack.client()
    for i in range(SUCCEEDED - 1):
        client.submit("echo", {"i": i}).result(timeout=WAIT_S)
    labels = client.submit("digits", {"inputs": [[0.0] * 64]}).result(timeout=WAIT_S)
    assert len(labels["labels"]) == 1
    for _ in range(FAILED):
        with pytest.raises(JobFailed):
            client.submit("sleep", {"seconds": "not a number"}).result(timeout=WAIT_S)
    # globex may run only echo (make_keyring): sleep is refused by policy
    header, envelope = attacker.seal(json.dumps({"seconds": 0}).encode(), model="sleep")
    attacker.send(envelope, job_id=header.job_id)
    rejected = [header.job_id]
    stack.wait_audit(header.job_id, "policy")
    issued = int(time.time() * 1000) - 600_000
    header, envelope = attacker.seal(
        json.dumps({"text": "late"}).encode(), issued_at_ms=issued, expires_at_ms=issued + 60_000
    )
    attacker.send(envelope, job_id=header.job_id)
    stack.wait_audit(header.job_id, "expired")
    rejected.append(header.job_id)
    return rejected


def test_every_dashboard_query_answers_from_a_real_prometheus(
    make_stack: Callable[..., Stack],
    prometheus_factory: Callable[[dict[str, Any]], Prometheus],
) -> None:
    stack = make_stack(
        MAAS_SAMPLE_INTERVAL_S="1",
        MAAS_METRICS_PORT="0",
        MAAS_MODEL_DIR=str(Settings.from_env({}).model_dir),  # the bundled digits model
        MAAS_AUTOSCALE_MAX_CPU_PCT="100",
        MAAS_AUTOSCALE_MAX_MEMORY_PCT="100",
    )
    ports = {"p1": free_port(), "p2": free_port(), "fleet": free_port()}
    services: list[Service] = []
    try:
        workers: list[WorkerProcess] = [
            start_worker(
                stack,
                "p1",
                extra_args=("--autoscale", "1,1"),
                env={"MAAS_METRICS_PORT": str(ports["p1"])},
            ),
            # Celery tasks, as p1 (--autoscale implies them): the backlog below
            # relies on Celery's pool taking one message per free process.
            start_worker(
                stack,
                "p2",
                extra_args=("--celery-tasks",),
                env={"MAAS_METRICS_PORT": str(ports["p2"])},
            ),
        ]
        services.append(Service(stack, "beat", "beat", "--loglevel", "WARNING"))
        services.append(Service(stack, "exporter", "metrics", "--port", str(ports["fleet"])))
        prom = prometheus_factory(
            derived_config(
                yaml.safe_load(SHIPPED.read_text()),
                {
                    "maas-worker": [f"127.0.0.1:{ports['p1']}", f"127.0.0.1:{ports['p2']}"],
                    "maas-fleet": [f"127.0.0.1:{ports['fleet']}"],
                },
            )
        )

        def targets_up() -> bool:
            active = prom.api("targets")["activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active)

        wait_for(targets_up, WAIT_S, "Prometheus to scrape both workers and the exporter")
        # the zeros every worker declares are scraped before the first job: each
        # job below is an increase rate() sees
        wait_for(
            lambda: len(prom.query('maas_jobs_total{outcome="rejected",reason="policy"}')) == 2,
            WAIT_S,
            "the declared outcome series of both workers",
        )

        attacker = Attacker(stack)
        rejected: list[str] = []
        # Two rounds, each counted by Prometheus before the next: the totals are
        # checked as they grow, not only at the end.
        for _ in range(2):
            rejected += _jobs_round(stack, attacker)
            done = len(rejected) // 2
            expected = {
                "succeeded": SUCCEEDED * done,
                "failed": FAILED * done,
                "rejected": 2 * done,
            }
            wait_for(
                lambda e=expected: (
                    {
                        k: v
                        for k, v in prom.values(
                            "sum by (outcome) (maas_jobs_total)", "outcome"
                        ).items()
                        if v
                    }
                    == e
                ),
                WAIT_S,
                f"Prometheus to count the jobs {expected}",
            )

        # A queue entry that is not a message at all: refused (and audited) by the
        # worker's main process before it becomes a job, so it is a refusal and
        # not a job outcome.
        attacker.push_raw("normal", ["not", "a", "message"])  # type: ignore[arg-type]
        wait_for(
            lambda: (
                prom.values("sum by (reason) (maas_refusals_total)", "reason").get("malformed") == 1
            ),
            WAIT_S,
            "the refused entry counted in Prometheus",
        )
        assert any(r.reason == "malformed" for r in stack.audit())

        # A backlog: long jobs occupy both workers' single process (and their
        # one prefetched message each), so the low-priority jobs wait.
        client = stack.client()
        for _ in range(4):
            client.submit("sleep", {"seconds": 60}, priority="high")
        for i in range(BACKLOG_LOW):
            client.submit("echo", {"i": i}, priority="low")
        wait_for(
            lambda: (
                prom.values("maas_queue_depth", "priority").get("low") == BACKLOG_LOW
                and prom.values("maas_queue_oldest_age_seconds", "priority").get("low", 0) > 0
            ),
            WAIT_S,
            "the backlog in Prometheus",
        )
        nodes = {w.node for w in workers}
        wait_for(
            lambda: (
                set(prom.values("maas_worker_cpu_percent", "worker")) == nodes
                and set(prom.values("maas_worker_jobs_per_second", "worker")) == nodes
            ),
            WAIT_S,
            "both workers' samples in Prometheus",
        )

        # Every expression of every panel, for all nodes and for one.
        window_s = math.ceil(time.monotonic() - prom.started) + 5
        answers: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        one = workers[0].node
        for node_value in (".*", grafana_regex(one)):
            for title, ref, expr in dashboard_targets():
                query = substitute(expr, node=node_value, window_s=window_s)
                answers[(title, ref, node_value)] = prom.query(query)  # asserts success
    finally:
        for svc in services:
            svc.stop()
        # The workers are busy with minute-long jobs only there to hold the
        # backlog: nothing is at stake, so do not wait for a warm shutdown.
        for w in stack.workers:
            w.kill()
            if w.proc is not None:  # a killed worker leaves its metrics directory
                for left in Path(tempfile.gettempdir()).glob(f"maas-metrics-{w.proc.pid}-*"):
                    shutil.rmtree(left, ignore_errors=True)

    def answer(title: str, ref: str = "A", node: str = ".*") -> dict[str, float]:
        """{its labels but the target's, joined: value} of one target's answer."""
        return {
            ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in TARGET): float(
                r["value"][1]
            )
            for r in answers[(title, ref, node)]
        }

    titles = {t for t, _, _ in dashboard_targets()}
    for (title, ref, node), result in answers.items():
        if title not in MAY_BE_EMPTY:
            assert result, f"{title} {ref} (node {node}) answered nothing"
        for r in result:
            value = float(r["value"][1])
            # A quantile or mean of a model no job used in the window is NaN (0/0),
            # which Grafana leaves out; the models the test fed are checked below.
            assert value >= 0 or (title in LATENCY and math.isnan(value)), (title, ref, r)

    # job counts by outcome and reason: exactly what the test produced
    # (the other outcome and reason series are there at 0: declared by the workers)
    finished = {k: v for k, v in answer("Jobs finished by outcome and reason").items() if v}
    assert finished == {
        "outcome=succeeded,reason=none": 2 * SUCCEEDED,
        "outcome=failed,reason=bad_input": 2 * FAILED,
        "outcome=rejected,reason=policy": 2.0,
        "outcome=rejected,reason=expired": 2.0,
    }
    rates = answer("Job rate by outcome")
    for outcome in ("succeeded", "failed", "rejected"):
        assert rates[f"outcome={outcome}"] > 0, (outcome, rates)
    assert answer("Failures by code")["reason=bad_input"] > 0
    refusals = answer("Refusals by audit reason")
    assert refusals["reason=policy"] > 0 and refusals["reason=expired"] > 0
    assert {k for k, v in refusals.items() if v} == {
        "reason=policy",
        "reason=expired",
        "reason=malformed",
    }
    # queue depth and age per priority
    depth = answer("Queue depth per priority")
    assert depth["priority=low"] == BACKLOG_LOW
    assert set(depth) == {"priority=high", "priority=normal", "priority=low"}
    oldest = answer("Oldest waiting job per priority")
    assert 0 < oldest["priority=low"] < window_s
    assert answer("Worker nodes", "A")[""] == 2  # current nodes
    assert answer("Worker nodes", "C")[""] == 1  # the exporter reads Redis
    # latency: plausible seconds
    for ref in ("A", "B", "C"):
        (wait,) = answer("Queue wait", ref).values()
        assert 0 <= wait < WAIT_S, (ref, wait)
    run = answer("Run time by model")
    fed = {"model=echo", "model=sleep", "model=digits"}  # the references the jobs named
    assert fed <= set(run)
    assert all(0 <= run[m] < 5 for m in fed), run
    mean = answer("Run time by model", "B")
    assert all(0 <= mean[m] < 5 for m in fed), mean
    load = answer("Model load time")
    assert any(k.startswith("model=digits@") for k in load)
    assert all(0 < v < 30 for v in load.values()), load
    # per worker CPU and memory, all nodes and one
    cpu = answer("CPU per worker")
    assert set(cpu) == {f"worker={n}" for n in nodes}
    assert all(0 <= v <= 100 for v in cpu.values())
    assert set(answer("CPU per worker", node=grafana_regex(one))) == {f"worker={one}"}
    memory = answer("Memory per worker")
    assert all(0 < v <= 100 for k, v in memory.items() if "swap" not in k)
    assert all(v > 0 for v in answer("Pool memory per worker").values())
    assert set(answer("Pool processes per worker", "B")) == {f"worker={one}"}  # autoscaled
    assert all(0 <= v < WAIT_S for v in answer("Sample age per worker").values())
    up = answers[("Scrape targets up", "A", ".*")]
    assert sorted(r["metric"]["job"] for r in up) == ["maas-fleet", "maas-worker", "maas-worker"]
    assert {r["value"][1] for r in up} == {"1"}
    assert titles >= {"Queue depth per priority", "CPU per worker", "Refusals by audit reason"}
