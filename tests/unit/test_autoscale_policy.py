"""The in-worker autoscaler's sizing rule (autoscale.decide), a pure function."""

from __future__ import annotations

import pytest

from maas_worker.errors import ConfigError
from maas_worker.monitoring.autoscale import Decision, PoolView, decide
from maas_worker.settings import AutoscalePolicy, Settings

POLICY = AutoscalePolicy(keepalive_s=30, grow_after_s=1.0, max_memory_pct=85, max_cpu_pct=90)


def view(**kw: object) -> PoolView:
    base: dict[str, object] = {
        "current": 1,
        "running": 1,
        "waiting": 0,
        "queued": 0,
        "oldest_age_s": None,
        "memory_pct": 40.0,
        "cpu_pct": 20.0,
    }
    base.update(kw)
    return PoolView(**base)  # type: ignore[arg-type]


def size(
    v: PoolView,
    *,
    quiet_for_s: float = 0.0,
    lo: int = 1,
    hi: int = 4,
    policy: AutoscalePolicy = POLICY,
) -> Decision:
    return decide(v, min_size=lo, max_size=hi, policy=policy, quiet_for_s=quiet_for_s)


def test_grows_with_the_queued_backlog_up_to_max() -> None:
    assert size(view(queued=2, oldest_age_s=3.0)).target == 3
    assert size(view(queued=50, oldest_age_s=3.0)).target == 4
    assert size(view(queued=50, oldest_age_s=3.0)).reason == "backlog"


def test_jobs_reserved_here_count_as_backlog_whatever_their_age() -> None:
    # acks_late + prefetch: the worker holds jobs no process is free for.
    assert size(view(waiting=2)).target == 3


def test_a_backlog_younger_than_grow_after_does_not_fork() -> None:
    d = size(view(queued=3, oldest_age_s=0.2))
    assert (d.target, d.reason) == (1, "backlog too young")
    assert d.wanted == 4  # what the backlog calls for is still reported


def test_unknown_age_is_treated_as_old_enough() -> None:
    assert size(view(queued=1, oldest_age_s=None)).target == 2


def test_refuses_to_grow_without_memory_headroom() -> None:
    d = size(view(queued=5, oldest_age_s=5.0, memory_pct=92.0))
    assert d.target == 1
    assert d.wanted == 4
    assert d.reason.startswith("no headroom: memory 92%")


def test_refuses_to_grow_without_cpu_headroom() -> None:
    d = size(view(queued=5, oldest_age_s=5.0, cpu_pct=99.0))
    assert (d.target, d.wanted) == (1, 4)
    assert "cpu" in d.reason


def test_thresholds_at_100_never_refuse() -> None:
    lax = AutoscalePolicy(max_memory_pct=100, max_cpu_pct=100, grow_after_s=0)
    assert size(view(queued=5, memory_pct=100.0, cpu_pct=100.0), policy=lax).target == 4


def test_shrinks_only_after_the_keep_alive() -> None:
    idle = view(current=4, running=0)
    d = size(idle, quiet_for_s=5)
    assert (d.target, d.reason) == (4, "keep-alive")
    d = size(idle, quiet_for_s=31)
    assert (d.target, d.reason) == (1, "idle")


def test_never_shrinks_below_running_jobs_or_min() -> None:
    assert size(view(current=4, running=3), quiet_for_s=100).target == 3
    assert size(view(current=4, running=0), quiet_for_s=100, lo=2).target == 2


def test_does_not_shrink_while_anything_waits() -> None:
    d = size(view(current=4, running=1, queued=1, oldest_age_s=0.1), quiet_for_s=100)
    assert d.target == 4


def test_at_max_it_holds() -> None:
    d = size(view(current=4, running=4, queued=100, oldest_age_s=60.0))
    assert (d.target, d.reason) == (4, "steady")


def test_below_min_it_restores_min() -> None:
    assert size(view(current=0, running=0), lo=2).target == 2


def test_policy_from_environment() -> None:
    s = Settings.from_env(
        {
            "MAAS_AUTOSCALE_KEEPALIVE_S": "2.5",
            "MAAS_AUTOSCALE_MAX_MEMORY_PCT": "70",
            "MAAS_AUTOSCALE_GROW_AFTER_S": "0",
        }
    )
    assert s.autoscale.keepalive_s == 2.5
    assert s.autoscale.max_memory_pct == 70
    assert s.autoscale.grow_after_s == 0
    with pytest.raises(ConfigError, match="MAAS_AUTOSCALE_MAX_CPU_PCT"):
        Settings.from_env({"MAAS_AUTOSCALE_MAX_CPU_PCT": "150"})
