"""The submit flow both clients drive (client/core.py), step by step, without a server.

`drive` and `adrive` run the same `ClientCore.submit_flow`: these tests hand
it replies (and failures) directly, so what the flow does with each is
pinned down once for `Client` and `AsyncClient` alike. The real I/O of both
drivers is checked against a real Redis in tests/integration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis

from maas_worker import QueueFull, RateLimited, ServiceUnavailable, Settings
from maas_worker.backend import functions, keyspace
from maas_worker.client.core import ClientCore, Step, adrive, drive
from maas_worker.tenancy.keyring import Keyring, TenantPolicy


def core(policy: TenantPolicy | None = None, **env: str) -> ClientCore:
    settings = Settings.from_env({"MAAS_TENANT": "acme", "MAAS_DIAGNOSTIC_MODELS": "1", **env})
    return ClientCore(settings=settings, keyring=Keyring().with_new_tenant("acme", policy))


class Script:
    """Carries out steps from a table of replies; records what it was asked."""

    def __init__(self, core: ClientCore | None = None, **replies: Any) -> None:
        self.core = core
        self.replies = replies
        self.steps: list[str] = []

    def __call__(self, step: Step) -> Any:
        self.steps.append(step.kind)
        reply = self.replies.get(step.kind)
        if isinstance(reply, BaseException):
            raise reply
        if step.kind == "catalog" and self.core is not None:
            # As the drivers' served_models: the catalogue read fills the cache.
            return self.core._remember_served(set(), True)
        return reply


def flow(c: ClientCore, n: int = 2, **kw: Any) -> Any:
    return c.submit_flow("echo", [{"i": i} for i in range(n)], priority="normal", ttl_s=None, **kw)


def test_the_steps_in_order_and_the_markers_after_the_send() -> None:
    c = core()
    script = Script(depth=0, live=1)
    c._remember_served(set(), True)  # diagnostic models: echo is served, no catalogue read
    sealed, live = drive(flow(c), script)
    assert script.steps == ["depth", "send", "markers", "live"]
    assert live is True and len(sealed) == 2
    # The same flow, driven by the async driver.
    script = Script(live=0)

    async def carry_out(step: Step) -> Any:
        return script(step)

    sealed, live = asyncio.run(adrive(flow(c), carry_out))
    assert script.steps == ["send", "markers", "live"]  # the depth is cached now
    assert live is False


def test_a_stale_catalogue_is_read_first_and_nothing_is_sent_when_a_check_fails() -> None:
    c = core(MAAS_MAX_QUEUE_DEPTH="3")
    script = Script(c, depth=2)
    with pytest.raises(
        QueueFull, match=r"the normal queue is full for tenant .acme. \(2 jobs, limit 3"
    ):
        drive(flow(c), script)
    assert script.steps == ["catalog", "depth"]


def test_lost_markers_are_logged_and_an_unknown_worker_count_is_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = core()
    c._remember_served(set(), True)
    script = Script(
        depth=0,
        markers=redis.ConnectionError("gone"),
        live=ServiceUnavailable("result backend unavailable"),
    )
    with caplog.at_level(logging.WARNING, logger="maas_worker.client.client"):
        sealed, live = drive(flow(c), script)
    assert live is None and len(sealed) == 2
    assert "2 job(s) enqueued, but their queued markers could not be written" in caplog.text
    # A server that did not answer the markers is not asked again (a hung one would
    # hold the submit for a second socket timeout): the submit fails fast.
    assert script.steps == ["depth", "send", "markers"]


def test_with_wait_lost_markers_fail_the_submit_with_its_ids_at_once() -> None:
    c = core(MAAS_REDIS_WAIT_REPLICAS="1")
    c._remember_served(set(), True)
    script = Script(depth=0, markers=redis.TimeoutError("timed out"))
    with pytest.raises(ServiceUnavailable, match="not confirmed on the replicas") as err:
        drive(flow(c), script)
    assert len(err.value.job_ids) == 2
    assert script.steps == ["depth", "pin", "send", "markers"]


def test_with_wait_the_pin_is_taken_before_any_write_and_handed_to_replicate() -> None:
    # Where the writes go (a Redis Cluster's nodes), noted before them: the replicate
    # step checks the WAIT and the barrier went to the same nodes (backend/barrier.py).
    c = core(MAAS_REDIS_WAIT_REPLICAS="1")
    c._remember_served(set(), True)
    args: list[Any] = []

    def carry_out(step: Step) -> Any:
        if step.kind == "pin":
            return "where"
        if step.kind == "replicate":
            args.append(step.arg)
            return [1, True, 1]  # LPUSH, LTRIM, WAIT: one replica
        return 0

    drive(flow(c), carry_out)
    ((commands, pinned),) = args
    assert pinned == "where" and commands[-1][0] == "WAIT"
    # The gateway pins before it writes its markers, and hands the pin in: no pin step.
    script = Script(depth=0, replicate=[1, True, 1], live=1)
    sealed = c.seal_many("echo", [{"i": 1}], priority="normal", ttl_s=None)
    drive(c.enqueue_flow(sealed, pinned="early"), script)
    assert "pin" not in script.steps and "replicate" in script.steps
    # Without WAIT there is no pin step at all: the flow is as before.
    plain = core()
    plain._remember_served(set(), True)
    script = Script(depth=0, live=1)
    drive(flow(plain), script)
    assert script.steps == ["depth", "send", "markers", "live"]


def test_a_failed_send_or_depth_read_ends_the_submit_with_its_error() -> None:
    c = core()
    c._remember_served(set(), True)
    with pytest.raises(ServiceUnavailable, match="broker"):
        drive(flow(c), Script(depth=ServiceUnavailable("broker unavailable")))
    script = Script(depth=0, send=ServiceUnavailable("broker connection lost"))
    with pytest.raises(ServiceUnavailable, match="connection lost"):
        drive(flow(c), script)
    assert "markers" not in script.steps  # no marker for a job that may not be queued


def test_a_quota_is_asked_once_per_batch_and_its_refusal_raises() -> None:
    c = core(TenantPolicy(rate_per_s=1, burst=5))
    c._remember_served(set(), True)
    asked: list[Any] = []

    def carry_out(step: Step) -> Any:
        if step.kind == "admit":
            asked.append(step.arg)
            return [0, 250]  # over the rate: retry in 250 ms
        return 0

    with pytest.raises(RateLimited, match=r"retry after 0\.250 s") as caught:
        drive(flow(c, 3), carry_out)
    assert caught.value.retry_after_s == 0.25
    name, keys, args = asked[0]
    assert name == functions.ADVISE_MANY and keyspace.pending("acme") in keys
    assert len(args) == 4 + 3  # rate, burst, cap, expiry, then the three job ids


def test_an_empty_batch_does_nothing() -> None:
    script = Script()
    assert drive(core().submit_flow("echo", [], priority="normal", ttl_s=None), script) == (
        [],
        None,
    )
    assert script.steps == []
