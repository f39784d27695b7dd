"""Worker metrics: outcome labels, timing, and multiprocess aggregation across pool children."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest

from maas_worker.errors import ModelError
from maas_worker.monitoring import metrics


@pytest.mark.parametrize(
    ("outcome", "failure", "labels"),
    [
        ("succeeded", None, ("succeeded", "none")),
        ("failed", "bad_input", ("failed", "bad_input")),
        ("failed", None, ("failed", "unknown")),
        ("tampered", None, ("rejected", "tampered")),
        ("rate_limited", None, ("rejected", "rate_limited")),
        ("duplicate", None, ("duplicate", "none")),
        ("cancelled", None, ("cancelled", "none")),
        ("something_new", None, ("other", "something_new")),
        ("Not A Label {x}", None, ("other", "other")),
    ],
)
def test_outcome_labels_come_from_closed_sets(
    outcome: str, failure: str | None, labels: tuple[str, str]
) -> None:
    assert metrics.outcome_labels(outcome, failure) == labels


@dataclass(frozen=True)
class FakeHeader:
    job_id: str
    model: str
    issued_at_ms: int


class Boom:
    def predict(self, inputs: Any) -> dict[str, Any]:
        raise ModelError("bad shape", reason="bad_input")


class Fine:
    def predict(self, inputs: Any) -> dict[str, Any]:
        return {"echo": inputs}


def _count(outcome: str, reason: str) -> float:
    return float(metrics._m().jobs.labels(outcome, reason)._value.get())


def test_timed_predict_returns_and_records_the_failure_reason() -> None:
    header = FakeHeader("job-t1", "echo@1", 0)
    assert metrics.timed_predict(header, Fine(), {"a": 1}) == {"echo": {"a": 1}}
    before = _count("failed", "bad_input")
    with pytest.raises(ModelError):
        metrics.timed_predict(FakeHeader("job-t2", "echo@1", 0), Boom(), {})
    metrics.job_finished("job-t2", "failed")
    assert _count("failed", "bad_input") == before + 1
    assert "job-t2" not in metrics._failures


AGGREGATE = textwrap.dedent("""
    import json, os, sys
    from maas_worker.monitoring import metrics

    path = metrics.init_multiprocess_dir()      # as the worker's main process does

    def child(n):
        pid = os.fork()
        if pid == 0:                            # a pool child: jobs, then exit
            for i in range(n):
                metrics.job_finished(f"j{i}", "succeeded")
                metrics.task_started(f"j{i}")
                metrics.task_ended(f"j{i}")
            metrics._m().run.labels("echo@1").observe(0.02)
            os._exit(0)
        os.waitpid(pid, 0)

    def totals():
        jobs = runs = 0.0
        for fam in metrics.read_families(path, compact=True):
            for s in fam.samples:
                if s.name == "maas_jobs_total":
                    jobs += s.value
                if s.name == "maas_job_run_seconds_count":
                    runs += s.value
        return jobs, runs

    for n in (3, 4, 5):
        child(n)
    first = totals()
    files = sorted(p.name for p in path.glob("*.db"))
    child(2)                                    # autoscaling: a new child, later
    second = totals()
    files_after = sorted(p.name for p in path.glob("*.db"))
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry()
    reg.register(metrics.WorkerCollector(path, "w@h", lambda: {"current": 1, "desired": 3,
                                                               "min": 1, "max": 3}))
    text = generate_latest(reg).decode()
    metrics.remove_multiprocess_dir(path)
    print(json.dumps({"first": first, "second": second, "files": files,
                      "files_after": files_after, "gone": not path.exists(), "text": text}))
""")


def test_children_that_exit_are_folded_and_nothing_is_lost() -> None:
    out = subprocess.run(
        [sys.executable, "-c", AGGREGATE], capture_output=True, text=True, timeout=60, check=True
    )
    doc = json.loads(out.stdout)
    assert doc["first"] == [12.0, 3.0]
    assert doc["second"] == [14.0, 4.0]
    # three dead children's files folded into one archive per type: bounded
    assert doc["files"] == ["counter_archive.db", "histogram_archive.db"]
    assert doc["files_after"] == ["counter_archive.db", "histogram_archive.db"]
    assert doc["gone"]
    text = doc["text"]
    assert 'maas_jobs_total{outcome="succeeded",reason="none"} 14.0' in text
    assert 'maas_autoscaler_desired_pool_size{worker="w@h"} 3.0' in text
    for name, (typ, _) in metrics.WORKER_FAMILIES.items():  # present before any data
        exposed = f"{name}_total" if typ == "counter" else name
        assert f"# TYPE {exposed} {typ}" in text


def test_an_empty_directory_still_lists_every_family(tmp_path: Any) -> None:
    (tmp_path / ".lock").touch()
    names = {f.name for f in metrics.WorkerCollector(tmp_path, "w@h").collect()}
    assert set(metrics.WORKER_FAMILIES) <= names


DECLARED = textwrap.dedent("""
    import json, os
    from maas_worker.monitoring import metrics

    path = metrics.init_multiprocess_dir()      # the worker's main process ...
    metrics.declare_series()                    # ... declares before the pool forks
    metrics.declare_models(["echo", "digits", "digits@2"])
    pid = os.fork()
    if pid == 0:                                # a pool child refuses two jobs
        metrics.refused("policy")
        metrics.refused("policy")
        metrics.job_finished("j1", "policy")
        metrics.refused("not-an-audit-reason")
        os._exit(0)
    os.waitpid(pid, 0)
    metrics.refused("malformed")                # the main process's entry check
    series = {}
    for fam in metrics.read_families(path, compact=True):
        for s in fam.samples:
            if s.name in ("maas_jobs_total", "maas_refusals_total") or (
                s.name == "maas_job_run_seconds_count"
            ):
                key = s.name + json.dumps(s.labels, sort_keys=True)
                series[key] = series.get(key, 0) + s.value
    metrics.remove_multiprocess_dir(path)
    print(json.dumps(series))
""")


def test_outcome_refusal_and_model_series_are_declared_at_zero_and_counted() -> None:
    out = subprocess.run(
        [sys.executable, "-c", DECLARED], capture_output=True, text=True, timeout=60, check=True
    )
    series = json.loads(out.stdout)

    def value(name: str, **labels: str) -> float:
        return float(series[name + json.dumps(labels, sort_keys=True)])

    # every audit reason, every rejection and the closed outcomes exist before any job
    for reason in metrics.AUDIT_REASONS:
        assert f'maas_refusals_total{{"reason": "{reason}"}}' in series
    for reason in metrics.REJECT_REASONS:
        assert f'maas_jobs_total{{"outcome": "rejected", "reason": "{reason}"}}' in series
    for outcome in ("succeeded", "cancelled", "duplicate", "finished"):
        assert value("maas_jobs_total", outcome=outcome, reason="none") == 0
    for code in ("bad_input", "timeout", "internal_error", "unknown"):
        assert value("maas_jobs_total", outcome="failed", reason=code) == 0
    for ref in ("echo", "digits", "digits@2"):
        assert value("maas_job_run_seconds_count", model=ref) == 0
    # increments in a child and in the main process add up on the declared series
    assert value("maas_refusals_total", reason="policy") == 2
    assert value("maas_refusals_total", reason="malformed") == 1
    assert value("maas_refusals_total", reason="other") == 1  # never the raw text
    assert value("maas_jobs_total", outcome="rejected", reason="policy") == 1
    assert value("maas_refusals_total", reason="tampered") == 0
    # bounded: the closed sets and nothing else
    assert len([k for k in series if k.startswith("maas_refusals_total")]) == (
        len(metrics.AUDIT_REASONS) + 1
    )
