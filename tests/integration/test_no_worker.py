"""Submitting while no worker is up: the job is queued for a model of the deployment.

A service may start before its workers (or outlive them for more than the
catalogue's hour): ``submit`` still takes a job for a model this deployment
serves, says that no worker is consuming, and the job runs once one starts.
A model nobody ever served is still refused at the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from maas_worker.backend import keyspace
from maas_worker.models.paths import BUNDLED_MODEL_DIR
from tests.modelkit import holdout

from .conftest import WAIT_S, Stack

pytestmark = pytest.mark.integration
SAMPLES = holdout()
FEW = {"inputs": SAMPLES["inputs"][:2]}
FEW_LABELS = SAMPLES["sklearn_predictions"][:2]


def test_digits_is_queued_before_any_worker_and_runs_once_one_starts(
    make_stack: Callable[..., Stack],
) -> None:
    # A fresh deployment of the shipped model: an empty Redis, no worker ever.
    stack = make_stack(MAAS_MODEL_DIR=str(BUNDLED_MODEL_DIR), MAAS_DIAGNOSTIC_MODELS="0")
    out = stack.cli("submit", "--model", "digits", "--input", json.dumps(FEW))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert out.stderr == f"queued; no worker is consuming right now (job {job_id})\n"
    assert stack.cli("status", job_id).stdout.strip() == "queued"

    # A model nobody has ever served is still refused, before anything is enqueued.
    never = stack.cli("submit", "--model", "nosuch", "--input", "{}")
    assert never.returncode == 1
    assert "unknown model 'nosuch'" in never.stderr and len(never.stderr.splitlines()) == 1
    assert stack.backend.llen(stack.tenant_queue("normal")) == 1

    worker = stack.start_worker()
    res = stack.cli("result", job_id, "--timeout", str(WAIT_S))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["labels"] == FEW_LABELS

    # With a worker live, submit is as quiet as ever (the id on stdout only).
    live = stack.client().submit("digits", FEW)
    assert live.worker_live is True
    assert live.result(timeout=WAIT_S)["labels"] == FEW_LABELS

    # The worker gone and its live catalogue entries aged out (an hour later):
    # the deployment's models are still accepted, and say so.
    worker.stop()
    stack.backend.delete(keyspace.CATALOG)
    later = stack.client().submit("digits@2", FEW)
    assert later.worker_live is False
    assert later.status() == "queued"
    refused = stack.cli("submit", "--model", "nosuch", "--input", "{}")
    assert refused.returncode == 1 and "unknown model 'nosuch'" in refused.stderr


def test_a_deployment_that_never_served_the_bundled_model_refuses_it(
    make_stack: Callable[..., Stack],
) -> None:
    # Its workers serve only the diagnostic models (an empty model folder).
    stack = make_stack()
    stack.start_worker().stop()
    assert stack.client().submit("echo", {"a": 1}).worker_live is False
    out = stack.cli("submit", "--model", "digits", "--input", json.dumps(FEW))
    assert out.returncode == 1
    assert "unknown model 'digits'" in out.stderr
