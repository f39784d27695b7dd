"""A worker host cut off from Redis, and back: no job lost or run twice, no false audit.

Issue #17 measured it: a batch-consumer host whose link was cut for longer
than the visibility timeout came back and pushed every message its consumer
had held back into the queues, although the visibility sweep had already put
them back and another host had run them: each copy was refused ``replayed``,
one false security event per message. Now a consumer hands a message back
only while it still holds its reservation (broker/lua/hand_back.lua).
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Stack, outcome_counts, wait_for
from .linkcut import LinkCut
from .test_crash import FAST_RECOVERY, WAIT_S, check_once, collect, held_by, submit_mixed

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def replayed(stack: Stack) -> list[Any]:
    """The ``replayed`` audit records so far."""
    return [r for r in stack.audit() if r.reason == "replayed"]


@pytest.mark.parametrize("mode", ["batch", "celery"])
def test_a_node_cut_off_mid_batch_hands_back_nothing_already_swept(
    make_stack: Any, report: Any, mode: str
) -> None:
    stack, server = make_stack(**FAST_RECOVERY)
    link = LinkCut(server.port)
    args = () if mode == "batch" else ("--celery-tasks",)
    try:
        cutoff = stack.start_worker(
            "cutoff", concurrency=1, args=args, env={"MAAS_BROKER_URL": link.url}
        )
        jobs = submit_mixed(stack, 12, seconds=0.4)
        # It holds a batch and runs it (sleep jobs run one after another).
        held = wait_for(lambda: held_by(stack, cutoff), WAIT_S, "the host to claim a batch")
        link.cut()
        # Another host runs everything once the sweep has put the cut host's
        # messages back and its claims have lapsed.
        stack.start_worker("rescuer", concurrency=1, args=args)
        sealed = collect(jobs)
        link.restore()
        # The cut host reconnects and settles what it held: none of it is
        # still its own, so nothing goes back to a queue (a copy it pushed
        # would be taken and refused ``replayed``).
        log = cutoff.log_path
        back = "put back by the visibility sweep" if mode == "batch" else "Connected to redis"
        wait_for(
            lambda: (
                log.read_text(errors="replace").count(back) >= (mode == "celery") + 1
                or replayed(stack)
            ),
            WAIT_S,
            "the cut host to settle what it held",
        )
        figures = check_once(stack, jobs, sealed)
    finally:
        link.close()
    assert replayed(stack) == []
    counts = outcome_counts(stack.worker_logs())
    assert all(counts[j.id]["succeeded"] == 1 for j in jobs)
    report(jobs=len(jobs), held_at_cut=len(held), false_audit_records=0, **figures)
