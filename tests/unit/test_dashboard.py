"""The Grafana dashboard and its provisioning, checked without Grafana (docker/grafana/).

Grafana is not installable here; what would break it on load is checked: the JSON
parses, every panel has a data source Grafana provisions, targets with queries, a
unit, an id no other panel has, and every metric a query names is one the code
exposes (the names in docs/monitoring.md's tables, which
tests/integration/test_monitoring.py holds equal to what the endpoints serve). The
queries themselves run against a real Prometheus in
tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from maas_worker.monitoring import metrics
from maas_worker.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "maas-worker.json"
DOCS = ROOT / "docs" / "monitoring.md"
#: Series Prometheus makes itself, not any endpoint.
PROMETHEUS_SERIES = {"up"}
#: PromQL words that look like metric names in a query but are not.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "label_values",
    "le",
}


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that is not a row, rows' own nested panels included."""
    out = []
    for p in doc["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def exprs(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(doc) for t in p["targets"]]


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(maas_[a-z0-9_]+)`", DOCS.read_text(), re.MULTILINE))


def series_names(family: str, typ: str) -> set[str]:
    """The series names Prometheus stores for one family of ``typ``."""
    if typ == "counter":
        return {f"{family}_total"}
    if typ == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


def test_the_dashboard_is_identified_and_templated() -> None:
    doc = dashboard()
    assert doc["uid"] == "maas-worker"
    assert doc["title"] == "maas-worker"
    assert isinstance(doc["schemaVersion"], int)
    (node,) = doc["templating"]["list"]
    assert node["name"] == "node" and node["type"] == "query"
    assert node["includeAll"] and node["multi"] and node["allValue"] == ".*"
    assert "label_values(maas_worker_cpu_percent, worker)" in json.dumps(node["query"])


def test_every_panel_has_a_provisioned_datasource_targets_a_unit_and_a_unique_id() -> None:
    doc = dashboard()
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = source["datasources"]
    assert (ds["type"], ds["url"]) == ("prometheus", "http://prometheus:9090")
    ids = [p["id"] for p in doc["panels"]] + [
        p["id"] for p in panels(doc) if p not in doc["panels"]
    ]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert len(panels(doc)) >= 15
    for p in panels(doc):
        where = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, where
        assert p["targets"], where
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], where
            assert t["expr"].strip(), where
        assert p["fieldConfig"]["defaults"]["unit"], f"{where} has no unit"
        assert p.get("description"), f"{where} says what it shows"
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    queries = "\n".join(exprs(dashboard()))
    for metric in (
        "maas_worker_cpu_percent",  # per worker CPU and memory
        "maas_worker_memory_used_percent",
        "maas_queue_depth",  # queue depth and age per priority
        "maas_queue_oldest_age_seconds",
        "maas_jobs_total",  # job rates by outcome
        "maas_refusals_total",  # refusals by reason
        "maas_job_queue_wait_seconds_bucket",  # latency
        "maas_job_run_seconds_bucket",
    ):
        assert metric in queries, metric
    assert "sum by (outcome) (rate(maas_jobs_total[$__rate_interval]))" in queries
    assert "sum by (reason) (rate(maas_refusals_total[$__rate_interval]))" in queries
    assert 'worker=~"$node"' in queries


def test_every_metric_a_query_names_is_one_the_code_exposes() -> None:
    documented = documented_metrics()
    # The worker's families are in the docs' tables under the names Prometheus shows.
    worker_series = {
        name
        for family, (typ, _) in metrics.WORKER_FAMILIES.items()
        for name in series_names(family, typ)
    }
    assert {n for n in worker_series if not n.endswith(("_bucket", "_sum", "_count"))} | {
        n.rsplit("_", 1)[0] for n in worker_series if n.endswith("_bucket")
    } <= documented
    known = documented | worker_series | set(metrics.AUTOSCALER_FAMILIES) | PROMETHEUS_SERIES
    for expr in exprs(dashboard()):
        body = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
        body = re.sub(r"\{[^}]*\}", "", body)  # nor label names
        body = re.sub(r"\[[^]]*\]", "", body)  # nor range selectors
        body = re.sub(r"by \([^)]*\)", "", body)  # nor grouping labels
        names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", body)) - PROMQL_WORDS
        assert names, expr
        assert names <= known, f"{expr}: unknown metric {names - known}"


def test_provisioning_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/maas-worker.yaml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == p["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_the_scrape_config_uses_the_default_ports() -> None:
    config = yaml.safe_load((ROOT / "docker/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Settings.from_env({})
    assert jobs["maas-worker"]["dns_sd_configs"][0]["port"] == defaults.metrics_port
    assert jobs["maas-fleet"]["static_configs"][0]["targets"] == [
        f"metrics:{defaults.fleet_metrics_port}"
    ]
