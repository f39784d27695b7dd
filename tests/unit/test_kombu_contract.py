"""Every private kombu and Celery member maas-worker overrides, calls or reads still exists.

The transport (transport.py, fetch.py), the remote-control gate (control.py)
and Flower's launcher (cli.py) lean on members kombu and Celery do not
promise: ``Channel._flush_brpop_reauth`` first appears in kombu 5.7.0, so an
install that allowed 5.5 broke every poll. pyproject.toml pins both to the
minor these tests ran against; when a new minor is allowed, this file says
what to re-read.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import celery
import kombu
from celery.worker import autoscale, components, worker
from celery.worker import control as worker_control
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer, mingle
from celery.worker.control import Panel
from kombu import pidbox
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

ROOT = Path(__file__).resolve().parents[2]

#: Methods of kombu's Redis channel we override (same signature use) or call.
CHANNEL_METHODS = [
    "_put",
    "_do_restore_message",
    "basic_consume",
    "_brpop_start",
    "_brpop_read",
    "_create_client",
    "_get_message_priority",
    "_q_for_pri",
    "_flush_brpop_reauth",
    "conn_or_acquire",
    "basic_cancel",
    # Queue shards (shards.py): our prefixing client, and pinned connections.
    "_get_client",
    "_connparams",
]
#: Attributes kombu's Redis channel sets (in its source) that we read or write.
CHANNEL_ATTRIBUTES = [
    "_fanout_queues",
    "_queue_cycle",
    "_in_poll",
    "_brpop_sent_at",
    "priority_steps",
    "global_keyprefix",
    "unacked_key",
    "unacked_index_key",
    "brpop_timeout",
    "active_queues",
    "_expires",
]
#: kombu's Redis QoS: overridden or called.
QOS_METHODS = [
    "append",
    "restore_unacked_once",
    "ack",
    "reject",
    "_remove_from_indices",
    "restore_visible",
]
QOS_ATTRIBUTES = ["_delivered"]


def _source(*objs: object) -> str:
    return "\n".join(inspect.getsource(o) for o in objs)  # type: ignore[arg-type]


#: Where kombu's Redis transport and its virtual base define their members.
KOMBU_SOURCE = _source(kombu_redis, virtual.base)


def _defined(name: str) -> bool:
    """Whether kombu's source assigns ``name`` or defines it (a property)."""
    return re.search(rf"\b{name}\b\s*=|def {name}\b", KOMBU_SOURCE) is not None


def test_the_channel_members_exist() -> None:
    for name in CHANNEL_METHODS:
        assert callable(getattr(kombu_redis.Channel, name, None)), name
    for name in CHANNEL_ATTRIBUTES:
        assert _defined(name), name


def test_the_key_prefixing_members_the_shards_lean_on_exist() -> None:
    """transport.PrefixedClient extends kombu's prefixing mixin (its command lists, its
    pipeline class) and HardenedChannel._connparams swaps the connection class."""
    mixin = kombu_redis.GlobalKeyPrefixMixin
    assert isinstance(mixin.PREFIXED_SIMPLE_COMMANDS, list)
    assert {"LPUSH", "SADD", "PUBLISH", "ZADD", "HDEL"} <= set(mixin.PREFIXED_SIMPLE_COMMANDS)
    assert "BRPOP" in mixin.PREFIXED_COMPLEX_COMMANDS
    assert issubclass(kombu_redis.PrefixedStrictRedis, mixin)
    assert issubclass(kombu_redis.PrefixedRedisPipeline, mixin)
    # Fan-out channel names (SUBSCRIBE) carry the prefix too.
    assert "global_keyprefix" in inspect.getsource(kombu_redis.PrefixedRedisPubSub)
    # _connparams returns the connection class it chose (we subclass it).
    assert "connparams['connection_class'] = connection_cls" in inspect.getsource(
        kombu_redis.Channel._connparams
    )
    # Unknown transport options stay on the connection for the channel to read.
    assert "transport_options" in inspect.getsource(kombu.Connection.__init__)


def test_the_qos_and_transport_members_exist() -> None:
    for name in QOS_METHODS:
        assert callable(getattr(kombu_redis.QoS, name, None)), name
    for name in QOS_ATTRIBUTES:
        assert _defined(name), name
    assert kombu_redis.Transport.Channel is not None  # transport.install() replaces it
    # The channel hands deliveries to the connection's callbacks.
    assert _defined("_callbacks")
    assert callable(getattr(virtual.Transport, "_deliver", None))


def test_the_remote_control_members_exist() -> None:
    assert pidbox.Mailbox.node_cls is pidbox.Node  # control.configure swaps it
    assert list(inspect.signature(pidbox.Node.handle).parameters) == ["self", "method", "arguments"]
    assert callable(worker_state.merge_revoked)  # control.configure replaces it
    # the two ways revoked ids arrive from other nodes both go through it
    assert "worker_state.merge_revoked(" in _source(worker_control.hello)
    assert "state.merge_revoked(" in _source(mingle)
    assert {"ping", "stats", "revoke", "shutdown", "add_consumer"} <= set(Panel.data)


def test_the_worker_members_the_node_steps_lean_on_exist() -> None:
    # worker/node.py: NodeStep.create runs before the consumer (and its
    # pidbox node) is built because the consumer step is created last; the
    # consumer reaches the worker as `controller`, which holds the autoscaler;
    # ServeStep.shutdown runs once, after the worker's steps (the pool) stopped.
    assert components.Consumer.last is True
    assert "controller=w" in _source(components.Consumer.create)
    assert "w.autoscaler = " in _source(autoscale.WorkerComponent.create)
    assert "self.consumer.shutdown()" in _source(worker.WorkController.on_stopped)
    assert "'shutdown'" in _source(Consumer.Blueprint.shutdown)


def test_kombu_and_celery_are_pinned_to_the_tested_minor() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, version in (("kombu", kombu.__version__), ("celery[redis]", celery.__version__)):
        major, minor = version.split(".")[:2]
        pin = f'"{name}>={major}.{minor},<{major}.{int(minor) + 1}"'
        assert pin in pyproject, f"pyproject.toml should pin {pin} (tested with {version})"
