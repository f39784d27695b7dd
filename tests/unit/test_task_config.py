"""The task and app settings that the no-loss guarantees rest on."""

from __future__ import annotations

from maas_worker.app import celery_config
from maas_worker.settings import Settings
from maas_worker.worker.tasks import infer


def test_retries_never_turn_into_an_acked_failure() -> None:
    # Celery's retry(max_retries=None) means "the task's limit" (3 by default):
    # a job waiting on a busy copy would fail, be acked and be lost.
    assert infer.max_retries is None
    assert infer.acks_late is True
    assert infer.ignore_result is True


def test_app_settings_behind_the_guarantees() -> None:
    conf = celery_config(Settings.from_env({}))
    assert conf["accept_content"] == ["json"]
    assert conf["task_reject_on_worker_lost"] is True  # a killed child hands its job back
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_track_started"] is False
    assert conf["result_backend"] is None  # results never go through Celery's backend


def test_a_sweep_lock_left_behind_expires_in_seconds_not_minutes() -> None:
    # A sweep cut off by Redis mid-pass cannot release its lock: until the
    # lock expires no sweep runs, and messages whose take reply was lost stay
    # reserved (kombu's default: 300 s). Ours: a tenth of the visibility
    # timeout, at least 10 s.
    from maas_worker.broker.app import transport_options

    for vt_s, expire_s in ((5, 10), (600, 60), (3600, 360)):
        opts = transport_options(Settings.from_env({"MAAS_VISIBILITY_TIMEOUT_S": str(vt_s)}))
        assert opts["unacked_mutex_expire"] == expire_s
        assert opts["unacked_mutex_expire"] >= opts["unacked_restore_interval"]


def test_a_job_that_did_not_succeed_is_a_failure_celery_acks_and_does_not_store() -> None:
    # The task raises JobNotSucceeded (worker/task_state.py) so its event says FAILURE:
    # acknowledged like a success, never retried, logged without a traceback,
    # and kept out of any result backend.
    from maas_worker.errors import JobNotSucceeded

    assert JobNotSucceeded in infer.throws
    assert infer.acks_on_failure_or_timeout is True
    assert infer.store_errors_even_if_ignored is False
    assert not getattr(infer, "autoretry_for", ())
    assert "task_acks_on_failure_or_timeout" not in celery_config(Settings.from_env({}))
