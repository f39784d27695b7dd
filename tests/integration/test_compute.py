"""Compute-resource security: priority under backlog, quotas, limits, cancellation."""

from __future__ import annotations

import base64
import re
import time
import uuid

import pytest

from maas_worker import (
    InputTooLarge,
    JobCancelled,
    JobFailed,
    JobRejected,
    QueueFull,
    RateLimited,
    ResultTimeout,
    UnknownJob,
)
from maas_worker.backend import keyspace
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.protocol import TASK_NAME, queue_for
from maas_worker.tenancy.cancellation import make_token
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring

from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0


def with_policy(stack: Stack, tenant: str, policy: TenantPolicy) -> None:
    ring = load_keyring(stack.keyring_path)
    if tenant not in ring.tenants:
        ring = ring.with_new_tenant(tenant, policy)
    stack.rotate_keyring(ring.with_policy(tenant, policy))


def bypass(
    stack: Stack, tenant: str, model: str, body: bytes, *, job_id: str, priority: str = "normal"
) -> None:
    """Seal and enqueue like a client that skips every client-side check."""
    kv = load_keyring(stack.keyring_path).tenant(tenant).primary()
    h = Header(
        "request",
        kv.version,
        now_ms(),
        now_ms() + 600_000,
        priority,
        tenant,
        job_id,
        TASK_NAME,
        model,
    )
    envelope = base64.b64encode(seal(kv.keys(tenant), h, body)).decode()
    stack.client().app.send_task(
        TASK_NAME, args=[envelope], task_id=job_id, queue=queue_for(priority)
    )


# -- priority ------------------------------------------------------------------------------------
def test_high_job_overtakes_a_backlog_of_1000_low_jobs(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    lows = [client.submit("echo", {"i": i}, priority="low") for i in range(1000)]
    high = client.submit("echo", {"urgent": True}, priority="high")
    concurrency = 2
    # The pool's bound (prefetch 1 per process); the batch consumer's, a batch per
    # process: test_batch_consumer.py and test_fairshare.py.
    stack.start_worker(concurrency=concurrency, args=("--celery-tasks",))
    assert high.result(timeout=TIMEOUT) == {"echo": {"urgent": True}}
    order = stack.finished_order([high.id])
    lows_before = order.index(high.id)
    # at most what the pool had reserved, plus one reserved-share delivery
    assert lows_before <= concurrency + 2, lows_before
    assert int(stack.backend.llen(stack.tenant_queue("low"))) > 900  # the backlog was real
    assert lows[0].status() in ("queued", "running", "succeeded")


def test_low_jobs_progress_under_a_steady_high_load(make_stack) -> None:
    stack = make_stack(MAAS_LOW_PRIORITY_SHARE="0.1")
    client = stack.client()
    highs = [client.submit("echo", {"h": i}, priority="high") for i in range(60)]
    lows = [client.submit("echo", {"l": i}, priority="low") for i in range(3)]
    # One delivery at a time (Celery's pool): a batch consumer takes 60 jobs at once.
    stack.start_worker(concurrency=1, args=("--celery-tasks",))
    for job in lows:
        job.result(timeout=TIMEOUT)
    order = stack.finished_order([j.id for j in lows])
    positions = sorted(order.index(j.id) for j in lows)
    # every ~10th delivery goes to the starved low queue, high load or not;
    # strict priority would have finished them last, at 60, 61 and 62
    assert positions[-1] < 45, positions
    assert len(highs) == 60


# -- quotas --------------------------------------------------------------------------------------
def test_tenant_over_its_rate_gets_rate_limited_and_others_are_unaffected(make_stack) -> None:
    stack = make_stack()
    with_policy(stack, "metered", TenantPolicy(rate_per_s=0.2, burst=2))
    metered = stack.client("metered")
    metered.submit("echo", {"n": 1})
    metered.submit("echo", {"n": 2})
    with pytest.raises(RateLimited, match="rate limit") as err:
        metered.submit("echo", {"n": 3})
    assert err.value.retry_after_s is not None and 0 < err.value.retry_after_s <= 5
    before = int(stack.backend.llen(stack.tenant_queue("normal", "metered")))
    assert before == 2  # the refused job was never enqueued
    # another tenant is not held by metered's bucket
    acme = stack.client()
    jobs = [acme.submit("echo", {"a": i}) for i in range(10)]
    stack.start_worker()
    for job in jobs:
        job.result(timeout=TIMEOUT)


def test_worker_holds_a_client_that_skips_the_rate_check(make_stack) -> None:
    stack = make_stack()
    with_policy(stack, "metered", TenantPolicy(rate_per_s=0.1, burst=1))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in ids:
        bypass(stack, "metered", "echo", b'{"n": 1}', job_id=job_id)
    stack.start_worker(concurrency=1)
    limited = [stack.wait_audit(job_id, "rate_limited") for job_id in ids[1:]]
    assert all(r.tenant == "metered" and r.verified for r in limited)
    assert stack.client("metered").job(ids[0]).result(timeout=TIMEOUT) == {"echo": {"n": 1}}
    with pytest.raises(JobRejected):
        stack.client("metered").job(ids[1]).result(timeout=TIMEOUT)


def test_max_in_flight_caps_a_tenant(make_stack) -> None:
    stack = make_stack()
    with_policy(stack, "capped", TenantPolicy(max_in_flight=2))
    capped = stack.client("capped")
    first = [capped.submit("sleep", {"seconds": 0.2}) for _ in range(2)]
    with pytest.raises(RateLimited, match="in flight"):
        capped.submit("sleep", {"seconds": 0.2})
    stack.start_worker()
    for job in first:
        job.result(timeout=TIMEOUT)
    # finished jobs no longer count
    assert capped.submit("echo", {"again": 1}).result(timeout=TIMEOUT) == {"echo": {"again": 1}}


def test_full_queue_refuses_submits(make_stack) -> None:
    stack = make_stack(MAAS_MAX_QUEUE_DEPTH="high=100,normal=100,low=3")
    client = stack.client()
    for i in range(3):
        client.submit("echo", {"i": i}, priority="low")
    with pytest.raises(QueueFull, match="low queue is full") as err:
        client.submit("echo", {"i": 3}, priority="low")
    assert err.value.retry_after_s > 0
    assert int(stack.backend.llen(stack.tenant_queue("low"))) == 3
    client.submit("echo", {"other": 1}, priority="high")  # other priorities still open


# -- limits ----------------------------------------------------------------------------------------
def test_oversize_input_and_result(make_stack) -> None:
    stack = make_stack(MAAS_MAX_INPUT_BYTES="2000", MAAS_MAX_RESULT_BYTES="3000")
    client = stack.client()
    with pytest.raises(InputTooLarge):
        client.submit("echo", {"x": "a" * 2100})
    # a client configured with a larger limit is still held by the worker
    from maas_worker import Client
    from maas_worker.settings import Settings

    lax = Client(settings=Settings.from_env({**stack.env, "MAAS_MAX_INPUT_BYTES": "100000"}))
    too_big = lax.submit("echo", {"x": "a" * 50_000})
    # a result larger than the worker's limit fails the job, reason oversize
    echo_big = client.submit("echo", {"x": "b" * 1900})  # echo wraps it: result > 2000 ok
    stack.start_worker(env={"MAAS_MAX_RESULT_BYTES": "1000"})
    # Refused on its size before it is authenticated: audited, and no job's
    # state changes (anyone who can write a queue could have sent it).
    assert not stack.wait_audit(too_big.id, "oversize").verified
    assert too_big.status() == "queued"
    with pytest.raises(ResultTimeout):
        too_big.result(timeout=1)
    with pytest.raises(JobFailed) as err:
        echo_big.result(timeout=TIMEOUT)
    assert err.value.reason == "oversize"


def test_job_past_its_time_limit_fails_and_the_worker_carries_on(make_stack) -> None:
    stack = make_stack()
    stack.start_worker(concurrency=1, env={"MAAS_TIME_LIMITS": "sleep=1:5"})
    client = stack.client()
    started = time.monotonic()
    job = client.submit("sleep", {"seconds": 30})
    with pytest.raises(JobFailed) as err:
        job.result(timeout=TIMEOUT)
    assert err.value.reason == "timeout"
    assert time.monotonic() - started < 20
    assert job.info().as_dict() == {
        "job_id": job.id,
        "state": "failed",
        "reason": "timeout",
        "model": "sleep@1",
    }
    assert client.submit("echo", {"next": 1}).result(timeout=TIMEOUT) == {"echo": {"next": 1}}
    # the worker's one line for it says why it failed
    assert stack.outcomes(job.id) == ["failed"]
    assert f"job '{job.id}' failed: timeout\n" in stack.worker_logs()


def test_memory_high_water_keeps_a_job_waiting(make_stack) -> None:
    stack = make_stack()
    stack.start_worker(concurrency=1, env={"MAAS_MEMORY_HIGH_WATER_PCT": "1"})
    job = stack.client().submit("echo", {"x": 1})
    wait_for(
        lambda: f"job {job.id} waits: host memory above" in stack.worker_logs(),
        TIMEOUT,
        "the worker to hold the job back",
    )
    assert job.status() == "queued"  # not started, not lost


# -- cancellation ------------------------------------------------------------------------------
def test_cancel_a_queued_job_it_never_runs(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    job = client.submit("echo", {"x": "never"})
    assert job.cancel() is True
    assert job.status() == "cancelled"
    with pytest.raises(JobCancelled):
        job.result(timeout=1)
    stack.start_worker()  # a worker started after the cancel still honours it
    after = client.submit("echo", {"x": "after"})
    assert after.result(timeout=TIMEOUT) == {"echo": {"x": "after"}}
    # Taken first, but another pool process may log "after" before this one logs it.
    wait_for(
        lambda: re.search(rf"job '{job.id}' cancelled", stack.worker_logs()),
        TIMEOUT,
        "the cancelled job's log line",
    )
    assert f"job '{job.id}' succeeded" not in stack.worker_logs()
    assert job.status() == "cancelled"


def test_cancel_a_running_job_stops_it(make_stack) -> None:
    stack = make_stack()
    stack.start_worker(concurrency=1)
    client = stack.client()
    job = client.submit("sleep", {"seconds": 60})
    wait_for(lambda: job.status() == "running", TIMEOUT, "the job to start")
    started = time.monotonic()
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        job.result(timeout=TIMEOUT)
    assert time.monotonic() - started < 10
    assert job.status() == "cancelled"
    assert client.submit("echo", {"n": 1}).result(timeout=TIMEOUT) == {"echo": {"n": 1}}
    # logged as what it is, not as a failure
    assert stack.outcomes(job.id) == ["cancelled"]
    assert f"job '{job.id}' failed" not in stack.worker_logs()


def test_another_tenant_cannot_cancel_a_job(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    job, other = client.submit("echo", {"mine": 1}), client.submit("echo", {"mine": 2})
    # Through its client, another tenant has no such job: nothing is written.
    with pytest.raises(UnknownJob):
        stack.client("globex").job(job.id).cancel()
    assert not stack.backend.exists(keyspace.cancel("acme", job.id))
    assert job.status() == "queued"
    # Written straight into Redis under the job's own tenant's key, a request
    # signed with another tenant's key, and one that no key signed...
    ring = load_keyring(stack.keyring_path)
    stack.backend.set(keyspace.cancel("acme", job.id), make_token(ring, "globex", job.id))
    stack.backend.set(keyspace.cancel("acme", other.id), f"acme:1:{'0' * 64}")
    stack.start_worker()
    # ...are refused: the jobs run,
    assert job.result(timeout=TIMEOUT) == {"echo": {"mine": 1}}
    assert other.result(timeout=TIMEOUT) == {"echo": {"mine": 2}}
    # and each refusal is audited under whoever really made the request
    rec = stack.wait_audit(job.id, "policy")
    assert rec.tenant == "globex" and rec.verified
    assert not stack.wait_audit(other.id, "tampered").verified


def test_cancel_after_the_result_is_a_no_op(shared_stack: Stack) -> None:
    job = shared_stack.client().submit("echo", {"x": 1})
    job.result(timeout=TIMEOUT)
    assert job.cancel() is False
    assert job.status() == "succeeded"
