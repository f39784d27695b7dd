"""Which remote-control commands a worker runs, per MAAS_REMOTE_CONTROL (control.py)."""

from __future__ import annotations

import pytest
from celery.worker.control import Panel

from maas_worker.errors import ConfigError
from maas_worker.settings import Settings
from maas_worker.worker.control import INSPECT_COMMANDS, NEVER_COMMANDS, refusal

QUEUES = {"maas.high", "maas.normal", "maas.low", "maas.monitor"}


def test_only_read_only_commands_run_by_default() -> None:
    for command in Panel.meta:
        why = refusal(command, {}, mode="inspect", queues=QUEUES)
        if command in INSPECT_COMMANDS:
            assert why is None, command
        else:
            assert why is not None, command
    # what Flower and `celery inspect` ask is all there
    for command in (
        "ping",
        "stats",
        "active",
        "reserved",
        "scheduled",
        "registered",
        "active_queues",
        "conf",
        "revoked",
        "query_task",
        "enable_events",
    ):
        assert command in Panel.meta and refusal(command, {}, mode="inspect", queues=QUEUES) is None


def test_every_inspect_command_is_one_celery_calls_inspect() -> None:
    assert set(Panel.data) >= INSPECT_COMMANDS  # names and their dump_* aliases
    for command in INSPECT_COMMANDS & set(Panel.meta) - {"heartbeat", "enable_events"}:
        assert Panel.meta[command].type == "inspect", command


@pytest.mark.parametrize(
    "command",
    [
        "shutdown",
        "pool_restart",
        "rate_limit",
        "time_limit",
        "autoscale",
        "cancel_consumer",
        "disable_events",
    ],
)
def test_the_operator_setting_opens_the_rest(command: str) -> None:
    assert "MAAS_REMOTE_CONTROL=operator" in str(
        refusal(command, {}, mode="inspect", queues=QUEUES)
    )
    assert refusal(command, {}, mode="operator", queues=QUEUES) is None


def test_revoke_and_unconfigured_queues_are_refused_whatever_the_setting() -> None:
    for mode in ("inspect", "operator"):
        for command in NEVER_COMMANDS:
            assert "maas-worker cancel" in str(refusal(command, {}, mode=mode, queues=QUEUES))
    assert refusal("add_consumer", {"queue": "maas.low"}, mode="operator", queues=QUEUES) is None
    for queue in ("celery", "evil", None, "\x00" * 500):
        why = refusal("add_consumer", {"queue": queue}, mode="operator", queues=QUEUES)
        assert why is not None and "never consumed" in why and len(why) < 200


def test_the_setting_is_checked() -> None:
    assert Settings.from_env({}).remote_control == "inspect"
    assert Settings.from_env({"MAAS_REMOTE_CONTROL": "operator"}).remote_control == "operator"
    with pytest.raises(ConfigError, match="MAAS_REMOTE_CONTROL must be one of inspect, operator"):
        Settings.from_env({"MAAS_REMOTE_CONTROL": "all"})
