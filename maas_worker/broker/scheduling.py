"""Queue order for the Redis transport: strict priority, with a reserved share.

kombu's ``priority`` strategy always asks Redis for ``high`` first, then
``normal``, then ``low`` (one take over the three lists, which pops from the
first non-empty one: ``fetch.py``). Under a steady flow of high jobs, low jobs would never
run. This strategy keeps that order, except that when ``normal`` (or ``low``)
has had no delivery for ``1/share`` deliveries in a row, it is asked first
once. An empty queue costs nothing (the take falls through to the next list), so
the policy is:

* a high job waits behind at most the jobs already reserved by the worker
  (about its concurrency) and, rarely, one reserved-share delivery;
* while they have work, normal and low each get at least ``share`` of the
  deliveries (default 5%: one in twenty), whatever the high load.

Selected with ``broker_transport_options["queue_order_strategy"]`` =
``"maas_worker.broker.scheduling:ReservedShareCycle"``; kombu makes it without
arguments, and the worker's channel (transport.py) remakes it with the share of
``MAAS_LOW_PRIORITY_SHARE`` (0 = strict priority).
"""

from __future__ import annotations

from kombu.utils.scheduling import priority_cycle

from maas_worker.protocol import PRIORITIES, queue_for
from maas_worker.settings import DEFAULT_LOW_PRIORITY_SHARE

STRATEGY = "maas_worker.broker.scheduling:ReservedShareCycle"


class ReservedShareCycle(priority_cycle):
    """kombu queue cycle: priority order plus a guaranteed share for lower queues."""

    def __init__(
        self, it: list[str] | None = None, *, share: float = DEFAULT_LOW_PRIORITY_SHARE
    ) -> None:
        super().__init__(it)  # type: ignore[no-untyped-call]
        self.every = round(1 / share) if share > 0 else 0
        self._lower = [queue_for(p) for p in PRIORITIES[1:]]  # normal, low
        self._since = dict.fromkeys(self._lower, 0)

    def consume(self, n: int) -> list[str]:
        """The queues to poll, in order."""
        items: list[str] = list(self.items[:n])
        if not self.every:
            return items
        # Starved queues go first, longest-waiting first; an empty one costs
        # nothing (the take falls through), so it cannot block the next one's turn.
        due = sorted(
            (q for q in self._lower if q in items and self._since[q] >= self.every),
            key=lambda q: -self._since[q],
        )
        return due + [q for q in items if q not in due]

    def rotate(self, last_used: str) -> None:
        """Called by kombu with the queue a message just came from."""
        for q in self._since:
            self._since[q] = 0 if q == last_used else self._since[q] + 1
