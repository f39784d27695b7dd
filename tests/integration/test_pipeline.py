"""The secure pipeline end to end: real Redis server, real worker processes."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from maas_worker import (
    InputTooLarge,
    JobExpired,
    JobFailed,
    JobRejected,
    KeyringError,
    PolicyDenied,
    SubmitError,
    UnknownJob,
    UnknownModel,
    UnknownTenant,
)
from maas_worker.backend import keyspace
from maas_worker.backend.audit import AuditRecord
from maas_worker.broker.backlog import read_backlog
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.local.demo import scan_for
from maas_worker.protocol import TASK_NAME, queue_for
from maas_worker.tenancy.keyring import load_keyring

from .conftest import Stack, message_envelope, not_through_gateway, replace_envelope, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0


@pytest.fixture
def make_stack(make_stack: Callable[..., Stack]) -> Callable[..., Stack]:
    """conftest's `make_stack`, its workers in the Celery-task mode (``--celery-tasks``):
    test_batch_consumer.py runs the same tests on batch consumers, the default mode."""

    def factory(**env: str) -> Stack:
        stack = make_stack(**env)
        stack.worker_args = ("--celery-tasks",)
        return stack

    return factory


def outcome_lines(stack: Stack, job_id: str, at_least: int = 1) -> list[str]:
    return stack.outcomes(job_id, at_least)


# -- the happy path ---------------------------------------------------------------
@pytest.mark.parametrize("priority", ["high", "normal", "low"])
def test_round_trip_every_priority(shared_stack: Stack, priority: str, client_kind: str) -> None:
    client = shared_stack.client(kind=client_kind)
    job = client.submit(
        "echo", {"text": f"hello {priority}", "n": [1, 2.5, None]}, priority=priority
    )
    assert job.result(timeout=TIMEOUT) == {
        "echo": {"text": f"hello {priority}", "n": [1, 2.5, None]}
    }
    assert job.status() == "succeeded"


def test_status_moves_from_running_to_succeeded(shared_stack: Stack, client_kind: str) -> None:
    job = shared_stack.client(kind=client_kind).submit("sleep", {"seconds": 1.5})
    wait_for(lambda: job.status() == "running", TIMEOUT, "status running")
    assert job.result(timeout=TIMEOUT)["slept"] >= 1.5
    assert job.status() == "succeeded"


def test_model_error_fails_the_job_with_a_reason(shared_stack: Stack, client_kind: str) -> None:
    job = shared_stack.client(kind=client_kind).submit("sleep", {"seconds": "forever"})
    with pytest.raises(JobFailed) as err:
        job.result(timeout=TIMEOUT)
    assert err.value.reason == "bad_input"
    assert job.status() == "failed"


def test_unknown_job_id(shared_stack: Stack, client_kind: str) -> None:
    with pytest.raises(UnknownJob):
        shared_stack.client(kind=client_kind).job("no-such-job").status()


# -- bad input at the client: nothing is enqueued ------------------------------------------
def _queued(stack: Stack) -> int:
    return read_backlog(stack.backend).total  # every list: the queues' own and the tenants'


def test_client_refuses_bad_input_before_enqueueing(shared_stack: Stack, client_kind: str) -> None:
    client = shared_stack.client(kind=client_kind)
    before = _queued(shared_stack)
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        client.submit("nope", {})
    with pytest.raises(SubmitError, match="not JSON"):
        client.submit("echo", {"x": object()})
    with pytest.raises(SubmitError, match="not JSON"):
        client.submit("echo", {"x": float("nan")})
    with pytest.raises(InputTooLarge, match="limit"):
        client.submit("echo", {"x": "a" * (client.settings.max_input_bytes + 1)})
    with pytest.raises(SubmitError, match="priority"):
        client.submit("echo", {}, priority="urgent")
    globex = shared_stack.client("globex", kind=client_kind)
    with pytest.raises(PolicyDenied, match="priority"):
        globex.submit("echo", {}, priority="high")
    with pytest.raises(PolicyDenied, match="model"):
        globex.submit("sleep", {"seconds": 0})
    with pytest.raises(UnknownTenant):
        shared_stack.client("initech", kind=client_kind)
    assert _queued(shared_stack) == before
    queued_markers = shared_stack.backend.keys(keyspace.submitted("acme", "*"))
    assert all(
        shared_stack.client(kind=client_kind).job(k.decode().rsplit(":", 1)[1]).status() != "queued"
        for k in queued_markers
    )


def test_missing_keyring_is_one_clear_error(shared_stack: Stack) -> None:
    from maas_worker import Client
    from maas_worker.settings import Settings

    env = {**shared_stack.env, "MAAS_KEYRING": str(shared_stack.tmp / "absent.json")}
    with pytest.raises(KeyringError, match=r"not found.*keys init"):
        Client(settings=Settings.from_env(env))


# -- attacks through Redis --------------------------------------------------------------------
def test_message_altered_in_redis_is_rejected_and_audited(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    victim = client.submit("echo", {"text": "original"}, priority="high")
    raw = stack.backend.lindex(stack.tenant_queue("high"), 0)
    _, envelope = message_envelope(raw)
    data = bytearray(base64.b64decode(envelope))
    data[-40] ^= 0x80  # inside the GCM tag
    stack.backend.lset(
        stack.tenant_queue("high"), 0, replace_envelope(raw, base64.b64encode(bytes(data)).decode())
    )
    stack.start_worker()
    rec = stack.wait_audit(victim.id, "tampered")
    assert rec.tenant == "acme" and not rec.verified
    # Whoever can write a queue could have sent that message: it changes no
    # job's state, but the waiting client is told when its wait ends.
    assert victim.status() == "queued"
    with pytest.raises(JobRejected, match="did not authenticate"):
        victim.result(timeout=1)
    # the worker carries on
    assert client.submit("echo", {"n": 1}).result(timeout=TIMEOUT) == {"echo": {"n": 1}}


def test_every_header_field_altered_in_redis_is_rejected(make_stack) -> None:
    """Priority, model, tenant, job id...: any header change is caught before running.

    None of these messages authenticates, so none changes its job's state:
    each is audited, the model never runs, and the job stays queued.
    """
    stack = make_stack()
    client = stack.client()
    jobs = []
    for offset in (1, 5, 10, 20, 24, 26, 30, 40, 60, 80):
        job = client.submit("echo", {"text": "x"}, priority="low")
        # the newest (pushed at the left); put back altered
        raw = stack.backend.lpop(stack.tenant_queue("low"))
        _, envelope = message_envelope(raw)
        data = bytearray(base64.b64decode(envelope))
        data[offset] ^= 0x01
        stack.backend.lpush(
            stack.tenant_queue("low"), replace_envelope(raw, base64.b64encode(bytes(data)).decode())
        )
        jobs.append(job)
    stack.start_worker()

    def all_audited() -> dict[str, AuditRecord] | None:
        found = {r.job_id: r for r in stack.audit()}
        return found if {j.id for j in jobs} <= set(found) else None

    records = wait_for(all_audited, TIMEOUT, "an audit record for every job")
    assert {r.reason for r in records.values()} <= {"tampered", "malformed", "unknown_key"}
    assert not any(r.verified for r in records.values())
    for job in jobs:
        assert job.status() == "queued"
    assert "succeeded" not in stack.worker_logs()


def test_byte_identical_replay_is_refused_and_the_first_result_stays(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    job = client.submit("echo", {"text": "once"}, priority="normal")
    raw = stack.backend.lindex(stack.tenant_queue("normal"), 0)
    stack.start_worker()
    assert job.result(timeout=TIMEOUT) == {"echo": {"text": "once"}}
    stored = stack.backend.get(keyspace.result("acme", job.id))
    stack.backend.lpush(queue_for("normal"), raw)  # the attacker's copy
    rec = stack.wait_audit(job.id, "replayed")
    assert rec.verified
    assert stack.backend.get(keyspace.result("acme", job.id)) == stored
    assert job.status() == "succeeded"
    assert outcome_lines(stack, job.id, 2) == ["succeeded", "replayed"]


def test_envelope_moved_to_another_task_id_is_refused(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    header, envelope = client.seal("echo", {"text": "x"}, priority="high")
    someone_else = str(uuid.uuid4())
    client.app.send_task(TASK_NAME, args=[envelope], task_id=someone_else, queue=queue_for("high"))
    client.app.send_task(
        TASK_NAME, args=[envelope], task_id=header.job_id, queue=queue_for("low")
    )  # moved to another priority queue
    stack.start_worker()
    stack.wait_audit(someone_else, "tampered")
    stack.wait_audit(header.job_id, "tampered")


def test_expired_job_is_not_run(make_stack, client_kind: str) -> None:
    # The default 30 s skew tolerance does not stretch a 2 s ttl: its grace
    # past expiry is a tenth of it (docs/security.md, the time window).
    stack = make_stack()
    job = stack.client(kind=client_kind).submit("echo", {"text": "late"}, ttl_s=2)
    # A client whose clock is 20 s ahead of the workers' (issued "in the
    # future", within the skew) with the same 2 s ttl: its job still runs.
    ring = load_keyring(stack.keyring_path)
    kv = ring.tenant("acme").primary()
    ahead = str(uuid.uuid4())
    issued = now_ms() + 20_000
    h = Header(
        "request", kv.version, issued, issued + 2_000, "normal", "acme", ahead, TASK_NAME, "echo"
    )
    env = base64.b64encode(seal(kv.keys("acme"), h, b'{"text": "ahead"}')).decode()
    # the first job must wait in the queue past its expiry and grace: wait on the clock itself
    expiry = time.time() + 2.25
    while time.time() < expiry:
        time.sleep(expiry - time.time())
    stack.client().app.send_task(TASK_NAME, args=[env], task_id=ahead, queue=queue_for("normal"))
    stack.start_worker()
    with pytest.raises(JobExpired):
        job.result(timeout=TIMEOUT)
    stack.wait_audit(job.id, "expired")
    assert job.status() == "expired"
    assert stack.client().job(ahead).result(timeout=TIMEOUT) == {"echo": {"text": "ahead"}}


def test_unknown_key_and_worker_side_policy(make_stack) -> None:
    stack = make_stack()
    # A tenant the workers do not know seals with its own keyring.
    from maas_worker.tenancy.keyring import Keyring, save_keyring

    foreign = stack.tmp / "foreign.json"
    save_keyring(foreign, Keyring().with_new_tenant("intruder"))
    intruder = stack.client("intruder", keyring=foreign)
    j1 = intruder.submit("echo", {"text": "x"})
    # acme's name and key version 1 with another secret: the MAC fails (tampered);
    # a key version the workers do not have is unknown_key, not tampered.
    wrong, newer = stack.tmp / "wrong.json", stack.tmp / "newer.json"
    save_keyring(wrong, Keyring().with_new_tenant("acme"))
    save_keyring(newer, Keyring().with_new_tenant("acme").with_rotation("acme")[0])
    j2 = stack.client(keyring=wrong).submit("echo", {"text": "x"})
    j3 = stack.client(keyring=newer).submit("echo", {"text": "x"})
    # A client that skips its own policy check: globex may not use "sleep".
    ring = load_keyring(stack.keyring_path)
    kv = ring.tenant("globex").primary()
    bypass = str(uuid.uuid4())
    h = Header(
        "request",
        kv.version,
        now_ms(),
        now_ms() + 60_000,
        "normal",
        "globex",
        bypass,
        TASK_NAME,
        "sleep",
    )
    env = base64.b64encode(seal(kv.keys("globex"), h, b'{"seconds": 0}')).decode()
    stack.client().app.send_task(TASK_NAME, args=[env], task_id=bypass, queue=queue_for("normal"))
    stack.start_worker()
    stack.wait_audit(j1.id, "unknown_key")
    assert stack.wait_audit(j2.id, "tampered").tenant == "acme"
    assert stack.wait_audit(j3.id, "unknown_key").tenant == "acme"
    assert [r.reason for r in stack.audit() if r.job_id in (j2.id, j3.id)].count("tampered") == 1
    rec = stack.wait_audit(bypass, "policy")
    assert rec.tenant == "globex" and rec.verified
    # one log line for the refusal: its outcome line
    assert stack.outcomes(bypass) == ["policy"]
    assert [line for line in stack.worker_logs().splitlines() if bypass in line] == [
        line for line in stack.worker_logs().splitlines() if f"job '{bypass}' policy" in line
    ]
    # The refused message was globex's own, authenticated: its client learns why.
    job = stack.client("globex").job(bypass)
    with pytest.raises(JobRejected) as caught:
        job.result(timeout=TIMEOUT)
    assert caught.value.reason == "policy"
    assert (job.info().state, job.info().reason) == ("rejected", "policy")
    cli = [sys.executable, "-m", "maas_worker"]
    status = subprocess.run(
        [*cli, "status", bypass, "--tenant", "globex"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (status.returncode, status.stdout) == (0, "rejected (policy)\n"), status.stderr
    result = subprocess.run(
        [*cli, "result", bypass, "--tenant", "globex", "--timeout", "5"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"maas-worker: error: job {bypass}: rejected by a worker: policy "
        "(see `maas-worker audit`)\n"
    )


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([], {}),
        ([1], {}),
        (["a", "b"], {}),
        (["not base64!"], {}),
        (["QUJD"], {}),
        ([{"envelope": "x"}], {}),
        (["QUJD"], {"extra": 1}),
    ],
)
def test_hostile_task_arguments_are_rejected_and_the_worker_carries_on(
    shared_stack: Stack, args: list[object], kwargs: dict[str, object]
) -> None:
    client = shared_stack.client()
    task_id = str(uuid.uuid4())
    client.app.send_task(
        TASK_NAME, args=args, kwargs=kwargs, task_id=task_id, queue=queue_for("high")
    )
    rec = shared_stack.wait_audit(task_id, "malformed")
    assert rec.tenant == ""
    assert client.submit("echo", {"ok": 1}).result(timeout=TIMEOUT) == {"echo": {"ok": 1}}


# -- rotation with jobs in flight ------------------------------------------------------------
def test_rotation_with_jobs_in_flight(make_stack) -> None:
    stack = make_stack()
    v1_ring = load_keyring(stack.keyring_path)
    old_client = stack.client(keyring=v1_ring)  # a client that has not seen the rotation
    in_flight = old_client.submit("echo", {"v": 1})  # sealed under version 1
    ring, v2 = v1_ring.with_rotation("acme")
    assert v2 == 2
    stack.rotate_keyring(ring)
    new_client = stack.client()
    fresh = new_client.submit("echo", {"v": 2})
    worker = stack.start_worker()
    # the old client gets its result (sealed under v1, which it still holds)
    assert in_flight.result(timeout=TIMEOUT) == {"echo": {"v": 1}}
    assert fresh.result(timeout=TIMEOUT) == {"echo": {"v": 2}}
    # once v1 is retired, a v1 job is refused
    worker.stop()
    stack.rotate_keyring(load_keyring(stack.keyring_path).with_state("acme", 1, "retired"))
    late = old_client.submit("echo", {"v": 1})
    stack.start_worker()
    stack.wait_audit(late.id, "unknown_key")
    # A key the workers no longer hold cannot authenticate the message, so the
    # refusal changes no job's state; the client hears of it when its wait ends.
    with pytest.raises(JobRejected, match="key the workers do not hold"):
        late.result(timeout=1)


# -- crashes and duplicates -------------------------------------------------------------------
def test_job_of_a_killed_worker_is_redelivered_and_completes_once(make_stack) -> None:
    # The rescuer's own hold of the message (a busy retry waits up to half the
    # visibility timeout, then the 1 s job) must stay under the visibility
    # timeout, or the sweep rightly puts a second copy back and it is audited
    # `replayed`: with a 2 s timeout and a 2 s job it did, about one run in four.
    stack = make_stack(MAAS_VISIBILITY_TIMEOUT_S="4", MAAS_LEASE_S="3")
    client = stack.client()
    first = stack.start_worker("doomed", concurrency=1)
    job = client.submit("sleep", {"seconds": 1})
    wait_for(lambda: job.status() == "running", TIMEOUT, "the job to start")
    first.kill()  # SIGKILL: no ack, no result, the lease stops being renewed
    stack.start_worker("rescuer", concurrency=1)
    assert job.result(timeout=TIMEOUT)["slept"] >= 1
    assert outcome_lines(stack, job.id).count("succeeded") == 1
    assert not [r for r in stack.audit() if r.job_id == job.id]


def test_duplicate_delivery_while_running_is_not_run_twice(make_stack) -> None:
    stack = make_stack(MAAS_LEASE_S="3")
    client = stack.client()
    job = client.submit("sleep", {"seconds": 2}, priority="normal")
    raw = stack.backend.lindex(stack.tenant_queue("normal"), 0)
    stack.start_worker(concurrency=2)
    wait_for(lambda: job.status() == "running", TIMEOUT, "the job to start")
    stack.backend.lpush(queue_for("normal"), raw)  # a second copy, e.g. redelivery
    assert job.result(timeout=TIMEOUT)["slept"] >= 2
    stack.wait_audit(job.id, "replayed")  # the copy waited, then saw the result
    assert outcome_lines(stack, job.id).count("succeeded") == 1


# -- no plaintext anywhere -------------------------------------------------------------------
def test_no_plaintext_in_redis_or_worker_logs(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    marker = f"secret-input-{time.time_ns()}"
    stack.start_worker()
    jobs = [
        client.submit("echo", {"text": marker, "i": i}, priority=p)
        for i, p in enumerate(["high", "normal", "low"] * 3)
    ]
    failing = client.submit("sleep", {"seconds": marker})  # error path too
    for job in jobs:
        assert job.result(timeout=TIMEOUT)["echo"]["text"] == marker
    with pytest.raises(JobFailed):
        failing.result(timeout=TIMEOUT)
    keys_read, hits = scan_for(stack.backend, [marker.encode()])
    assert keys_read > 10
    assert hits == []
    # The outcome lines are written just after the results are stored: the log
    # searched is the real one once they are there.
    logs = wait_for(
        lambda: (text := stack.worker_logs()).count("succeeded") >= len(jobs) and text,
        TIMEOUT,
        "the workers' outcome lines",
    )
    assert marker not in logs
    secret = load_keyring(stack.keyring_path).tenant("acme").primary().secret
    assert base64.b64encode(secret).decode() not in logs
    assert secret.hex() not in logs


# -- priority ------------------------------------------------------------------------------------
def test_queues_are_consumed_high_then_normal_then_low(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    lows = [client.submit("sleep", {"seconds": 0.05}, priority="low") for _ in range(12)]
    normal = client.submit("echo", {"p": "normal"}, priority="normal")
    high = client.submit("echo", {"p": "high"}, priority="high")
    stack.start_worker(concurrency=1)
    for job in [high, normal, *lows]:
        job.result(timeout=TIMEOUT)
    order = stack.finished_order([j.id for j in [high, normal, *lows]])
    assert len(order) == 14
    # with one process and prefetch 1, at most one low job is reserved ahead
    assert order.index(high.id) <= 1
    assert order.index(normal.id) <= 2
    assert order.index(high.id) < order.index(normal.id)


def test_a_job_that_keeps_killing_its_worker_fails_as_worker_lost(make_stack) -> None:
    """Crash-loop protection: after max_attempts starts, each ended by a dead worker."""
    from maas_worker.backend.claims import DEFAULT_MAX_ATTEMPTS

    stack = make_stack(MAAS_VISIBILITY_TIMEOUT_S="1", MAAS_LEASE_S="3")
    job = stack.client().submit("sleep", {"seconds": 30})
    for attempt in range(DEFAULT_MAX_ATTEMPTS):
        worker = stack.start_worker(f"crash{attempt}", concurrency=1)
        started = str(attempt + 1).encode()
        wait_for(
            lambda n=started: (
                stack.backend.get(keyspace.attempts("acme", job.id)) == n
                and job.status() == "running"
            ),
            TIMEOUT,
            f"start #{attempt + 1}",
        )
        worker.kill()
    stack.start_worker("last", concurrency=1)
    with pytest.raises(JobFailed) as err:
        job.result(timeout=TIMEOUT)
    assert err.value.reason == "worker_lost"
    assert outcome_lines(stack, job.id) == ["failed"]


def test_redis_down_is_a_clear_retryable_error_not_a_hang(make_stack, client_kind: str) -> None:
    from maas_worker import ServiceUnavailable
    from maas_worker.local.embedded import free_port

    not_through_gateway(
        client_kind,
        "a gateway does not start without its Redis (its 503 while Redis is down is "
        "test_gateway.py::test_redis_down_is_503)",
    )
    stack = make_stack()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stack.env.update(MAAS_BROKER_URL=dead, MAAS_RESULT_BACKEND=dead)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="retry later"):
        stack.client(kind=client_kind).submit("echo", {})
    with pytest.raises(ServiceUnavailable, match="retry later"):
        stack.client(kind=client_kind).job(str(uuid.uuid4())).result(timeout=30)
    assert time.monotonic() - started < 30


def test_large_requests_travel_by_claim_check(make_stack) -> None:
    """A sealed request over 64 KiB waits raw in Redis; the message only points at it."""
    stack = make_stack(MAAS_MAX_INPUT_BYTES=str(4 << 20), MAAS_MAX_RESULT_BYTES=str(8 << 20))
    client = stack.client()
    marker = f"big-secret-{time.time_ns()}"
    big = {"text": marker + "y" * (1 << 20)}
    job = client.submit("echo", big, priority="normal")
    raw = stack.backend.lindex(stack.tenant_queue("normal"), 0)
    assert len(raw) < 8192  # the message is small: no double-encoded megabytes
    assert stack.backend.strlen(keyspace.payload("acme", job.id)) > 1 << 20
    stack.start_worker()
    assert job.result(timeout=TIMEOUT) == {"echo": big}
    assert not stack.backend.exists(keyspace.payload("acme", job.id))  # gone with the result
    _, hits = scan_for(stack.backend, [marker.encode()])
    assert hits == []
    # replaying the small message finds no request: refused, not run
    stack.backend.lpush(queue_for("normal"), raw)
    stack.wait_audit(job.id, "replayed")
    # a pointer to a request that was never stored is malformed
    no_payload = str(uuid.uuid4())
    client.app.send_task(
        TASK_NAME, args=["ref:payload:acme"], task_id=no_payload, queue=queue_for("normal")
    )
    stack.wait_audit(no_payload, "malformed")
