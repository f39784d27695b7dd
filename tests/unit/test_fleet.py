"""Fleet-size recommendation (fleet.recommend): backlog, throughput, oldest job."""

from __future__ import annotations

from typing import Any

import pytest

from maas_worker.broker.backlog import Backlog
from maas_worker.errors import ConfigError
from maas_worker.monitoring.fleet import node_capacity, recommend
from maas_worker.settings import FleetPolicy, Settings

POLICY = FleetPolicy(min_nodes=1, max_nodes=20, target_wait_s=30, backlog_per_node=10)


def backlog(normal: int, oldest: float | None = None) -> Backlog:
    return Backlog(
        {"high": 0, "normal": normal, "low": 0}, {"high": None, "normal": oldest, "low": None}
    )


def node(per_s: float | None, busy: float | None) -> dict[str, Any]:
    return {"jobs": {"finished": 100, "busy_s": 10, "per_s": per_s, "busy_fraction": busy}}


def test_more_backlog_more_nodes_before_anything_is_measured() -> None:
    desired = [recommend(backlog(n), {}, POLICY).desired_nodes for n in (0, 5, 10, 11, 95)]
    assert desired == [1, 1, 1, 2, 10]


def test_capacity_is_throughput_over_busy_fraction() -> None:
    assert node_capacity({"a": node(5.0, 0.5), "b": node(10.0, 1.0)}) == pytest.approx(10.0)
    # an idle node says nothing about capacity
    assert node_capacity({"a": node(0.0, 0.0), "b": node(1.0, 0.01)}) is None


def test_measured_capacity_drains_the_backlog_within_the_target_wait() -> None:
    # 2 nodes, each 10 jobs/s when busy, both busy: keep up 2 nodes; 1200 queued
    # jobs within 30 s need 1200 / (10 * 30) = 4 more.
    samples = {"a": node(10.0, 1.0), "b": node(10.0, 1.0)}
    advice = recommend(backlog(1200, oldest=5), samples, POLICY)
    assert advice.desired_nodes == 6
    assert advice.node_capacity_jobs_per_s == 10.0
    assert advice.throughput_jobs_per_s == 20.0
    assert recommend(backlog(2400, oldest=5), samples, POLICY).desired_nodes == 10


def test_a_saturated_node_with_a_trickle_of_backlog_is_enough() -> None:
    advice = recommend(backlog(2, oldest=0.5), {"a": node(2.0, 1.0)}, POLICY)
    assert advice.desired_nodes == 1


def test_half_busy_fleet_without_backlog_scales_in() -> None:
    samples = {k: node(5.0, 0.5) for k in "abcd"}
    assert recommend(backlog(0), samples, POLICY).desired_nodes == 2


def test_an_old_job_asks_for_one_node_more_than_now() -> None:
    samples = {"a": node(10.0, 1.0)}
    advice = recommend(backlog(3, oldest=120.0), samples, POLICY)
    assert advice.desired_nodes == 2
    assert "oldest job waited 120 s" in advice.reason


def test_clamped_to_min_and_max() -> None:
    assert recommend(backlog(10_000), {}, POLICY).desired_nodes == 20
    policy = FleetPolicy(min_nodes=0, max_nodes=3)
    assert recommend(backlog(0), {}, policy).desired_nodes == 0
    assert recommend(backlog(1), {}, policy).desired_nodes == 1  # scale from zero


def test_json_form() -> None:
    doc = recommend(backlog(11), {}, POLICY).to_json()
    assert set(doc) == {
        "current_nodes",
        "desired_nodes",
        "backlog",
        "oldest_age_s",
        "throughput_jobs_per_s",
        "node_capacity_jobs_per_s",
        "target_wait_s",
        "reason",
    }
    assert doc["desired_nodes"] == 2


def test_policy_from_environment() -> None:
    s = Settings.from_env(
        {
            "MAAS_FLEET_MIN_NODES": "0",
            "MAAS_FLEET_MAX_NODES": "5",
            "MAAS_FLEET_TARGET_WAIT_S": "10",
            "MAAS_FLEET_BACKLOG_PER_NODE": "3",
        }
    )
    assert s.fleet == FleetPolicy(min_nodes=0, max_nodes=5, target_wait_s=10, backlog_per_node=3)
    with pytest.raises(ConfigError, match="MAAS_FLEET_MIN_NODES"):
        Settings.from_env({"MAAS_FLEET_MIN_NODES": "6", "MAAS_FLEET_MAX_NODES": "5"})


def test_the_fleet_size_is_the_live_nodes_when_known() -> None:
    """A node back from a partition counts at its heartbeat, before its next sample."""
    samples = {"a": node(2.0, 0.5)}
    assert recommend(backlog(0), samples, POLICY).current_nodes == 1
    assert recommend(backlog(0), samples, POLICY, live_nodes=2).current_nodes == 2
