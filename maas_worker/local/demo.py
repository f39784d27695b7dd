"""``maas-worker demo``: the whole system on one machine, then a clean exit.

Starts an embedded Valkey server on a free port, creates a throw-away
keyring, starts a worker, submits jobs at every priority, shows that a
forged message is refused and audited, checks that no plaintext reached
Redis, prints each result and a summary, and stops everything.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from maas_worker.backend.audit import AuditLog, AuditRecord
from maas_worker.client.client import Client
from maas_worker.client.job import Job
from maas_worker.crypto.envelope import NONCE_BYTES, encode_header
from maas_worker.errors import JobRejected, MaasError
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.models.paths import BUNDLED_MODEL_DIR
from maas_worker.protocol import ARGS_REPR, PRIORITIES, TASK_NAME, AuditReason, queue_for
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, save_keyring

DEMO_TENANT = "demo"
#: Three 8x8 handwritten digits from scikit-learn's held-out set (labels 2, 0, 4).
DIGITS_SAMPLES = [
    [
        0,
        0,
        7,
        16,
        14,
        3,
        0,
        0,
        0,
        0,
        9,
        14,
        11,
        15,
        0,
        0,
        0,
        0,
        1,
        5,
        0,
        15,
        5,
        0,
        0,
        0,
        0,
        0,
        0,
        16,
        5,
        0,
        0,
        0,
        0,
        0,
        3,
        16,
        4,
        0,
        0,
        0,
        0,
        1,
        12,
        14,
        1,
        0,
        0,
        0,
        5,
        12,
        16,
        16,
        14,
        1,
        0,
        0,
        8,
        16,
        14,
        10,
        13,
        3,
    ],
    [
        0,
        0,
        2,
        14,
        13,
        3,
        0,
        0,
        0,
        0,
        13,
        13,
        9,
        11,
        0,
        0,
        0,
        0,
        16,
        7,
        0,
        12,
        0,
        0,
        0,
        3,
        16,
        5,
        0,
        10,
        5,
        0,
        0,
        5,
        16,
        1,
        0,
        8,
        5,
        0,
        0,
        3,
        16,
        1,
        0,
        10,
        5,
        0,
        0,
        0,
        16,
        8,
        5,
        14,
        3,
        0,
        0,
        0,
        4,
        16,
        16,
        9,
        1,
        0,
    ],
    [
        0,
        0,
        0,
        10,
        9,
        0,
        0,
        0,
        0,
        0,
        5,
        15,
        0,
        0,
        9,
        5,
        0,
        0,
        14,
        10,
        0,
        7,
        16,
        4,
        0,
        5,
        16,
        7,
        5,
        16,
        6,
        0,
        0,
        11,
        16,
        16,
        16,
        14,
        0,
        0,
        0,
        3,
        4,
        11,
        16,
        8,
        0,
        0,
        0,
        0,
        0,
        7,
        16,
        2,
        0,
        0,
        0,
        0,
        0,
        12,
        12,
        0,
        0,
        0,
    ],
]
DIGITS_LABELS = [2, 0, 4]
RESULT_TIMEOUT_S = 60.0


def scan_for(client: redis.Redis, markers: list[bytes]) -> tuple[int, list[str]]:
    """Read every key of every type in every database; return (keys read, keys holding a marker)."""
    hits: list[str] = []
    total = 0
    info: dict[str, Any] = client.info("keyspace")
    conn = client.connection_pool.connection_kwargs
    for db in [int(k[2:]) for k in info]:
        # redis-py's stubs type every reply as a union; this loop reads raw bytes.
        c: Any = redis.Redis(host=conn.get("host", "127.0.0.1"), port=conn.get("port", 6379), db=db)
        for key in c.scan_iter(count=1000):
            total += 1
            kind = c.type(key).decode()
            if kind == "string":
                values = [c.get(key) or b""]
            elif kind == "list":
                values = c.lrange(key, 0, -1)
            elif kind == "hash":
                values = [k + b"=" + v for k, v in c.hgetall(key).items()]
            elif kind == "set":
                values = list(c.smembers(key))
            elif kind == "zset":
                values = [m for m, _ in c.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [
                    json.dumps(
                        {k.decode(): v.decode(errors="replace") for k, v in f.items()}
                    ).encode()
                    for _, f in c.xrange(key)
                ]
            else:
                values = []
            blob = key + b"\n" + b"\n".join(values)
            if any(m in blob for m in markers):
                hits.append(f"db{db}:{key.decode(errors='replace')}")
        c.close()
    return total, hits


def _forge(client: Client) -> str:
    """Send a job whose ciphertext was altered after sealing (what a Redis writer could do)."""
    header, envelope = client.seal("echo", {"text": "forged"}, priority="high")
    raw = bytearray(base64.b64decode(envelope))
    raw[len(encode_header(header)) + NONCE_BYTES + 2] ^= 0x01  # one bit of the ciphertext
    client.app.send_task(
        TASK_NAME,
        args=[base64.b64encode(bytes(raw)).decode()],
        task_id=header.job_id,
        queue=queue_for("high"),
        argsrepr=ARGS_REPR,
        kwargsrepr="{}",
    )
    return header.job_id


def _wait_audit(audit: AuditLog, job_id: str, timeout_s: float) -> AuditRecord | None:
    """The audit record for ``job_id``, once a worker has written it (None after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = next((r for r in audit.latest(20) if r.job_id == job_id), None)
        if rec is not None:
            return rec
        time.sleep(0.05)
    return None


def run_demo(jobs_per_priority: int = 2) -> int:
    """Run the demo; returns the exit status (0 when every check passed)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maas-demo-") as tmp, EmbeddedRedis() as server:
        tmpdir = Path(tmp)
        keyring_path = tmpdir / "keyring.json"
        save_keyring(keyring_path, Keyring().with_new_tenant(DEMO_TENANT))
        env = {
            **os.environ,
            "MAAS_BROKER_URL": server.url,
            "MAAS_RESULT_BACKEND": server.url,
            "MAAS_KEYRING": str(keyring_path),
            "MAAS_TENANT": DEMO_TENANT,
            "MAAS_DIAGNOSTIC_MODELS": "1",
            "MAAS_VISIBILITY_TIMEOUT_S": "60",
            # the signed models shipped in the package (the digits classifier)
            "MAAS_MODEL_DIR": str(BUNDLED_MODEL_DIR),
        }
        for name in ("MAAS_TRUSTED_SIGNERS", "MAAS_MODEL_KEYS"):
            env.pop(name, None)
        print(f"demo: embedded Valkey at {server.url}; keyring {keyring_path} (mode 0600)")
        worker = WorkerProcess(env=env, name="demo", log_path=tmpdir / "worker.log", concurrency=2)
        backend = redis.Redis.from_url(server.url)
        settings = Settings.from_env(env)
        try:
            worker.start()
            worker.wait_ready(backend)
            engine = (  # the worker's mode: MAAS_WORKER_MODE, if the caller set it
                "2 batch consumer processes"
                if settings.worker_mode == "batch-consumer"
                else "2 pool processes, one Celery task per job"
            )
            print(f"demo: worker {worker.node} ready ({engine}; queues high > normal > low)")
            client = Client(settings=settings)
            marker = f"plaintext-marker-{os.getpid()}-{time.time_ns()}"
            jobs: list[tuple[str, str, Job, float]] = []
            for priority in reversed(PRIORITIES):  # low first: high still overtakes
                for i in range(jobs_per_priority):
                    job = client.submit(
                        "echo", {"text": f"{marker} {priority} #{i}"}, priority=priority
                    )
                    jobs.append((priority, "echo", job, time.monotonic()))
            job = client.submit("sleep", {"seconds": 0.2}, priority="normal")
            jobs.append(("normal", "sleep", job, time.monotonic()))
            # the real model: three handwritten digits (true labels 2, 0, 4)
            digits = client.submit("digits", {"inputs": DIGITS_SAMPLES}, priority="high")
            jobs.append(("high", "digits", digits, time.monotonic()))
            forged_id = _forge(client)

            ok = 0
            for priority, model, job, t0 in jobs:
                out = job.result(timeout=RESULT_TIMEOUT_S)
                ms = (time.monotonic() - t0) * 1000
                shown = {"labels": out["labels"]} if model == "digits" else out
                print(f"  [{priority:<6}] {model:<6} {job.id} {ms:6.0f} ms -> {json.dumps(shown)}")
                ok += 1
            digits_ok = digits.result(timeout=RESULT_TIMEOUT_S)["labels"] == DIGITS_LABELS
            # A message that fails authentication is refused and audited, and
            # changes no job's state (anyone who can write a queue could have
            # sent it); the waiting client hears of it when its wait ends.
            audit_log = AuditLog(backend, maxlen=settings.audit_maxlen)
            rec = _wait_audit(audit_log, forged_id, RESULT_TIMEOUT_S)
            try:
                client.job(forged_id).result(timeout=0.5)
                print("demo: FAILED: the forged job produced a result")
                return 1
            except JobRejected:
                pass
            print(
                f"  [forged] one bit flipped in Redis -> refused, audit: "
                f"{rec.reason if rec else 'MISSING'}; the model never ran"
            )
            keys_read, hits = scan_for(backend, [marker.encode(), b"forged"])
            print(
                f"demo: scanned {keys_read} Redis keys for the plaintext: "
                f"{'none found' if not hits else 'FOUND in ' + ', '.join(hits)}"
            )
            elapsed = time.monotonic() - started
            passed = (
                rec is not None and rec.reason == AuditReason.TAMPERED and not hits and digits_ok
            )
            print(
                f"demo: {ok} jobs succeeded ({', '.join(PRIORITIES)}), 1 forged job rejected "
                f"and audited, {'no leak' if not hits else 'LEAK'}; {elapsed:.1f} s "
                f"{'OK' if passed else 'FAILED'}"
            )
            return 0 if passed else 1
        except MaasError as exc:
            print(f"demo: FAILED: {exc}\n--- worker log ---\n{worker.log_tail()}")
            return 1
        finally:
            worker.stop()
            backend.close()
