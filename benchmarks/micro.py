"""Micro-benchmark: sealing and opening one envelope vs the raw primitives.

Not a test. Per payload size, the median (of 5 timeit repeats) cost of:
raw AES-256-GCM encrypt and decrypt (pycryptodome and OpenSSL via
`cryptography`), raw HMAC-SHA256, and our `seal` / `verify`+`decrypt`
(header encoding, GCM with the header as AAD, outer HMAC, parsing) with each
AES-GCM implementation. The ratio seal / (raw GCM + raw HMAC) shows what the
envelope adds on top of the crypto itself.

    .venv/bin/python benchmarks/micro.py
"""

from __future__ import annotations

import hmac
import os
import platform
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from maas_worker.crypto.envelope import Header, now_ms, seal, verify
from maas_worker.crypto.primitives import crypto_backend
from maas_worker.tenancy.keyring import Keyring

SIZES = [1024, 65536, 1 << 20, 8 << 20]


def best_us(fn: object, size: int) -> float:
    number = max(3, min(2000, (64 << 20) // max(size, 1) // 8))
    times = timeit.repeat(fn, number=number, repeat=5)  # type: ignore[arg-type]
    return statistics.median(times) / number * 1e6


def main() -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    ring = Keyring().with_new_tenant("bench")
    kv = ring.tenant("bench").primary()
    keys = kv.keys("bench")
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(80)
    header = Header(
        "request",
        kv.version,
        now_ms(),
        now_ms() + 3_600_000,
        "normal",
        "bench",
        "0" * 36,
        "maas.infer",
        "echo",
    )
    print(
        f"\n{'size':>8} | {'pyc GCM':>9} {'ssl GCM':>9} {'HMAC':>9} | "
        f"{'seal pyc':>9} {'open pyc':>9} | {'seal ssl':>9} {'open ssl':>9} | "
        f"seal/(GCM+HMAC) pyc  ssl   (us per message)"
    )
    for size in SIZES:
        pt = os.urandom(size)
        gcm = AESGCM(key)

        def pyc(pt: bytes = pt) -> None:
            c = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=16)
            c.update(aad)
            c.encrypt_and_digest(pt)

        raw_pyc = best_us(pyc, size)
        raw_ssl = best_us(lambda pt=pt, gcm=gcm: gcm.encrypt(nonce, pt, aad), size)
        raw_mac = best_us(lambda pt=pt: hmac.digest(key, pt, "sha256"), size)
        row = []
        for name in ("pycryptodome", "openssl"):
            crypto = crypto_backend(name)
            env = seal(keys, header, pt, crypto=crypto)
            s = best_us(lambda pt=pt, c=crypto: seal(keys, header, pt, crypto=c), size)
            o = best_us(
                lambda env=env, c=crypto: verify(
                    env, expect="request", keyring=ring, max_bytes=1 << 30, crypto=c
                ).decrypt(),
                size,
            )
            row += [s, o]
        print(
            f"{size:>8} | {raw_pyc:9.1f} {raw_ssl:9.1f} {raw_mac:9.1f} | "
            f"{row[0]:9.1f} {row[1]:9.1f} | {row[2]:9.1f} {row[3]:9.1f} | "
            f"{row[0] / (raw_pyc + raw_mac):19.2f} {row[2] / (raw_ssl + raw_mac):5.2f}"
        )


if __name__ == "__main__":
    main()
