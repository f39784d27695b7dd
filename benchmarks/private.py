"""Benchmark: private inference (CKKS) against the plaintext pipeline, same model, same run.

Not a test. One embedded Redis and one worker with ONE pool process (so jobs/s is
per core), the bundled ``digits-he`` model (a 64 -> 10 affine layer, then softmax):

1. client side: key generation, public context size, encryption and decryption per
   vector, ciphertext bytes in and out, sealed request bytes per job;
2. worker side, in this process: the evaluation of one ciphertext alone;
3. latency per job, sequential, through the whole pipeline (seal -> Redis -> worker ->
   sealed result -> open [-> decrypt]): plaintext ``digits-he`` vs private;
4. jobs/s per core: all held-out rows in flight, plaintext vs private, and the held-out
   accuracy of both from those same results, side by side.

    .venv/bin/python benchmarks/private.py [--rows 120] [--latency-jobs 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stack import start_stack
from maas_worker.client.client import Client
from maas_worker.models.artifact_crypto import ModelKeys
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.models.repository import load_verified, verify_manifest
from maas_worker.models.signing import TrustedSigners
from maas_worker.private import params
from maas_worker.private.ckks import SecretContext, load_public
from maas_worker.private.evaluate import PrivateModel, affine_of, private_spec
from tests.modelkit import holdout

MODEL = "digits-he"


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"median {statistics.median(s) * 1000:.1f} ms, p90 {s[int(len(s) * 0.9)] * 1000:.1f} ms"


def client_side(rows: list[list[int]]) -> tuple[SecretContext, dict[str, Any]]:
    t = time.perf_counter()
    key = SecretContext.generate()
    keygen = time.perf_counter() - t
    enc, dec, ins = [], [], []
    for row in rows[:20]:
        t = time.perf_counter()
        text = key.encrypt([float(v) for v in row])
        enc.append(time.perf_counter() - t)
        ins.append(len(base64.b64decode(text)))
    n, bits = key.parameters
    return key, {
        "parameters": f"N={n}, modulus {bits} bits, scale 2^{params.DEFAULT_SCALE_BITS}",
        "keygen_s": keygen,
        "public_context_bytes": len(key.public_bytes),
        "encrypt": enc,
        "ciphertext_in_bytes": statistics.median(ins),
        "decrypt": dec,
    }


def worker_side(key: SecretContext, rows: list[list[int]]) -> dict[str, Any]:
    version = BUNDLED_MODEL_DIR / MODEL / "1"
    signers = TrustedSigners.from_paths([BUNDLED_SIGNERS_DIR])
    model = load_verified(version, verify_manifest(version, signers), ModelKeys)
    spec = private_spec(model)
    assert spec is not None
    t = time.perf_counter()
    ctx = load_public(key.public_bytes, key.digest)
    load_s = time.perf_counter() - t
    runner = PrivateModel(model.name, model.version, affine_of(model.predict, *spec), ctx)
    evals, outs, decs = [], [], []
    for row in rows[:20]:
        text = key.encrypt([float(v) for v in row])
        t = time.perf_counter()
        out = runner.predict(text)[params.FIELD]
        evals.append(time.perf_counter() - t)
        outs.append(len(base64.b64decode(out["vector"])))
        t = time.perf_counter()
        key.decrypt(out["vector"], out["size"])
        decs.append(time.perf_counter() - t)
    plain = []
    for row in rows[:20]:
        t = time.perf_counter()
        model.predict({"inputs": [row]})
        plain.append(time.perf_counter() - t)
    return {
        "context_load_s": load_s,
        "eval": evals,
        "plain_eval": plain,
        "ciphertext_out_bytes": statistics.median(outs),
        "decrypt": decs,
    }


def pipeline(client: Client, rows: list[list[int]], labels: list[int], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sample = rows[0]
    # Warm-up: the worker loads the model, reads the affine layer and the context once.
    client.submit(MODEL, {"inputs": [sample]}).result(timeout=60)
    client.submit_private(MODEL, [sample], timeout=60)
    lat_plain, lat_private = [], []
    for row in rows[:n]:
        t = time.perf_counter()
        client.submit(MODEL, {"inputs": [row]}).result(timeout=60)
        lat_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.submit_private(MODEL, [row], timeout=60)
        lat_private.append(time.perf_counter() - t)
    out["latency_plain"], out["latency_private"] = lat_plain, lat_private

    t = time.perf_counter()
    jobs = client.submit_many(MODEL, [{"inputs": [r]} for r in rows])
    plain = [j.result(timeout=600)["labels"][0] for j in jobs]
    out["plain_jobs_s"] = len(rows) / (time.perf_counter() - t)
    t = time.perf_counter()
    private = client.submit_private(MODEL, rows, timeout=600)["labels"]
    out["private_jobs_s"] = len(rows) / (time.perf_counter() - t)
    out["plain_acc"] = sum(p == y for p, y in zip(plain, labels, strict=True)) / len(rows)
    out["private_acc"] = sum(p == y for p, y in zip(private, labels, strict=True)) / len(rows)
    out["agree"] = sum(a == b for a, b in zip(plain, private, strict=True)) / len(rows)
    # Bytes per job on the wire: the sealed request as sent (claim check above 48 KB).
    private = client._private_jobs()
    _, sealed_private = client.seal(MODEL, private.inputs(private.key, [sample])[0])
    _, sealed_plain = client.seal(MODEL, {"inputs": [sample]})
    out["request_private_bytes"] = len(base64.b64decode(sealed_private))
    out["request_plain_bytes"] = len(base64.b64decode(sealed_plain))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120, help="held-out rows for jobs/s")
    parser.add_argument("--latency-jobs", type=int, default=20)
    args = parser.parse_args()
    data = holdout()
    rows, labels = data["inputs"][: args.rows], data["labels"][: args.rows]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; one worker pool process"
    )
    key, c = client_side(rows)
    w = worker_side(key, rows)
    print(f"parameters: {c['parameters']}")
    print(
        f"client: key generation {c['keygen_s'] * 1000:.0f} ms; public context "
        f"{c['public_context_bytes'] / 1e6:.1f} MB (registered once per key)"
    )
    print(f"client: encrypt {ms(c['encrypt'])}; decrypt {ms(w['decrypt'])}")
    print(
        f"ciphertext: in {c['ciphertext_in_bytes'] / 1e3:.0f} KB, out "
        f"{w['ciphertext_out_bytes'] / 1e3:.0f} KB (plaintext row: 64 numbers)"
    )
    print(
        f"worker: context load {w['context_load_s'] * 1000:.0f} ms (once per process); "
        f"evaluation {ms(w['eval'])} vs ONNX Runtime {ms(w['plain_eval'])}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server, worker, client = start_stack(
            Path(tmp),
            tenant="bench",
            diagnostic_models=False,
            MAAS_PRIVATE_KEY_DIR=str(Path(tmp) / "ckks"),
        )
        try:
            p = pipeline(client, rows, labels, args.latency_jobs)
        finally:
            client.close()
            worker.stop()
            server.stop()
    print(
        f"request envelope: private {p['request_private_bytes'] / 1e3:.0f} KB, plaintext "
        f"{p['request_plain_bytes']} B"
    )
    print(
        f"latency per job (sequential): plaintext {ms(p['latency_plain'])}; private "
        f"{ms(p['latency_private'])}"
    )
    print(
        f"jobs/s per core ({len(rows)} in flight): plaintext {p['plain_jobs_s']:.1f}, "
        f"private {p['private_jobs_s']:.2f}"
    )
    print(
        f"held-out accuracy ({len(rows)} rows): plaintext {p['plain_acc']:.4f}, private "
        f"{p['private_acc']:.4f}, same label {p['agree']:.4f}"
    )
    print(json.dumps({"rows": len(rows), **{k: v for k, v in p.items() if "latency" not in k}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
