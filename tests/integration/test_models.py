"""Signed models in real workers: digits end to end, hot reload, tampering, encryption at rest.

The release pointer against a real worker: test_model_release.py.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from maas_worker import JobFailed, JobRejected
from maas_worker.backend import keyspace
from maas_worker.models.signing import SigningKey
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring
from tests.modelkit import BUNDLED_DIGITS, files_containing, holdout, make_kit, with_marker

from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0
SAMPLES = holdout()
FEW = {"inputs": SAMPLES["inputs"][:4]}
FEW_LABELS = SAMPLES["sklearn_predictions"][:4]


def catalogue(stack: Stack) -> set[str]:
    return {r.decode() for r in stack.backend.zrange(keyspace.CATALOG, 0, -1)}


def model_rejections(stack: Stack) -> list[str]:
    return [r.detail for r in stack.audit() if r.reason == "model_rejected"]


def test_digits_job_returns_the_right_labels_for_held_out_samples(shared_stack: Stack) -> None:
    job = shared_stack.client().submit("digits", {"inputs": SAMPLES["inputs"]}, priority="high")
    out = job.result(timeout=TIMEOUT)
    assert out["labels"] == SAMPLES["sklearn_predictions"]
    right = sum(a == b for a, b in zip(out["labels"], SAMPLES["labels"], strict=True))
    assert right / len(SAMPLES["labels"]) >= 0.95
    assert all(abs(sum(p) - 1) < 1e-3 and len(p) == 10 for p in out["probabilities"])


def test_wrong_input_shape_fails_the_job_and_the_worker_keeps_serving(shared_stack: Stack) -> None:
    client = shared_stack.client()
    for bad in ({"inputs": [[0.25] * 63]}, {"inputs": [["x"] * 64]}, {"pixels": []}):
        with pytest.raises(JobFailed) as err:
            client.submit("digits", bad).result(timeout=TIMEOUT)
        assert err.value.reason == "bad_input"
        assert "shape [N, 64]" in str(err.value) and "0.25" not in str(err.value)
    assert client.submit("digits@2", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS
    assert all(w.proc is not None and w.proc.poll() is None for w in shared_stack.workers)


def _worker_open_files(stack: Stack) -> list[str]:
    targets = []
    for w in stack.workers:
        assert w.proc is not None
        parent = psutil.Process(w.proc.pid)
        for proc in [parent, *parent.children(recursive=True)]:
            fd_dir = Path(f"/proc/{proc.pid}/fd")
            for fd in fd_dir.iterdir():
                try:
                    targets.append(os.readlink(fd))
                except OSError:
                    continue
    return targets


def test_signed_repository_in_a_running_worker(make_stack, tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    kit.publish("digits", "1")
    stack = make_stack(**kit.env())
    stack.start_worker(concurrency=1)
    client = stack.client()
    assert client.submit("digits@1", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS

    # A second version, encrypted at rest, is picked up by the running worker.
    marker = b"PLAINTEXT-MODEL-" + secrets.token_hex(16).encode()
    since = time.time() - 1  # any plaintext written from now on would be newer
    kit.publish("digits", "2", model=with_marker(BUNDLED_DIGITS.read_bytes(), marker), encrypt=True)
    wait_for(lambda: "digits@2" in catalogue(stack), TIMEOUT, "digits@2 advertised")
    assert client.submit("digits@2", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS
    assert client.submit("digits", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS
    # It was decrypted in memory only: no file anywhere we can see holds the
    # plaintext, and the worker keeps no in-memory file (memfd) open.
    roots = [tmp_path, stack.tmp, Path(tempfile.gettempdir())]
    assert files_containing(marker, roots, since) == []
    open_files = _worker_open_files(stack)
    assert not [t for t in open_files if "memfd:" in t]
    assert (
        files_containing(
            marker, [Path(t) for t in open_files if t.startswith("/") and Path(t).is_file()]
        )
        == []
    )

    # A newer version, staged (signed, not released), whose artifact was altered
    # after signing: refused at load, audited; asked for by name it fails the
    # job clearly, and the worker serves on.
    v3 = kit.publish("digits", "3", release=False)
    data = bytearray((v3 / "model.onnx").read_bytes())
    data[400] ^= 0x01
    (v3 / "model.onnx").write_bytes(bytes(data))
    wait_for(lambda: "digits@3" in catalogue(stack), TIMEOUT, "digits@3 advertised")
    with pytest.raises(JobFailed) as err:
        client.submit("digits@3", FEW).result(timeout=TIMEOUT)
    assert err.value.reason == "model_rejected" and "digits@3" in str(err.value)
    assert "digits@3: file model.onnx does not match its hash (altered)" in model_rejections(stack)
    # "digits" still means the released version (digits@2).
    assert client.submit("digits", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS

    # Validly signed, but by a key the workers do not trust: never advertised.
    kit.publish("digits", "4", key=SigningKey.generate(), release=False)
    wait_for(
        lambda: "digits@4: signed by an untrusted key" in model_rejections(stack),
        TIMEOUT,
        "audit of digits@4",
    )
    assert "digits@4" not in catalogue(stack)
    rec = next(r for r in stack.audit() if r.reason == "model_rejected")
    assert rec.job_id == "" and rec.tenant == ""

    # A tenant restricted to another signer may not run these models at all.
    ring = load_keyring(stack.keyring_path)
    stack.rotate_keyring(
        ring.with_new_tenant(
            "initech", TenantPolicy(allowed_signers=(SigningKey.generate().key_id,))
        )
    )
    restricted = stack.client("initech")
    with pytest.raises(JobRejected):
        restricted.submit("digits", FEW).result(timeout=TIMEOUT)
    assert client.submit("digits", FEW).result(timeout=TIMEOUT)["labels"] == FEW_LABELS
    assert stack.workers[0].proc is not None and stack.workers[0].proc.poll() is None
