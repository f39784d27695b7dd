"""How many worker nodes the fleet needs: ``maas-worker scale`` and ``maas_fleet_desired_nodes``.

Backlog-per-node target tracking, computed from live readings each time it is asked
(docs/monitoring.md, "Autoscaling the fleet", explains the choice):

- ``capacity``: jobs per second one node clears when its pool is fully busy,
  measured from the nodes' samples (jobs finished per second divided by the
  fraction of the pool that was busy, over the last sample interval);
- ``keep up``: nodes needed for the jobs now finishing per second, i.e.
  throughput / capacity;
- ``drain``: nodes needed to clear the queued backlog within the target wait
  (``MAAS_FLEET_TARGET_WAIT_S``): backlog / (capacity x target wait). Before
  anything is measured a node is assumed to clear ``MAAS_FLEET_BACKLOG_PER_NODE``
  jobs per target wait;
- ``age``: if the oldest queued job has already waited longer than the target,
  the estimate is evidently short: at least one node more than now;
- within 10% of the current size (`TOLERANCE`), the current size;
- clamped to ``MAAS_FLEET_MIN_NODES`` .. ``MAAS_FLEET_MAX_NODES``, and at least
  one node while anything is queued.

There is deliberately no smoothing: a consumer (KEDA/HPA, a cron running
``docker compose up --scale``) adds its own stabilisation window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from maas_worker.backend.catalog import live_nodes
from maas_worker.broker.backlog import Backlog, broker_client, read_backlog
from maas_worker.monitoring.samples import SampleStore
from maas_worker.settings import FleetPolicy, Settings

#: Below this busy fraction a node's throughput says little about its capacity.
MIN_BUSY_FRACTION = 0.05
#: Within this ratio of the current size the fleet is left as it is (as the
#: Kubernetes HPA's default tolerance): a saturated node with a trickle of
#: backlog needs no second node, and a reading's noise moves nothing.
TOLERANCE = 0.1


@dataclass(frozen=True)
class FleetAdvice:
    """A fleet-size recommendation and the readings behind it."""

    current_nodes: int
    desired_nodes: int
    backlog: int
    oldest_age_s: float | None
    throughput_jobs_per_s: float
    node_capacity_jobs_per_s: float | None
    target_wait_s: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``scale --json`` document, plus the backlog detail)."""
        return asdict(self)


def node_capacity(samples: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Mean jobs/s of one fully busy node, from samples that measured one; else None."""
    estimates = []
    for sample in samples.values():
        jobs = sample.get("jobs") or {}
        rate, busy = jobs.get("per_s"), jobs.get("busy_fraction")
        if (
            isinstance(rate, int | float)
            and isinstance(busy, int | float)
            and rate > 0
            and busy >= MIN_BUSY_FRACTION
        ):
            estimates.append(rate / busy)
    return sum(estimates) / len(estimates) if estimates else None


def throughput(samples: Mapping[str, Mapping[str, Any]]) -> float:
    """Jobs per second the fleet finished over the last sample interval."""
    total = 0.0
    for sample in samples.values():
        rate = (sample.get("jobs") or {}).get("per_s")
        if isinstance(rate, int | float):
            total += rate
    return total


def recommend(
    backlog: Backlog,
    samples: Mapping[str, Mapping[str, Any]],
    policy: FleetPolicy,
    *,
    live_nodes: int | None = None,
) -> FleetAdvice:
    """The number of worker nodes the backlog, throughput and oldest job call for.

    ``live_nodes`` is the fleet's size now (nodes whose heartbeat is fresh,
    `catalog.live_nodes`); without it, the nodes with a current sample. The
    heartbeat counts a node back at once after a partition, where its next
    sample may be a whole sample interval away.
    """
    current = len(samples) if live_nodes is None else live_nodes
    queued = backlog.total
    oldest = backlog.oldest_s
    target = policy.target_wait_s
    rate = throughput(samples)
    capacity = node_capacity(samples)
    if capacity is not None:
        keep_up = rate / capacity
        drain = queued / (capacity * target)
        need = keep_up + drain
        if current and abs(need / current - 1) <= TOLERANCE:
            want = current
        else:
            want = math.ceil(round(need, 6))
        reason = f"keep up {keep_up:.2f} + drain {drain:.2f} nodes"
    else:
        want = math.ceil(queued / policy.backlog_per_node)
        reason = f"backlog {queued} / {policy.backlog_per_node} per node (nothing measured yet)"
    if queued and oldest is not None and oldest > target and want <= current:
        want = current + 1
        reason = f"oldest job waited {oldest:.0f} s > {target:g} s"
    if queued:
        want = max(want, 1)
    desired = max(policy.min_nodes, min(policy.max_nodes, want))
    if desired != want:
        reason += f"; clamped to {policy.min_nodes}..{policy.max_nodes}"
    return FleetAdvice(
        current_nodes=current,
        desired_nodes=desired,
        backlog=queued,
        oldest_age_s=None if oldest is None else round(oldest, 3),
        throughput_jobs_per_s=round(rate, 4),
        node_capacity_jobs_per_s=None if capacity is None else round(capacity, 4),
        target_wait_s=target,
        reason=reason,
    )


@dataclass(frozen=True)
class FleetReading:
    """Everything the fleet commands and exporter show, read at one moment."""

    backlog: Backlog
    samples: dict[str, dict[str, Any]]
    advice: FleetAdvice


def read_fleet(settings: Settings, *, broker: Any = None, backend: Any = None) -> FleetReading:
    """Read the backlog (broker) and the current samples (result backend), and advise."""
    from maas_worker.backend.redis import backend_client

    broker = broker if broker is not None else broker_client(settings)
    backend = backend if backend is not None else backend_client(settings)
    backlog = read_backlog(broker)
    samples = SampleStore(backend, interval_s=settings.sample_interval_s).latest()
    advice = recommend(backlog, samples, settings.fleet, live_nodes=live_nodes(backend))
    return FleetReading(backlog, samples, advice)
