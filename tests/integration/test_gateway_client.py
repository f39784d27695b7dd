"""The same client behaviour through Redis and through the gateway: `Client(gateway_url=...)`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from maas_worker import Client, JobState
from maas_worker.client.viagateway import GatewayClient
from maas_worker.errors import JobCancelled, PolicyDenied, UnknownJob
from maas_worker.settings import Settings

from .conftest import Stack
from .gatewaykit import GatewayProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(shared_stack: Stack) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(shared_stack, "gateway-client")
    yield gw
    gw.stop()


@pytest.fixture(params=["redis", "gateway"])
def make_client(request: pytest.FixtureRequest, shared_stack: Stack) -> Iterator[Any]:
    made: list[Client] = []

    def factory(tenant: str = "acme") -> Client:
        settings = Settings.from_env({**shared_stack.env, "MAAS_TENANT": tenant})
        if request.param == "gateway":
            gw: GatewayProcess = request.getfixturevalue("gateway")
            client = Client(settings=settings, gateway_url=gw.url)
            assert isinstance(client, GatewayClient)
        else:
            client = Client(settings=settings)
        made.append(client)
        return client

    yield factory
    for c in made:
        c.close()


def test_submit_and_result(make_client: Any) -> None:
    client = make_client()
    job = client.submit("echo", {"text": "hi"})
    assert job.result(timeout=30) == {"echo": {"text": "hi"}}
    info = job.info()
    assert info.state == JobState.SUCCEEDED and info.model.startswith("echo@")
    assert job.exists()


def test_submit_many(make_client: Any) -> None:
    client = make_client()
    jobs = client.submit_many("echo", [{"n": n} for n in range(5)])
    assert [j.result(timeout=30) for j in jobs] == [{"echo": {"n": n}} for n in range(5)]


def test_policy_refused(make_client: Any) -> None:
    with pytest.raises(PolicyDenied):
        make_client("globex").submit("sleep", {"seconds": 0})


def test_unknown_and_other_tenants_jobs(make_client: Any) -> None:
    mine = make_client("acme").submit("echo", {"x": 1})
    other = make_client("globex")
    for job_id in (mine.id, str(uuid.uuid4())):
        assert not other.job(job_id).exists()
        with pytest.raises(UnknownJob):
            other.job(job_id).info()
    assert mine.result(timeout=30) == {"echo": {"x": 1}}


def test_cancel_a_queued_job(make_client: Any) -> None:
    client = make_client()
    busy = [client.submit("sleep", {"seconds": 2}) for _ in range(2)]
    job = client.submit("sleep", {"seconds": 2}, priority="low")
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        job.result(timeout=30)
    assert job.status() == JobState.CANCELLED
    for b in busy:
        b.result(timeout=30)
