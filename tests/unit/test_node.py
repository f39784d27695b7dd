"""The worker node's bootsteps (worker/node.py): when the node is announced and withdrawn.

The real lifecycle runs in tests/integration/test_node.py; here, what a real
worker cannot easily be made to do on cue: reconnect to the broker, or stop
cold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from maas_worker.app import make_app
from maas_worker.settings import Settings
from maas_worker.worker import node as node_module
from maas_worker.worker.node import Node, NodeStep, ServeStep


class FakeAdvertiser:
    """Records what the node does with its advertisement."""

    events: list[str]

    def __init__(self, settings: Settings, node: str) -> None:
        self.node = node

    def share(self, *, reannounce: bool = False) -> None:
        self.events.append("weights published")

    def start(self) -> None:
        self.events.append("announced")

    def stop(self) -> None:
        self.events.append("withdrawn")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(FakeAdvertiser, "events", seen, raising=False)
    monkeypatch.setattr(node_module, "Advertiser", FakeAdvertiser)
    monkeypatch.setattr(node_module, "backend_client", lambda settings: fakeredis.FakeRedis())
    return seen


def _worker(tmp_path: Path) -> tuple[Any, Any, Node]:
    """A worker and its consumer as the two steps see them, with an unprepared node."""
    settings = Settings.from_env(
        {"MAAS_DIAGNOSTIC_MODELS": "1", "MAAS_MODEL_DIR": str(tmp_path / "models")}
    )
    node = Node(None, "n@host", settings)
    worker = SimpleNamespace(maas_node=node, autoscaler=None)
    return worker, SimpleNamespace(controller=worker), node


def test_the_worker_app_carries_the_node_steps_and_a_producer_app_none() -> None:
    settings = Settings.from_env({})
    worker_app = make_app(settings)
    assert worker_app.steps["worker"] == {"maas_worker.worker.node:NodeStep"}
    assert worker_app.steps["consumer"] == {"maas_worker.worker.node:ServeStep"}
    producer_app = make_app(settings, include_tasks=False)
    assert not producer_app.steps["worker"] and not producer_app.steps["consumer"]


def test_a_broker_reconnection_neither_withdraws_nor_announces_again(
    tmp_path: Path, events: list[str]
) -> None:
    _, consumer, _ = _worker(tmp_path)
    serve = ServeStep(consumer)
    serve.start(consumer)
    serve.stop(consumer)  # Celery restarts a consumer's steps when the connection drops
    serve.start(consumer)
    # The weights first: the take reads them from the first job on (fair share).
    assert events == ["weights published", "announced"]
    serve.shutdown(consumer)  # the worker stops (warm)
    assert events == ["weights published", "announced", "withdrawn"]


def test_a_cold_shutdown_leaves_the_node_to_expire(tmp_path: Path, events: list[str]) -> None:
    worker, consumer, node = _worker(tmp_path)
    step = NodeStep(worker)  # as Celery does: the step, then the node it creates
    worker.maas_node = step.obj = node
    ServeStep(consumer).start(consumer)
    step.terminate(worker)
    ServeStep(consumer).shutdown(consumer)
    assert events == ["weights published", "announced"]


def test_the_stats_reply_carries_the_nodes_latest_sample(tmp_path: Path, events: list[str]) -> None:
    import time

    from maas_worker.backend import keyspace
    from maas_worker.monitoring.samples import SampleStore, take_sample

    worker, _, node = _worker(tmp_path)
    step = NodeStep(worker)
    worker.maas_node = step.obj = node  # as Celery does: the step, then the node it creates
    backend = fakeredis.FakeRedis()
    node.samples = SampleStore(backend, interval_s=node.settings.sample_interval_s)
    none_yet = step.info(worker)
    assert none_yet["sample"] is None and none_yet["sample taken"].startswith("none in the last")
    sample = take_sample("n@host", main_pid=os.getpid(), interval_s=15, jobs=(2, 0.5))
    node.samples.record(sample)
    node.samples.record(take_sample("other@host", main_pid=os.getpid(), interval_s=15))
    info = step.info(worker)
    assert info["sample"] == json.loads(backend.get(keyspace.sample("n@host")))
    assert info["sample"]["node"] == "n@host"  # this node's, not another's
    assert info["sample jobs"] == "2 finished"
    assert time.time() - info["sample"]["at"] < 60


def test_a_stats_reply_survives_an_unreachable_result_backend(
    tmp_path: Path, events: list[str]
) -> None:
    import redis

    worker, _, node = _worker(tmp_path)

    class Down(fakeredis.FakeRedis):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("down")

    from maas_worker.monitoring.samples import SampleStore

    node.samples = SampleStore(Down(), interval_s=15)
    step = NodeStep(worker)
    worker.maas_node = step.obj = node
    info = step.info(worker)
    assert info == {
        "worker mode": "Celery tasks",
        "sample taken": "unknown: the result backend did not answer (ConnectionError)",
        "sample": None,
    }
