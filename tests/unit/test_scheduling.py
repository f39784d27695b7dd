"""The reserved-share queue order, simulated without Redis."""

from __future__ import annotations

from collections import deque

from maas_worker.broker.scheduling import ReservedShareCycle

QUEUES = ["maas.high", "maas.normal", "maas.low"]


def simulate(backlog: dict[str, int], deliveries: int, share: float) -> str:
    """Deliver like kombu's BRPOP: the first non-empty queue in the cycle's order."""
    cycle = ReservedShareCycle(list(QUEUES), share=share)
    queues = {name: deque(range(n)) for name, n in backlog.items()}
    out = []
    for _ in range(deliveries):
        for name in cycle.consume(3):
            if queues.get(name):
                queues[name].popleft()
                out.append(name[5])  # h, n or l
                cycle.rotate(name)
                break
    return "".join(out)


def test_strict_priority_when_share_is_zero() -> None:
    assert simulate({"maas.high": 50, "maas.low": 5}, 55, 0) == "h" * 50 + "l" * 5


def test_priority_order_when_nothing_starves() -> None:
    assert simulate({"maas.high": 3, "maas.normal": 3, "maas.low": 3}, 9, 0.05) == "hhhnnnlll"


def test_low_gets_its_share_under_steady_high_load() -> None:
    order = simulate({"maas.high": 1000, "maas.low": 100}, 200, 0.05)
    assert 8 <= order.count("l") <= 10  # about one in 21
    assert order.index("l") == 20


def test_an_empty_normal_queue_does_not_block_lows_turn() -> None:
    order = simulate({"maas.high": 1000, "maas.low": 100}, 100, 0.1)
    assert order.count("l") >= 8


def test_both_lower_queues_get_a_share() -> None:
    order = simulate({"maas.high": 1000, "maas.normal": 100, "maas.low": 100}, 220, 0.1)
    assert order.count("n") >= 15 and order.count("l") >= 15
