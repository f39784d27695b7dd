"""The arithmetic of benchmarks/capacity.py on fixed server readings (no server, no timing).

The capacity model of docs/scaling.md is computed from these functions: a wrong
sign or unit here would be a wrong figure in the docs.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.capacity import (
    Counters,
    capacity,
    command_name,
    job_cost,
    median_cost,
    shares_of,
    split_calls,
    top_level_usec,
    worker_modes,
)


def info(
    commands: dict[str, tuple[int, int]],
    *,
    net_in: int,
    net_out: int,
    user: float,
    sys: float,
    memory: int = 1_000_000,
    keys: int = 10,
) -> dict[str, Any]:
    """An ``INFO all`` as redis-py parses it (the fields the benchmark reads)."""
    parsed: dict[str, Any] = {
        f"cmdstat_{name}": {"calls": calls, "usec": usec, "usec_per_call": 0.0}
        for name, (calls, usec) in commands.items()
    }
    parsed.update(
        total_net_input_bytes=net_in,
        total_net_output_bytes=net_out,
        used_cpu_user=user,
        used_cpu_sys=sys,
        used_memory=memory,
        db0={"keys": keys, "expires": 0, "avg_ttl": 0},
    )
    return parsed


BEFORE = Counters.from_info(
    info(
        {"get": (10, 20), "evalsha": (5, 500), "info": (3, 90), "ping": (7, 7)},
        net_in=1_000,
        net_out=2_000,
        user=1.0,
        sys=0.5,
    )
)
AFTER = Counters.from_info(
    info(
        {
            "get": (2_010, 2_020),  # 2,000 more: 1 per job, 1 us each
            "evalsha": (3_005, 150_500),  # 3 per job, 50 us each
            "set": (4_000, 8_000),  # new since: 4 per job
            "info": (4, 120),  # the benchmark's own read: left out
            "ping": (7, 7),  # unchanged: left out
        },
        net_in=1_000 + 2_000 * 6_000,
        net_out=2_000 + 2_000 * 1_800,
        user=1.5,
        sys=0.7,
        memory=7_000_000,
        keys=2_010,
    )
)


def test_job_cost_is_the_per_job_difference_without_the_benchmarks_own_commands() -> None:
    cost = job_cost(BEFORE, AFTER, jobs=2_000)
    assert cost.calls == {"get": 1.0, "evalsha": 1.5, "set": 2.0}
    assert cost.usec == {"get": 1.0, "evalsha": 75.0, "set": 4.0}
    assert cost.commands == 4.5
    assert cost.script_usec == 75.0
    assert (cost.bytes_in, cost.bytes_out) == (6_000, 1_800)
    assert cost.redis_cpu_ms == pytest.approx(0.35)  # (0.5 user + 0.2 sys) s / 2,000 jobs
    assert cost.redis_sys_ms == pytest.approx(0.1)
    assert cost.held_bytes == 3_000  # (7,000,000 - 1,000,000) bytes / 2,000 jobs


def test_capacity_is_one_core_over_the_redis_cpu_per_job() -> None:
    cost = job_cost(BEFORE, AFTER, jobs=2_000)
    cap = capacity(cost)
    assert cap.jobs_per_redis_core == pytest.approx(1_000 / 0.35)  # 2,857 jobs/s
    assert cap.bytes_per_s == pytest.approx(7_800 * 1_000 / 0.35)  # ~22.3 MB/s
    assert cap.commands_per_s == pytest.approx(4.5 * 1_000 / 0.35)


def test_median_cost_takes_each_figure_apart_and_counts_a_missing_command_as_zero() -> None:
    one = job_cost(BEFORE, AFTER, jobs=2_000)
    two = job_cost(BEFORE, AFTER, jobs=1_000)  # every figure doubled
    three = job_cost(BEFORE, AFTER, jobs=4_000)  # halved
    without_set = job_cost(
        BEFORE, Counters.from_info({**info({}, net_in=0, net_out=0, user=0, sys=0)}), jobs=1
    )
    med = median_cost([one, two, three])
    assert med.calls == one.calls and med.redis_cpu_ms == one.redis_cpu_ms
    assert median_cost([one, without_set, two]).calls["set"] == 2.0


def test_script_commands_are_split_out_by_their_census_shares() -> None:
    rows = [("producer", "set")] + [("script", "set")] * 3 + [("worker", "evalsha")] * 2
    rows += [("producer", "info")]  # the benchmark's own: never counted
    shares = shares_of(rows)
    assert shares == {"set": {"producer": 0.25, "script": 0.75}, "evalsha": {"worker": 1.0}}
    cost = job_cost(BEFORE, AFTER, jobs=2_000)
    assert split_calls(cost, shares) == {
        "producer": 0.5,  # a quarter of 2 sets
        "worker": 1.5,  # the EVALSHAs
        "script": 1.5,  # three quarters of 2 sets
        "other": 1.0,  # get: not seen by the census
    }
    # The scripts' time holds their inner commands': 1 (get) + 75 (evalsha) + 4 / 4 (set).
    assert top_level_usec(cost, shares) == pytest.approx(77.0)


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("EVALSHA 25bc 0", "evalsha"),
        ("set a 1", "set"),
        ("CLIENT SETINFO LIB-NAME redis-py", "client|setinfo"),
        ('"SCRIPT" "LOAD" "return 1"', "script|load"),
        ("MULTI", "multi"),
    ],
)
def test_command_name_matches_commandstats(line: str, name: str) -> None:
    assert command_name(line) == name


def test_both_worker_modes_have_flags_the_cli_knows() -> None:
    from maas_worker.cli.services import worker

    known = {opt for param in worker.params for opt in param.opts}
    modes = worker_modes()
    assert set(modes) == {"celery", "batch"}
    assert modes["celery"] != modes["batch"]
    assert all(flag in known for flags in modes.values() for flag in flags)
