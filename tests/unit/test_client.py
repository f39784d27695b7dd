"""`Client` and `Job` without a server: priorities, job states (fakeredis)."""

from __future__ import annotations

import base64
import time
from typing import Any

import fakeredis
import pytest
import redis

from maas_worker import (
    Client,
    JobExpired,
    JobInfo,
    JobRejected,
    JobState,
    Priority,
    Settings,
    SubmitError,
    UnknownModel,
)
from maas_worker.backend import catalog, keyspace
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


def test_before_any_worker_the_bundled_models_are_served_then_what_workers_advertised(
    client: Client,
) -> None:
    # A fresh deployment: the shipped digits release, by name and by version.
    assert {"digits", "digits@2", "echo"} <= client.served_models()
    assert client.seal("digits", {"inputs": []})[0].model == "digits"
    # Once a worker has advertised, the durable record is the truth: a model
    # this deployment never served is refused, even the bundled one...
    catalog.advertise(client.backend, "node-1", ["custom", "custom@3"])
    client.backend.delete(keyspace.CATALOG)  # ...and even after the live entries aged out
    served = client.served_models()
    assert {"custom", "custom@3"} <= served and "digits" not in served
    with pytest.raises(UnknownModel, match="unknown model 'digits'"):
        client.seal("digits", {"inputs": []})
    assert client.seal("custom@3", {})[0].model == "custom@3"


def test_live_workers_counts_nodes_with_a_recent_heartbeat(client: Client) -> None:
    assert client.live_workers() == 0
    client.backend.zadd(keyspace.NODES, {"old": time.time() - catalog.NODE_LIVE_S - 5})
    assert client.live_workers() == 0
    catalog.advertise(client.backend, "node-1", [])
    assert client.live_workers() == 1
    catalog.withdraw(client.backend, "node-1")
    client._live = (0.0, 0)  # past the cache
    assert client.live_workers() == 0


def test_a_redis_acl_from_before_the_durable_catalogue_falls_back_to_the_live_one(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from maas_worker.client import client as client_module

    real_run = client_module.run_plan

    def refusing(r: Any, plan: Any) -> Any:
        # The durable catalogue is one of the keys an old ACL did not let producers read.
        if ("SMEMBERS", keyspace.MODELS) in plan.commands:
            raise redis.exceptions.NoPermissionError("NOPERM maas:models")
        return real_run(r, plan)

    monkeypatch.setattr(client_module, "run_plan", refusing)
    catalog.advertise(client.backend, "node-1", ["custom@3"])
    served = client.served_models()
    assert "custom@3" in served and "digits" not in served
