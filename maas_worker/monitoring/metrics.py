"""Prometheus metrics of a worker node: jobs by outcome, queue wait, run and load times.

Jobs run in prefork pool children that come and go, so metrics use prometheus_client's
multiprocess mode (docs/monitoring.md, "Aggregating pool processes"):

- the worker's main process makes a PRIVATE directory (mode 0700) before the pool forks
  and points ``PROMETHEUS_MULTIPROC_DIR`` at it; every child (and the main process
  itself with ``--pool solo``) writes its own memory-mapped files;
- the main process serves ``/metrics`` (`serve`), summing the files of all processes,
  so the counters of a child that exited are not lost;
- files of dead children are folded into ``*_archive.db`` at each scrape
  (`compact_dead_files`). Folding and reading hold one lock (a thread lock and an
  ``flock``), so no scrape ever sees a value twice or not at all.

Invariants: children write only counters and histograms (their sums across processes
are meaningful); gauges of the node come from the main process at scrape time. Labels
are drawn from closed sets (outcomes, audit reasons, failure codes, model references
the registry resolved): nothing from a payload can reach a label.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil

from maas_worker.protocol import AuditReason, FailureCode, Outcome

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LOCK_NAME = ".lock"
#: Private directories are named maas-metrics-<pid of the worker>-<random>.
_DIR_PREFIX = "maas-metrics-"
_ARCHIVE = "archive"

#: Job outcomes as the pipeline reports them (tasks.process, the batch consumer) besides rejections.
OUTCOMES: frozenset[str] = frozenset(Outcome)
#: Audit reasons: a job refused for one of these counts as outcome ``rejected``
#: (``model_rejected`` is a model's, never a job's).
REJECT_REASONS: frozenset[str] = frozenset(AuditReason) - {AuditReason.MODEL_REJECTED}
#: Every audit reason, ``model_rejected`` included: the labels of ``maas_refusals_total``.
AUDIT_REASONS: frozenset[str] = frozenset(AuditReason)
_LABEL_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

QUEUE_WAIT_BUCKETS_S = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
RUN_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
LOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: name -> (type, help): every family a worker's endpoint exposes (docs/monitoring.md).
WORKER_FAMILIES: dict[str, tuple[str, str]] = {
    "maas_jobs": ("counter", "Jobs finished by this worker node, by outcome and reason"),
    "maas_job_queue_wait_seconds": (
        "histogram",
        "Time from submission (envelope issued-at) to the model starting",
    ),
    "maas_job_run_seconds": ("histogram", "Time the model spent on one job"),
    "maas_model_load_seconds": ("histogram", "Time to load (verify, decrypt, open) a model"),
    "maas_job_busy_seconds": (
        "counter",
        "Time pool processes spent in maas.infer tasks (for capacity estimates)",
    ),
    "maas_refusals": (
        "counter",
        "Messages, commands and model versions this worker node refused, by audit reason",
    ),
}
AUTOSCALER_FAMILIES: dict[str, str] = {
    "maas_autoscaler_pool_size": "Pool processes now",
    "maas_autoscaler_desired_pool_size": "Pool processes the autoscaler wants",
    "maas_autoscaler_min_pool_size": "Lower bound of --autoscale",
    "maas_autoscaler_max_pool_size": "Upper bound of --autoscale",
}


# -- recording (pool children, or the main process with --pool solo) ------------------------------
class _JobMetrics:
    """The metric objects, made on first use so they pick up the multiprocess mode."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.jobs = Counter(
            "maas_jobs", WORKER_FAMILIES["maas_jobs"][1], ["outcome", "reason"], registry=None
        )
        self.queue_wait = Histogram(
            "maas_job_queue_wait_seconds",
            WORKER_FAMILIES["maas_job_queue_wait_seconds"][1],
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=None,
        )
        self.run = Histogram(
            "maas_job_run_seconds",
            WORKER_FAMILIES["maas_job_run_seconds"][1],
            ["model"],
            buckets=RUN_BUCKETS_S,
            registry=None,
        )
        self.load = Histogram(
            "maas_model_load_seconds",
            WORKER_FAMILIES["maas_model_load_seconds"][1],
            ["model"],
            buckets=LOAD_BUCKETS_S,
            registry=None,
        )
        self.busy = Counter(
            "maas_job_busy_seconds", WORKER_FAMILIES["maas_job_busy_seconds"][1], registry=None
        )
        self.refusals = Counter(
            "maas_refusals", WORKER_FAMILIES["maas_refusals"][1], ["reason"], registry=None
        )


_metrics: _JobMetrics | None = None
_metrics_lock = threading.Lock()
#: job id -> failure code, set while a model runs, read when the job's outcome is known.
_failures: dict[str, str] = {}
_MAX_PENDING = 256
#: task id -> monotonic start, for busy time.
_started: dict[str, float] = {}


def _m() -> _JobMetrics:
    global _metrics  # noqa: PLW0603 -- per process: each writes its own metric files
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _JobMetrics()
    return _metrics


def _label(value: str) -> str:
    return value if _LABEL_RE.fullmatch(value) else "other"


class _Header(Protocol):
    """The verified envelope header fields metrics use (envelope.Header)."""

    @property
    def job_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def issued_at_ms(self) -> int: ...


class _Model(Protocol):
    def predict(self, inputs: Any) -> dict[str, Any]: ...


def timed_predict(header: _Header, model: _Model, inputs: Any) -> dict[str, Any]:
    """``model.predict(inputs)``, recording the job's queue wait and run time.

    ``header`` must be verified (its model reference resolved by the registry):
    the model becomes a label. An exception passes through unchanged; its kind
    is remembered as the job's failure reason for `job_finished`.
    """
    ref = header.model
    _safely(
        lambda: (
            _m().queue_wait.labels(ref).observe(max(0.0, time.time() - header.issued_at_ms / 1000))
        )
    )
    start = time.perf_counter()
    try:
        return model.predict(inputs)
    except BaseException as exc:
        reason = getattr(exc, "reason", None)
        _remember_failure(header.job_id, reason if isinstance(reason, str) else "internal_error")
        raise
    finally:
        elapsed = time.perf_counter() - start
        _safely(lambda: _m().run.labels(ref).observe(elapsed))


class _BatchModel(Protocol):
    def predict_batch(self, batch: list[Any]) -> list[Any]: ...


def timed_predict_batch(
    headers: Sequence[_Header], model: _BatchModel, inputs: list[Any]
) -> list[Any]:
    """``model.predict_batch(inputs)`` for the jobs of ``headers``, recording each job.

    Every job's queue wait is recorded, and as its run time the time of the
    shared call. A job whose output is an error (or every job, if the call
    raises) has its failure reason remembered for `job_finished`.
    """
    now = time.time()
    waits = [(h.model, max(0.0, now - h.issued_at_ms / 1000)) for h in headers]
    _safely(lambda: _observe_all(_m().queue_wait, waits))
    start = time.perf_counter()
    try:
        outputs = model.predict_batch(inputs)
    except BaseException as exc:
        for header in headers:
            _remember_failure(header.job_id, _reason_of(exc))
        raise
    finally:
        elapsed = time.perf_counter() - start
        _safely(lambda: _observe_all(_m().run, [(h.model, elapsed) for h in headers]))
    for header, out in zip(headers, outputs, strict=True):
        if isinstance(out, Exception):
            _remember_failure(header.job_id, _reason_of(out))
    return outputs


def _observe_all(histogram: Any, values: list[tuple[str, float]]) -> None:
    for ref, value in values:
        histogram.labels(ref).observe(value)


def _reason_of(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else "internal_error"


def add_busy(seconds: float) -> None:
    """Add time spent on jobs by a process outside Celery's tasks (the batch consumer)."""
    _safely(lambda: _m().busy.inc(seconds))


def _safely(record: Callable[[], None]) -> None:
    # Metrics must never fail a job: a full disk or a broken file costs a sample.
    try:
        record()
    except Exception:
        log.debug("job metrics unavailable", exc_info=True)


def _remember_failure(job_id: str, reason: str) -> None:
    if len(_failures) >= _MAX_PENDING:
        _failures.clear()  # jobs that never reported an outcome; do not grow
    _failures[job_id] = _label(reason)


def outcome_labels(outcome: str, failure: str | None = None) -> tuple[str, str]:
    """(outcome, reason) labels for a pipeline outcome; both from closed sets."""
    if outcome in REJECT_REASONS:
        return "rejected", outcome
    if outcome == "failed":
        return "failed", failure or "unknown"
    if outcome in OUTCOMES:
        return outcome, "none"
    return "other", _label(outcome)


def job_finished(job_id: str, outcome: str) -> None:
    """Count one job's outcome (called where the task logs it)."""
    labels = outcome_labels(outcome, _failures.pop(job_id, None))
    _safely(lambda: _m().jobs.labels(*labels).inc())


def refused(reason: str) -> None:
    """Count one audit record of this process (`AuditLog`'s ``on_record`` hook).

    Every refusal a worker audits passes here, wherever it happens: the
    pipeline's (also counted in ``maas_jobs_total`` as ``rejected``), the queue
    entry check's and the remote-control gate's in the main process (which never
    become a job), and refused model versions (``model_rejected``). The label
    is the audit reason, a closed set; anything else counts as ``other``.
    """
    label = reason if reason in AUDIT_REASONS else "other"
    _safely(lambda: _m().refusals.labels(label).inc())


#: Failure codes a failed job is counted under from the start (others appear when first seen):
#: the worker's own (`FailureCode`), the diagnostic and bundled models' ``bad_input``, and
#: ``unknown`` (`outcome_labels`).
DECLARED_FAILURES: frozenset[str] = frozenset(FailureCode) | {"bad_input", "unknown"}


def declare_series() -> None:
    """Create every outcome and refusal series of the closed sets at 0 (worker main process).

    A labelled counter otherwise appears only at its first increment, and
    Prometheus' ``rate()`` and ``increase()`` count nothing for a series's first
    sample: the first job rejected as ``tampered`` on a node would never show
    on a rate panel. Declared in the main process once its metrics directory
    exists, the zeros are on the first scrape and every later increment (in any
    pool process) is a visible increase. About 30 series, all from closed sets.
    """

    def declare() -> None:
        m = _m()
        for outcome in sorted(OUTCOMES - {Outcome.FAILED}):
            m.jobs.labels(outcome, "none")
        for reason in sorted(REJECT_REASONS):
            m.jobs.labels("rejected", reason)
        for code in sorted(DECLARED_FAILURES):
            m.jobs.labels("failed", code)
        for reason in sorted(AUDIT_REASONS):
            m.refusals.labels(reason)

    _safely(declare)


def declare_models(refs: Iterable[str]) -> None:
    """Create the queue-wait and run-time series of each served model reference at 0.

    Called with the references the worker serves (every ``name`` and
    ``name@version`` the registry lists, the labels a job of it is recorded
    under), for the reason `declare_series` gives. Model loads are not declared:
    they are rare, and the dashboard reads them over all time, not as a rate.
    """

    def declare() -> None:
        m = _m()
        for ref in refs:
            m.queue_wait.labels(ref)
            m.run.labels(ref)

    _safely(declare)


def observe_model_load(model_ref: str, seconds: float) -> None:
    """Record how long loading ``model_ref`` (a verified, registered reference) took."""
    _safely(lambda: _m().load.labels(model_ref).observe(seconds))


def task_started(task_id: str) -> None:
    """A ``maas.infer`` task starts in this process (Celery's task_prerun)."""
    if len(_started) >= _MAX_PENDING:
        _started.clear()
    _started[task_id] = time.monotonic()


def task_ended(task_id: str) -> None:
    """A ``maas.infer`` task ended in this process (Celery's task_postrun)."""
    start = _started.pop(task_id, None)
    if start is not None:
        elapsed = time.monotonic() - start
        _safely(lambda: _m().busy.inc(elapsed))


# -- the multiprocess directory (worker main process) -----------------------------------------
def init_multiprocess_dir() -> Path:
    """Create this worker's private metrics directory and enable multiprocess mode.

    Must run in the worker's main process before the pool forks; children
    inherit the environment variable. The caller owns the directory and
    removes it with `remove_multiprocess_dir` (worker/node.py).
    """
    _sweep_stale_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
    path.chmod(0o700)
    Path(path, _LOCK_NAME).touch(mode=0o600)
    os.environ[MULTIPROC_ENV] = str(path)
    _enable_multiprocess_values()
    return path


def _sweep_stale_dirs() -> None:
    """Remove directories left by workers that were killed (no shutdown hook ran)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        with contextlib.suppress(OSError):
            if (
                pid.isdigit()
                and not psutil.pid_exists(int(pid))
                and path.stat().st_uid == os.getuid()
            ):
                shutil.rmtree(path, ignore_errors=True)


def _enable_multiprocess_values() -> None:
    # prometheus_client picks its value class when first imported; if anything
    # imported it before the directory existed, pick again (metrics made
    # afterwards, i.e. all of ours, then write to the directory).
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        get_value_class: Any = values.get_value_class  # untyped upstream
        values.ValueClass = get_value_class()


def remove_multiprocess_dir(path: Path) -> None:
    """Delete the metrics directory `init_multiprocess_dir` made (worker shutdown)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]


def multiprocess_dir() -> Path | None:
    """The metrics directory of this worker, if this process belongs to one."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path and Path(path).is_dir() else None


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    with open(path / _LOCK_NAME, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_our_live_process(pid: int) -> bool:
    me = os.getpid()
    if pid == me:
        return True
    try:
        proc = psutil.Process(pid)
        return bool(proc.ppid() == me and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def compact_dead_files(
    path: Path,
    *,
    alive: Callable[[int], bool] = _is_our_live_process,
) -> int:
    """Fold the files of exited processes into ``*_archive.db``; returns how many.

    Caller holds the directory lock. Counter and histogram values add up per
    key, so the sums a scrape reports are unchanged by folding.
    """
    from prometheus_client import mmap_dict

    mmaped_dict: Any = mmap_dict.MmapedDict  # untyped upstream
    folded = 0
    for f in sorted(path.glob("*.db")):
        typ, _, pid = f.stem.partition("_")
        if typ not in ("counter", "histogram") or not pid.isdigit() or alive(int(pid)):
            continue
        archive = mmaped_dict(str(path / f"{typ}_{_ARCHIVE}.db"))
        try:
            for key, value, _ts, _pos in mmaped_dict.read_all_values_from_file(str(f)):
                old, _ = archive.read_value(key)
                archive.write_value(key, old + value, 0.0)
        finally:
            archive.close()
        f.unlink()
        folded += 1
    return folded


def read_families(path: Path, *, compact: bool = False) -> list[Any]:
    """Every metric family in ``path``, summed over processes (optionally folding first)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    merge: Any = MultiProcessCollector.merge  # untyped upstream
    with _dir_lock(path):
        if compact:
            compact_dead_files(path)
        return list(merge([str(p) for p in path.glob("*.db")], accumulate=True))


def local_job_totals() -> tuple[float, float] | None:
    """(jobs finished, busy seconds) of this worker node so far; None outside a worker."""
    path = multiprocess_dir()
    if path is None:
        return None
    jobs = busy = 0.0
    for family in read_families(path):
        for s in family.samples:
            if s.name == "maas_jobs_total":
                jobs += s.value
            elif s.name == "maas_job_busy_seconds_total":
                busy += s.value
    return jobs, busy


# -- exposition --------------------------------------------------------------------------------
PoolState = Callable[[], "dict[str, int] | None"]


class WorkerCollector:
    """What a worker node's ``/metrics`` shows: its job metrics and its autoscaler."""

    def __init__(self, path: Path, node: str, pool_state: PoolState | None = None) -> None:
        self.path = path
        self.node = node
        self.pool_state = pool_state
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Any]:
        """Families for one scrape (prometheus_client collector protocol)."""
        from prometheus_client.core import GaugeMetricFamily, Metric

        with self._lock:
            families = read_families(self.path, compact=True)
        seen = {f.name for f in families}
        yield from families
        for name, (typ, text) in WORKER_FAMILIES.items():
            if name not in seen:  # documented names are present before the first job
                yield Metric(name, text, typ)
        state = self.pool_state() if self.pool_state is not None else None
        if state is not None:
            for key, name in (
                ("current", "maas_autoscaler_pool_size"),
                ("desired", "maas_autoscaler_desired_pool_size"),
                ("min", "maas_autoscaler_min_pool_size"),
                ("max", "maas_autoscaler_max_pool_size"),
            ):
                g = GaugeMetricFamily(name, AUTOSCALER_FAMILIES[name], labels=["worker"])
                g.add_metric([self.node], state[key])
                yield g


def serve(collector: Any, *, port: int, address: str) -> Any | None:
    """Serve ``collector`` on http://address:port/metrics in a daemon thread.

    Returns the server (``shutdown()`` stops it), or None when the port is 0 or
    taken: metrics are never a reason for a worker not to run.
    """
    if port == 0:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, address, registry)
    except OSError as exc:
        log.warning(
            "metrics endpoint %s:%d unavailable (%s); continuing without it",
            address,
            port,
            exc.strerror or type(exc).__name__,
        )
        return None
    log.info("metrics on http://%s:%d/metrics", address, port)
    return server
