"""Private inference end to end (docs/private-inference.md): real Redis, real workers.

The client encrypts digits rows under its own CKKS key; the worker evaluates
``digits-he`` on the ciphertexts with the tenant's public context only. Checked here:
the predictions equal the plaintext model's (the logits within the CKKS error),
neither Redis, the worker's log nor the memory of the worker's processes holds the
input or output in the clear (and the same scan does find the plaintext job's),
a tampered ciphertext is refused by the envelope's MAC, a malformed one fails its
own job alone, and a context below the parameter minimum is refused with one audit
record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tenseal", reason="the private extra is not installed")

from maas_worker import Client, JobFailed, JobRejected
from maas_worker.backend import keyspace
from maas_worker.local.demo import scan_for
from maas_worker.models.paths import BUNDLED_MODEL_DIR
from maas_worker.private import params
from maas_worker.private.ckks import SecretContext, tenseal

from ..modelkit import holdout
from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
MODEL = "digits-he"
TIMEOUT = 60.0
#: Held-out rows run privately (one job each), and those the memory scan looks for.
ROWS = 12
SCANNED = 2
#: Largest difference allowed between private and plaintext logits (CKKS error:
#: ~1e-5 measured with the default parameters; docs/private-inference.md).
LOGIT_TOLERANCE = 1e-3


def private_client(stack: Stack, keys: Path) -> Client:
    return Client(settings=dataclasses.replace(stack.settings, private_key_dir=keys))


def plaintext_logits(rows: list[list[int]]) -> list[list[float]]:
    """The signed model's logits in the clear, computed here (not on the worker)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(BUNDLED_MODEL_DIR / MODEL / "1" / "model.onnx"))
    import numpy as np

    out = session.run(["logits"], {"float_input": np.array(rows, dtype=np.float32)})[0]
    return [[float(v) for v in row] for row in out]


def needles(rows: list[list[int]], logits: list[list[float]]) -> list[bytes]:
    """What the plaintext of a row or its output looks like in memory or in a message:
    the row as float64 and float32 arrays and as compact JSON (what a plaintext job
    sends), the logits as float32 (the model's own dtype)."""
    out = []
    for row, lg in zip(rows, logits, strict=True):
        out += [
            struct.pack(f"<{len(row)}d", *row),
            struct.pack(f"<{len(row)}f", *row),
            json.dumps(row, separators=(",", ":")).encode(),
            struct.pack(f"<{len(lg)}f", *lg),
        ]
    return out


def group_pids(leader: int) -> list[int]:
    """Every process in the worker's process group (its main process and pool)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == leader:  # pgrp
            pids.append(int(entry))
    return pids


def memory_hits(
    pids: list[int], patterns: list[bytes], *, first: bool = False
) -> list[tuple[int, int]]:
    """(pid, pattern index) for each pattern found in the writable memory of ``pids``.

    Only writable mappings (heap, stacks, anonymous memory, data sections) can hold
    what a process computed; read-only ones are its code and files. ``first``: stop
    at the first hit.
    """
    hits: set[tuple[int, int]] = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                parts = line.split()
                if not parts[1].startswith("rw") or parts[-1] in ("[vvar]", "[vsyscall]"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                try:
                    mem.seek(start)
                    chunk = mem.read(end - start)
                except (OSError, ValueError, OverflowError):
                    continue
                for i, p in enumerate(patterns):
                    if (pid, i) not in hits and p in chunk:
                        hits.add((pid, i))
                        if first:
                            return sorted(hits)
    return sorted(hits)


def test_private_predictions_equal_plaintext_and_no_plaintext_on_the_worker(
    shared_stack: Stack, tmp_path: Path
) -> None:
    data = holdout()
    rows: list[list[int]] = data["inputs"][:ROWS]
    client = private_client(shared_stack, tmp_path)
    result = client.submit_private(MODEL, rows, timeout=TIMEOUT)

    plain = plaintext_logits(rows)
    want = [max(range(10), key=lg.__getitem__) for lg in plain]
    assert result["labels"] == want
    err = max(
        abs(a - b)
        for got, exp in zip(result["logits"], plain, strict=True)
        for a, b in zip(got, exp, strict=True)
    )
    assert err < LOGIT_TOLERANCE
    assert all(abs(sum(p) - 1) < 1e-9 for p in result["probabilities"])

    # The secret key stayed on the client; only the public context was registered.
    secret = (tmp_path / "acme.ckks").read_bytes()
    assert (tmp_path / "acme.ckks").stat().st_mode & 0o077 == 0
    registered = list(shared_stack.backend.scan_iter(match=b"maas:{acme}:ckks:*"))
    assert len(registered) == 1
    assert tenseal().context_from(shared_stack.backend.get(registered[0])).is_public()

    patterns = needles(rows[:SCANNED], plain[:SCANNED])
    keys_read, hits = scan_for(shared_stack.backend, [*patterns, secret[-4096:]])
    assert keys_read > 10
    assert hits == []
    logs = shared_stack.worker_logs()
    assert "succeeded" in logs
    assert not [p for p in patterns if p in logs.encode()]
    pids = group_pids(shared_stack.workers[0].proc.pid)
    assert len(pids) >= 3  # the main process and the two pool processes
    assert memory_hits(pids, patterns) == []

    # The same scan finds the plaintext once a plaintext job ran on the same worker:
    # the check above could see it.
    jobs = [client.submit(MODEL, {"inputs": [row]}) for row in rows[:SCANNED]]
    assert [j.result(timeout=TIMEOUT)["labels"][0] for j in jobs] == want[:SCANNED]
    assert memory_hits(pids, patterns, first=True) != []


def test_async_client_submit_private(shared_stack: Stack, tmp_path: Path) -> None:
    import asyncio

    from maas_worker import AsyncClient

    rows = holdout()["inputs"][ROWS : ROWS + 2]

    async def run() -> dict[str, Any]:
        settings = dataclasses.replace(shared_stack.settings, private_key_dir=tmp_path)
        async with AsyncClient(settings=settings) as client:
            return await client.submit_private(MODEL, rows, timeout=TIMEOUT)

    out = asyncio.run(run())
    plain = plaintext_logits(rows)
    assert out["labels"] == [max(range(10), key=lg.__getitem__) for lg in plain]


def _private_job(client: Client, vector: str | None = None, digest: str | None = None) -> Any:
    """Submit one private job as `submit_private` does, without waiting (the job)."""
    private = client._private_jobs()
    name, data, keep_s = private.registration(private.key)
    client.backend.set(name, data, ex=keep_s)
    body = private.inputs(private.key, [holdout()["inputs"][0]])[0]
    if vector is not None:
        body[params.FIELD]["vector"] = vector
    if digest is not None:
        body[params.FIELD]["context"] = digest
    return client.submit(MODEL, body)


def test_tampered_ciphertext_is_refused_by_the_envelope(make_stack: Any, tmp_path: Path) -> None:
    stack = make_stack(MAAS_MODEL_DIR=str(BUNDLED_MODEL_DIR))
    client = private_client(stack, tmp_path)
    job = _private_job(client)
    # The request is large: parked at its payload key (claim check). Flip one byte of
    # the ciphertext in it, as someone with write access to Redis could.
    key = keyspace.payload("acme", job.id)
    raw = bytearray(stack.backend.get(key))
    raw[len(raw) // 2] ^= 0x01
    stack.backend.set(key, bytes(raw), keepttl=True)
    stack.start_worker(concurrency=1)
    record = stack.wait_audit(job.id, "tampered")
    assert not record.verified
    wait_for(lambda: stack.outcomes(job.id), TIMEOUT, "the refusal's outcome line")
    assert not stack.backend.exists(keyspace.result("acme", job.id))


def test_malformed_ciphertext_fails_that_job_alone(shared_stack: Stack, tmp_path: Path) -> None:
    client = private_client(shared_stack, tmp_path)
    good = _private_job(client)
    bad = _private_job(client, vector="AAAA" * 64)
    with pytest.raises(JobFailed) as err:
        bad.result(timeout=TIMEOUT)
    assert err.value.reason == "bad_input"
    assert "CKKS ciphertext" in str(err.value)
    out = good.result(timeout=TIMEOUT)[params.FIELD]
    logits = client._private_jobs().key.decrypt(out["vector"], out["size"])
    assert len(logits) == 10


def test_context_below_the_minimum_is_refused(shared_stack: Stack, tmp_path: Path) -> None:
    ts = tenseal()
    # N = 4096: 128-bit secure by the table (100 <= 109 bits) but below the minimum
    # ring dimension, so a worker refuses it.
    weak = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    weak.global_scale = 2**20
    weak.generate_galois_keys()
    public = weak.copy()
    public.make_context_public()
    data = public.serialize()
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    shared_stack.backend.set(keyspace.ckks_context("acme", digest), data, ex=600)
    vector = __import__("base64").b64encode(ts.ckks_vector(weak, [1.0] * 64).serialize()).decode()
    client = private_client(shared_stack, tmp_path)
    job = client.submit(MODEL, {params.FIELD: {"context": digest, "vector": vector}})
    with pytest.raises(JobRejected) as err:
        job.result(timeout=TIMEOUT)
    assert err.value.reason == "policy"
    record = shared_stack.wait_audit(job.id, "policy")
    assert record.verified
    assert "ring dimension 4096 is below 8192" in record.detail
    assert [r for r in shared_stack.audit() if r.job_id == job.id] == [record]


def test_the_cli_submits_privately(shared_stack: Stack, tmp_path: Path) -> None:
    rows = holdout()["inputs"][:2]
    env = {"MAAS_PRIVATE_KEY_DIR": str(tmp_path)}
    made = shared_stack.cli("private", "keygen", env=env)
    assert made.returncode == 0, made.stderr
    assert "N=8192 modulus=160 bits" in made.stdout
    again = shared_stack.cli("private", "keygen", env=env)
    assert again.returncode == 1 and "--rotate" in again.stderr
    proc = shared_stack.cli(
        "private", "submit", "--model", MODEL, "--input", json.dumps({"inputs": rows}), env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["labels"] == [max(range(10), key=lg.__getitem__) for lg in plaintext_logits(rows)]


def test_a_replaced_or_missing_context_is_refused(shared_stack: Stack, tmp_path: Path) -> None:
    """The digest inside the sealed job authenticates the context: bytes written in its
    place (by anyone who can write Redis) are refused ``tampered``; a context that is
    gone fails the job with a reason the client can act on."""
    client = private_client(shared_stack, tmp_path)
    other = SecretContext.generate()  # a context nobody registered under its own name
    private = client._private_jobs()
    body = private.inputs(private.key, [holdout()["inputs"][0]])[0]
    body[params.FIELD]["context"] = other.digest
    missing = client.submit(MODEL, body)
    with pytest.raises(JobFailed) as err:
        missing.result(timeout=TIMEOUT)
    assert err.value.reason == "unknown_context"

    # Registered, but with the bytes of the tenant's real context (not those it names).
    shared_stack.backend.set(keyspace.ckks_context("acme", other.digest), private.key.public_bytes)
    replaced = client.submit(MODEL, body)
    with pytest.raises(JobRejected) as rejected:
        replaced.result(timeout=TIMEOUT)
    assert rejected.value.reason == "tampered"
    record = shared_stack.wait_audit(replaced.id, "tampered")
    assert record.verified and "does not match its digest" in record.detail


def test_the_ckks_key_rotates_with_the_envelope_keys(shared_stack: Stack, tmp_path: Path) -> None:
    """After the tenant's envelope keys rotate, the client makes a new CKKS key and
    registers its context; the previous context is left to expire. (Last in the module:
    it rotates the shared stack's keyring.)"""
    import time

    from maas_worker.private.ckks import key_version
    from maas_worker.tenancy.keyring import RELOAD_CHECK_S, load_keyring

    rows = holdout()["inputs"][:1]
    want = [max(range(10), key=lg.__getitem__) for lg in plaintext_logits(rows)]
    client = private_client(shared_stack, tmp_path)
    assert client.submit_private(MODEL, rows, timeout=TIMEOUT)["labels"] == want
    first = SecretContext.load(tmp_path, "acme").digest
    before = key_version(tmp_path, "acme")
    ring, version = load_keyring(shared_stack.keyring_path).with_rotation("acme")
    shared_stack.rotate_keyring(ring)
    assert version > before
    # Workers and clients re-read a changed keyring file at their first use after
    # RELOAD_CHECK_S: past it, both are certain to see the new primary key.
    time.sleep(RELOAD_CHECK_S + 0.2)

    assert client.submit_private(MODEL, rows, timeout=TIMEOUT)["labels"] == want
    second = SecretContext.load(tmp_path, "acme").digest
    assert second != first and key_version(tmp_path, "acme") == version
    for digest in (first, second):
        assert shared_stack.backend.exists(keyspace.ckks_context("acme", digest))
