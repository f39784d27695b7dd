"""Dynamic batching: many digits jobs, fewer model calls, each job still on its own."""

from __future__ import annotations

import re

import pytest

from maas_worker import JobFailed
from maas_worker.models.paths import BUNDLED_MODEL_DIR

from ..modelkit import holdout
from .conftest import wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0


def test_digits_jobs_are_batched_and_each_gets_its_own_result(make_stack) -> None:
    stack = make_stack(MAAS_MODEL_DIR=str(BUNDLED_MODEL_DIR))
    data = holdout()
    samples = data["inputs"][:48]
    expected = data["sklearn_predictions"][:48]
    stack.start_worker(
        concurrency=16,
        env={"MAAS_BATCH": "digits=16:20"},
        args=("--pool", "threads", "--loglevel", "DEBUG"),
    )
    client = stack.client()
    # one pipeline: the worker finds many jobs at once
    jobs = client.submit_many("digits", [{"inputs": [s]} for s in samples])
    labels = [job.result(timeout=TIMEOUT)["labels"] for job in jobs]
    assert labels == [[e] for e in expected]  # each job got ITS OWN rows back
    # a bad input fails only its own job, even inside a batch
    mixed = client.submit_many(
        "digits", [{"inputs": [samples[0]]}, {"inputs": [[1, 2]]}, {"inputs": [samples[1]]}]
    )
    assert mixed[0].result(timeout=TIMEOUT)["labels"] == [expected[0]]
    assert mixed[2].result(timeout=TIMEOUT)["labels"] == [expected[1]]
    # Its batch-mates finishing first says nothing about when it finishes: wait for it.
    with pytest.raises(JobFailed):
        mixed[1].result(timeout=TIMEOUT)
    assert mixed[1].info().state == "failed"
    assert mixed[1].info().reason == "bad_input"
    sizes = wait_for(
        lambda: [int(n) for n in re.findall(r"batch of (\d+) for digits", stack.worker_logs())],
        TIMEOUT,
        "batch log lines",
    )
    assert sum(sizes) == 51
    assert max(sizes) > 1  # jobs really shared model calls
    assert len(sizes) < 51
