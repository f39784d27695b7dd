"""A job is (tenant, id): ``status``, ``result`` and ``cancel`` of an id this tenant
has no job of say ``unknown job`` at once; cancelling a finished job says what it was."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from maas_worker.backend import keyspace

from .conftest import WAIT_S, Stack

pytestmark = pytest.mark.integration
#: Longer than any of these commands may take: one that waits for it fails the test.
PATIENCE_S = 30.0


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return stack.cli(*args, timeout=PATIENCE_S)


def test_cancel_of_an_unknown_id_is_an_error_and_writes_nothing(shared_stack: Stack) -> None:
    job_id = str(uuid.uuid4())
    out = cli(shared_stack, "cancel", job_id)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith(f"maas-worker: error: job {job_id}: unknown job: ")
    assert len(out.stderr.splitlines()) == 1
    assert not shared_stack.backend.exists(keyspace.cancel("acme", job_id))


def test_cancelling_a_finished_job_says_how_it_finished(shared_stack: Stack) -> None:
    with shared_stack.client() as client:
        job = client.submit("echo", {"done": True})
        assert job.result(timeout=WAIT_S) == {"echo": {"done": True}}
    out = cli(shared_stack, "cancel", job.id)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"maas-worker: error: job {job.id}: already succeeded; nothing to cancel\n"
    assert cli(shared_stack, "status", job.id).stdout == "succeeded\n"


def test_result_of_an_unknown_id_fails_at_once(shared_stack: Stack) -> None:
    job_id = str(uuid.uuid4())
    # A timeout far beyond PATIENCE_S: waiting it out would fail the test.
    out = cli(shared_stack, "result", job_id, "--timeout", "600")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"maas-worker: error: job {job_id}: unknown job (never submitted, or expired)\n"
    )


def test_another_tenants_job_is_unknown_to_status_result_and_cancel(shared_stack: Stack) -> None:
    with shared_stack.client("globex") as globex:
        theirs = globex.submit("echo", {"owner": "globex"})
        assert theirs.result(timeout=WAIT_S) == {"echo": {"owner": "globex"}}
    for args in (("status",), ("result", "--timeout", "600"), ("cancel",)):
        out = cli(shared_stack, args[0], theirs.id, *args[1:])  # as acme
        assert out.returncode == 1, args
        assert out.stderr.startswith(f"maas-worker: error: job {theirs.id}: unknown job"), (
            args,
            out.stderr,
        )
    with shared_stack.client("acme") as acme:
        assert acme.job(theirs.id).exists() is False
    # Theirs is untouched.
    with shared_stack.client("globex") as globex:
        assert globex.job(theirs.id).exists() is True
        assert globex.job(theirs.id).status() == "succeeded"
        assert globex.job(theirs.id).result(timeout=WAIT_S) == {"echo": {"owner": "globex"}}
