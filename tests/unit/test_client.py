"""`Client` and `Job` without a server: priorities, job states (fakeredis)."""

from __future__ import annotations

import base64

import fakeredis
import pytest

from maas_worker import (
    Client,
    JobExpired,
    JobInfo,
    JobRejected,
    JobState,
    Priority,
    Settings,
    SubmitError,
)
from maas_worker.backend import keyspace
from maas_worker.crypto.envelope import now_ms, parse_unverified_header
from maas_worker.tenancy.keyring import Keyring

JOB = "5e0c6a4e-7d1b-4c38-9a51-2f7f9a0c1b2d"


@pytest.fixture
def client() -> Client:
    settings = Settings.from_env({"MAAS_TENANT": "acme", "MAAS_DIAGNOSTIC_MODELS": "1"})
    c = Client(settings=settings, keyring=Keyring().with_new_tenant("acme"))
    c._backend = fakeredis.FakeRedis()  # the served-model catalog is read from here
    return c


@pytest.mark.parametrize("priority", [Priority.HIGH, "high"])
def test_a_priority_member_and_its_name_seal_the_same_header(client: Client, priority: str) -> None:
    header, sealed = client.seal("echo", {"text": "hi"}, priority=priority)
    assert header.priority == "high" and type(header.priority) is str
    assert parse_unverified_header(base64.b64decode(sealed)).priority == "high"


def test_an_unknown_priority_is_refused_with_the_same_message(client: Client) -> None:
    with pytest.raises(SubmitError) as caught:
        client.seal("echo", {}, priority="urgent")
    assert str(caught.value) == "invalid priority 'urgent': use high, normal or low"


def test_job_info_and_status_read_the_state_from_redis(client: Client) -> None:
    job = client.job(JOB)
    r = client.backend
    r.set(keyspace.submitted("acme", JOB), str(now_ms() + 60_000))
    assert job.info() == JobInfo(JOB, JobState.QUEUED)
    assert job.status() == "queued" and job.status() is JobState.QUEUED
    r.set(keyspace.claim("acme", JOB), "worker-1")
    assert job.status() == "running"
    r.set(keyspace.rejected("acme", JOB), "expired")
    info = job.info()
    assert (info.state, info.reason, info.model) == ("expired", None, None)
    r.set(keyspace.rejected("acme", JOB), "rejected")
    assert job.status() == "rejected"
    assert job.info().reason is None  # a worker before 0.2 wrote no reason
    r.set(keyspace.rejected("acme", JOB), "rejected:policy")
    assert job.info() == JobInfo(JOB, JobState.REJECTED, "policy")
    r.set(keyspace.rejected("acme", JOB), "rejected:not a reason")
    assert job.info() == JobInfo(JOB, JobState.REJECTED, None)


def test_result_of_a_rejected_job_raises_with_its_reason(client: Client) -> None:
    job = client.job(JOB)
    client.backend.set(keyspace.rejected("acme", JOB), "rejected:rate_limited")
    with pytest.raises(JobRejected) as caught:
        job.result(timeout=1)
    assert caught.value.reason == "rate_limited"
    assert str(caught.value) == (
        f"job {JOB}: rejected by a worker: rate_limited (see `maas-worker audit`)"
    )
    client.backend.set(keyspace.rejected("acme", JOB), "expired")
    with pytest.raises(JobExpired) as expired:
        job.result(timeout=1)
    assert expired.value.reason == "expired"
    client.backend.set(keyspace.rejected("acme", JOB), "rejected")
    with pytest.raises(JobRejected) as old:
        job.result(timeout=1)
    assert old.value.reason is None
    assert str(old.value) == f"job {JOB}: rejected by a worker (see `maas-worker audit`)"
