"""The release pointer in real workers: no silent rollback of a bare model name.

The attacker can write the model folder (not sign): they flip one byte of the
released (newest) version, then copy back the older, validly signed release,
and wait for a worker restart. Each time the job's client gets a failure, an
audit ``model_rejected`` record names why, and the older version is never
served by the bare name, until the owner signs a new release naming it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from maas_worker import JobFailed
from maas_worker.backend import keyspace
from maas_worker.models.release import RELEASE_FILE
from tests.modelkit import holdout, make_kit

from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0
SAMPLES = holdout()
FOUR = {"inputs": SAMPLES["inputs"][:4]}  # more rows than digits@1 takes (2)
TWO = {"inputs": SAMPLES["inputs"][:2]}


def model_rejections(stack: Stack) -> list[str]:
    return [r.detail for r in stack.audit() if r.reason == "model_rejected"]


def restart(stack: Stack) -> None:
    for w in stack.workers:
        w.stop(timeout_s=10)
    stack.start_worker(concurrency=1)


def refused(stack: Stack, ref: str) -> JobFailed:
    with pytest.raises(JobFailed) as err:
        stack.client().submit(ref, FOUR).result(timeout=TIMEOUT)
    return err.value


def test_a_corrupted_newest_version_never_rolls_the_bare_name_back(
    make_stack, tmp_path: Path
) -> None:
    kit = make_kit(tmp_path)
    kit.publish("digits", "1", max_batch=2)  # release serial 1 -> digits@1
    old_release = (kit.root / "digits" / RELEASE_FILE).read_bytes()
    v2 = kit.publish("digits", "2")  # release serial 2 -> digits@2
    stack = make_stack(**kit.env())
    stack.start_worker(concurrency=1)
    client = stack.client()
    assert (
        client.submit("digits", FOUR).result(timeout=TIMEOUT)["labels"]
        == SAMPLES["sklearn_predictions"][:4]
    )  # digits@2 (digits@1 takes 2 rows at most)
    assert stack.backend.hget(keyspace.RELEASES, "digits") == b"2"  # the persisted floor

    # 1. One byte of the released version flipped, then a restart: the bare
    #    name fails (it is never digits@1), and the refusal is audited.
    data = bytearray((v2 / "model.onnx").read_bytes())
    data[400] ^= 0x01
    (v2 / "model.onnx").write_bytes(bytes(data))
    restart(stack)
    err = refused(stack, "digits")
    assert err.reason == "model_rejected"
    assert "released version digits@2 is refused" in str(err)
    wait_for(
        lambda: (
            "digits@2: file model.onnx does not match its hash (altered)" in model_rejections(stack)
        ),
        TIMEOUT,
        "audit of digits@2",
    )
    # digits@1 is there and fine, asked for by its version (the client's choice).
    assert (
        client.submit("digits@1", TWO).result(timeout=TIMEOUT)["labels"]
        == SAMPLES["sklearn_predictions"][:2]
    )
    restart(stack)
    assert refused(stack, "digits").reason == "model_rejected"

    # 2. The older, validly signed release copied back: refused as a rollback,
    #    audited, and still refused after another restart (the floor is in Redis).
    (kit.root / "digits" / RELEASE_FILE).write_bytes(old_release)
    restart(stack)
    why = "digits: release serial 1 is below the highest seen (2): rollback refused"
    wait_for(lambda: why in model_rejections(stack), TIMEOUT, "audit of the rollback")
    err = refused(stack, "digits")
    assert err.reason == "model_rejected" and "rollback refused" in str(err)
    restart(stack)
    err = refused(stack, "digits")
    assert err.reason == "model_rejected" and "rollback refused" in str(err)

    # 3. The owner signs the fallback: a new release (serial 3) naming digits@1.
    assert kit.release("digits", "1").serial == 3

    def served() -> bool:
        try:
            client.submit("digits", TWO).result(timeout=TIMEOUT)
        except JobFailed as exc:
            assert exc.reason == "model_rejected"
            time.sleep(0.5)
            return False
        return True

    wait_for(served, TIMEOUT, "the owner's release served")
    err = refused(stack, "digits")  # 4 rows: it is digits@1 that answers now
    assert err.reason == "bad_input"
    assert stack.backend.hget(keyspace.RELEASES, "digits") == b"3"
