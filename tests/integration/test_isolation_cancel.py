"""Attack 4: only a job's own tenant can cancel it; a foreign request blocks nothing.

Before: ``maas-worker cancel <B's job> --tenant A`` printed ``cancelled`` and
exited 0; the owner's cancel then printed ``running`` and the job ran to the
end (the request was ``SET NX``: the first one won), and the audit named the
victim. Now a client can only reach its own tenant's jobs (A's cancel of
B's id finds no job of A's: a clear error, nothing written), the owner's
request always lands, and a foreign request a Redis writer planted is
refused by the worker, audited under whoever signed it, and deleted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from maas_worker import JobCancelled
from maas_worker.tenancy.cancellation import make_token
from maas_worker.tenancy.keyring import load_keyring

from .attacker import Attacker, assert_victims_done, keyspace, victims, wait_audited_once
from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration


def cli(stack: Stack, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maas_worker", *args],
        env={**stack.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_cancel_by_another_tenant_is_refused_and_the_owners_cancel_works(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    victim = stack.client("acme").submit("sleep", {"seconds": 30})
    as_globex = {"MAAS_KEYRING": str(attacker.keyring_path), "MAAS_TENANT": "globex"}
    squat = cli(stack, "cancel", victim.id, env=as_globex)
    assert squat.returncode == 1
    assert squat.stdout == ""
    assert len(squat.stderr.strip().splitlines()) == 1
    assert "no job of tenant 'globex'" in squat.stderr
    assert not stack.backend.exists(keyspace.cancel("acme", victim.id))
    assert not stack.backend.exists(keyspace.cancel("globex", victim.id))
    own = cli(stack, "cancel", victim.id, "--tenant", "acme", env={})
    assert (own.returncode, own.stdout.strip()) == (0, "cancelled"), own.stderr
    others = victims(stack, 4)
    stack.start_worker()
    assert_victims_done(others)
    with pytest.raises(JobCancelled):
        victim.result(timeout=20)
    assert stack.outcomes(victim.id) == ["cancelled"]


def test_a_foreign_cancel_request_planted_in_redis_is_refused_and_blocks_nothing(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    queued = stack.client("acme").submit("echo", {"queued": 1})
    token = make_token(load_keyring(attacker.keyring_path), "globex", queued.id)
    stack.backend.set(keyspace.cancel("acme", queued.id), token)  # signed by globex's own key
    stack.start_worker()
    assert queued.result(timeout=20) == {"echo": {"queued": 1}}  # refused: the job ran
    wait_audited_once(stack, queued.id, "policy", "globex")
    assert not stack.backend.exists(keyspace.cancel("acme", queued.id))
    # While a job runs: the planted request is refused; the owner's own still stops it.
    running = stack.client("acme").submit("sleep", {"seconds": 20})
    wait_for(lambda: running.status() == "running", 30, "the job to start")
    stack.backend.set(
        keyspace.cancel("acme", running.id),
        make_token(load_keyring(attacker.keyring_path), "globex", running.id),
    )
    wait_audited_once(stack, running.id, "policy", "globex")
    assert running.status() == "running"
    assert running.cancel()
    with pytest.raises(JobCancelled):
        running.result(timeout=20)
