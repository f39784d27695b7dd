"""Benchmark: signed-model load time and digits inference through the secure pipeline.

Not a test. Measures, in one run on this machine:

1. model load (verify signature + hashes [+ decrypt] + ONNX Runtime session),
   plain vs encrypted, for the bundled digits model and a large padded copy,
   against a baseline of ONNX Runtime loading the same bytes with no checks;
2. digits inference latency per job (one sample), sequential, through the whole
   secure pipeline (client seal -> Redis -> worker -> sealed result), against
   the `echo` model through the same pipeline and a bare `session.run`;
3. jobs/s per core: many jobs in flight to a worker with ONE pool process,
   digits vs echo through the same pipeline.

    .venv/bin/python benchmarks/models.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime as ort

from benchmarks.stack import start_stack
from maas_worker.client.client import Client
from maas_worker.models.artifact_crypto import DEFAULT_CHUNK_BYTES, ModelKeys
from maas_worker.models.onnx_runner import session_options
from maas_worker.models.repository import load_verified, verify_manifest
from maas_worker.models.signing import TrustedSigners
from tests.modelkit import BUNDLED_DIGITS, holdout, make_kit, with_marker


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench_load(tmp: Path, repeat: int, big_mib: int) -> list[tuple[str, float, float, float]]:
    kit = make_kit(tmp)
    signers = TrustedSigners.from_paths([kit.signers_dir])
    keys = ModelKeys().with_key(kit.model_key)
    rows = []
    small = BUNDLED_DIGITS.read_bytes()
    big = with_marker(small, os.urandom(big_mib * 1024 * 1024))
    for label, data in (("digits (21 KB)", small), (f"digits + {big_mib} MiB padding", big)):
        name = "big" if len(data) > len(small) else "small"
        plain = kit.publish(name, "1", model=data)
        enc = kit.publish(name, "2", model=data, encrypt=True, chunk_bytes=DEFAULT_CHUNK_BYTES)

        def raw(data: bytes = data) -> None:
            ort.InferenceSession(
                data, sess_options=session_options(), providers=["CPUExecutionProvider"]
            )

        def verified(path: Path) -> Callable[[], None]:
            return lambda: load_verified(path, verify_manifest(path, signers), lambda: keys)

        rows.append(
            (
                label,
                median_ms(raw, repeat),
                median_ms(verified(plain), repeat),
                median_ms(verified(enc), repeat),
            )
        )
    return rows


def bench_pipeline(client: Client, jobs: int, sample: list[float]) -> dict[str, Any]:
    cases = {"digits": {"inputs": [sample]}, "echo": {"inputs": [sample]}}
    out: dict[str, Any] = {}
    for model, inputs in cases.items():
        for _ in range(5):  # warm-up: the worker loads the session once
            client.submit(model, inputs).result(timeout=60)
        lat = []
        for _ in range(jobs):
            t = time.perf_counter()
            client.submit(model, inputs).result(timeout=60)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        batch = [client.submit(model, inputs) for _ in range(jobs * 4)]
        for job in batch:
            job.result(timeout=120)
        elapsed = time.perf_counter() - t
        out[model] = {
            "latency_ms": statistics.median(lat) * 1000,
            "p90_ms": sorted(lat)[int(len(lat) * 0.9)] * 1000,
            "jobs_per_s": len(batch) / elapsed,
        }
    return out


def bench_bare_run(sample: list[float], repeat: int) -> float:
    import numpy as np

    session = ort.InferenceSession(
        BUNDLED_DIGITS.read_bytes(),
        sess_options=session_options(),
        providers=["CPUExecutionProvider"],
    )
    x = np.array([sample], dtype=np.float32)
    return median_ms(lambda: session.run(None, {"float_input": x}), repeat)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    repeat, jobs, big_mib = (5, 50, 16) if args.quick else (15, 200, 64)
    sample = [float(v) for v in holdout()["inputs"][0]]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"onnxruntime {ort.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        print("\nmodel load, median of", repeat, "(ms)")
        print(
            f"{'model':<28} {'ORT only':>9} {'verified':>9} {'encrypted':>10} "
            f"{'plain/ORT':>10} {'enc/plain':>10}"
        )
        for label, raw, plain, enc in bench_load(Path(tmp), repeat, big_mib):
            print(
                f"{label:<28} {raw:>9.2f} {plain:>9.2f} {enc:>10.2f} "
                f"{plain / raw:>10.2f} {enc / plain:>10.2f}"
            )
        bare = bench_bare_run(sample, 2000)
        server, worker, client = start_stack(Path(tmp), tenant="bench")
        try:
            res = bench_pipeline(client, jobs, sample)
        finally:
            worker.stop(timeout_s=10)
            server.stop()
    d, e = res["digits"], res["echo"]
    print(f"\nbare session.run, one sample: {bare * 1000:.0f} us (median of 2000)")
    print(f"\npipeline, one worker pool process, {jobs} sequential jobs then {jobs * 4} in flight")
    print(f"{'model':<8} {'latency ms':>11} {'p90 ms':>8} {'jobs/s/core':>12}")
    for name, r in res.items():
        print(f"{name:<8} {r['latency_ms']:>11.2f} {r['p90_ms']:>8.2f} {r['jobs_per_s']:>12.0f}")
    print(
        f"digits/echo: latency x{d['latency_ms'] / e['latency_ms']:.3f}, "
        f"throughput x{d['jobs_per_s'] / e['jobs_per_s']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
