"""docs/protocol.md, followed step by step by a producer that is not this package.

Everything a producer does here uses redis-py and the primitives docs/envelope.md
names (`cryptography`'s AES-GCM and HKDF, the standard library's HMAC and SHA-256),
never `maas_worker.client`, `maas_worker.broker` or `maas_worker.crypto`: it reads
the keyring file `maas-worker keys export` wrote, connects as its tenant's Redis
user (`producer-<tenant>`, from `maas-worker acl`, on a server started with that
ACL file), and drives a real worker through submit, wake, wait, open, cancel,
failure, refusals, expiry and the claim check. Comments cite the doc's sections
(section numbers of docs/protocol.md unless envelope.md is named).

An observer connection (the operator role) reads only what a producer may not:
the audit stream and the wake-up list's length.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from maas_worker.local.embedded import free_port
from maas_worker.tenancy.keyring import Keyring, TenantPolicy, save_keyring

from .conftest import Stack, wait_for
from .test_acl import _start_server

pytestmark = pytest.mark.integration
WAIT_S = 60.0
#: The deployment's settings a producer is told (protocol.md, "Deployment setting").
SKEW_S = 1  # MAAS_CLOCK_SKEW_S, small so that rule 8 of 4.2 is seen in a test
RESULT_TTL_S = 3600  # MAAS_RESULT_TTL_S
MAX_QUEUE_DEPTH = 10_000  # MAAS_MAX_QUEUE_DEPTH
#: acme has a quota, so the producer runs the advisory check (3.4).
ACME_POLICY = TenantPolicy(rate_per_s=1000.0, burst=1000, max_in_flight=100)
#: globex may only run echo, at normal priority or below (a policy refusal, 4.5).
GLOBEX_POLICY = TenantPolicy(("echo",), "normal")


# -- envelope.md, re-implemented on the primitives it names ------------------------------
def derive(secret: bytes, tenant: str, version: int) -> dict[str, bytes]:
    """envelope.md 2: HKDF-SHA256, empty salt, info = label 0x00 tenant 0x00 u32(version)."""
    out = {}
    for name, label in (
        ("request_enc", b"maas-worker/v1/request-enc"),
        ("result_enc", b"maas-worker/v1/result-enc"),
        ("mac", b"maas-worker/v1/mac"),
    ):
        info = label + b"\x00" + tenant.encode() + b"\x00" + struct.pack(">I", version)
        out[name] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    return out


def str8(text: str) -> bytes:
    raw = text.encode()
    assert 1 <= len(raw) <= 255
    return bytes([len(raw)]) + raw


PRIORITY_BYTE = {"high": 0, "normal": 1, "low": 2}


def seal_request(
    keys: dict[str, bytes],
    version: int,
    *,
    tenant: str,
    job_id: str,
    model: str,
    inputs: Any,
    priority: str = "normal",
    ttl_ms: int = 600_000,
) -> tuple[bytes, bytes, int, int]:
    """envelope.md 3 and 5: (envelope, header bytes, issued_at_ms, expires_at_ms)."""
    issued = int(time.time() * 1000)
    expires = issued + ttl_ms
    strings = str8(tenant) + str8(job_id) + str8("maas.infer") + str8(model)
    header = struct.pack(
        ">BBHIQQB", 1, 1, 25 + len(strings), version, issued, expires, PRIORITY_BYTE[priority]
    )
    header += strings
    body = json.dumps(inputs, separators=(",", ":"), allow_nan=False).encode()
    nonce = os.urandom(12)
    sealed = header + nonce + AESGCM(keys["request_enc"]).encrypt(nonce, body, header)
    return sealed + hmac.digest(keys["mac"], sealed, "sha256"), header, issued, expires


def open_result(
    envelope: bytes, keyring: dict[int, dict[str, bytes]], *, tenant: str, job_id: str
) -> tuple[dict[str, Any], bytes]:
    """envelope.md 4 for a result, then 4.4's checks: (result document, request_hash)."""
    version, kind, header_len, key_version = (
        envelope[0],
        envelope[1],
        *struct.unpack(">HI", envelope[2:8]),
    )
    assert (version, kind) == (1, 2)
    keys = keyring[key_version]  # primary or decrypt-only only (2.1)
    assert hmac.compare_digest(
        hmac.digest(keys["mac"], envelope[:-32], "sha256"), envelope[-32:]
    ), "result MAC"
    header = envelope[:header_len]
    pos, fields = 25, []
    for _ in range(4):
        n = header[pos]
        fields.append(header[pos + 1 : pos + 1 + n].decode())
        pos += 1 + n
    request_hash = header[pos : pos + 32]
    assert pos + 32 == header_len
    assert (fields[0], fields[1]) == (tenant, job_id)  # 4.4: this tenant's, this job's
    nonce, rest = envelope[header_len : header_len + 12], envelope[header_len + 12 : -32]
    plain = AESGCM(keys["result_enc"]).decrypt(nonce, rest, header)
    return json.loads(plain), request_hash


def cancel_token(keys: dict[str, bytes], version: int, tenant: str, job_id: str) -> str:
    """Section 5: tenant:version:hex(HMAC(mac, label 0x00 job id))."""
    mac = hmac.digest(keys["mac"], b"maas-worker/v1/cancel\x00" + job_id.encode(), "sha256")
    return f"{tenant}:{version}:{mac.hex()}"


# -- a producer: redis-py and the exported keyring ---------------------------------------
@dataclass
class Sent:
    job_id: str
    header: bytes
    expires_at_ms: int


@dataclass
class Producer:
    tenant: str
    #: Its Redis connection (bytes replies), as ``producer-<tenant>`` (2.2).
    r: Any
    #: version -> derived keys, for every version that may open (2.1).
    keys: dict[int, dict[str, bytes]]
    primary: int
    policy: dict[str, Any]
    sent: dict[str, Sent] = field(default_factory=dict)

    @classmethod
    def from_export(cls, path: Path, url: str) -> Producer:
        doc = json.loads(path.read_text())
        assert doc["format"] == 1  # 2.1
        ((tenant, entry),) = doc["tenants"].items()  # an export holds one tenant
        keys, primary = {}, None
        for k in entry["keys"]:
            secret = base64.b64decode(k["secret"], validate=True)
            assert len(secret) == 32
            if k["state"] != "retired":
                keys[k["version"]] = derive(secret, tenant, k["version"])
            if k["state"] == "primary":
                primary = k["version"]
        assert primary is not None
        return cls(tenant, redis.Redis.from_url(url), keys, primary, entry["policy"])

    def key(self, kind: str, job_id: str) -> str:
        return f"maas:{{{self.tenant}}}:{kind}:{job_id}"  # 1.2

    def submit(
        self,
        model: str,
        inputs: Any,
        *,
        priority: str = "normal",
        ttl_ms: int = 600_000,
        spoil_mac: bool = False,
        wake: bool = True,
    ) -> str:
        job_id = str(uuid.uuid4())  # 1.2: a canonical UUID
        envelope, header, issued, expires = seal_request(
            self.keys[self.primary],
            self.primary,
            tenant=self.tenant,
            job_id=job_id,
            model=model,
            inputs=inputs,
            priority=priority,
            ttl_ms=ttl_ms,
        )
        if spoil_mac:
            envelope = envelope[:-1] + bytes([envelope[-1] ^ 1])
        queue = f"maas.{priority}"  # 3.7: the priority's queue
        tenant_list = f"{queue}.{self.tenant}"  # 3.7: this tenant's list of it
        # 3.3: backpressure, the tenant's list's length against MAAS_MAX_QUEUE_DEPTH.
        assert int(self.r.llen(tenant_list)) + 1 <= MAX_QUEUE_DEPTH
        # 3.4: the advisory quota check, for a tenant with a quota.
        if self.policy.get("rate_per_s") or self.policy.get("max_in_flight"):
            code, _ = self.r.fcall(
                "maas_v2_advise_many",
                3,
                f"maas:{{{self.tenant}}}:bucket",
                f"maas:{{{self.tenant}}}:inflight",
                f"maas:{{{self.tenant}}}:pending",
                self.policy.get("rate_per_s", 0),
                self.policy.get("burst", 0),
                self.policy.get("max_in_flight", 0),
                expires,
                job_id,
            )
            assert int(code) == 1
        # 3.5: claim check for a sealed request over 48 KiB.
        if len(envelope) > 48 * 1024:
            self.r.set(self.key("payload", job_id), envelope, px=expires - issued + 60_000)
            arg = f"ref:payload:{self.tenant}"
        else:
            arg = base64.b64encode(envelope).decode("ascii")
        # 3.6: the smallest entry the worker runs.
        body = [[arg], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        entry = {
            "body": base64.b64encode(json.dumps(body).encode()).decode("ascii"),
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {
                "task": "maas.infer",
                "id": job_id,
                "retries": 0,
                "eta": None,
                "argsrepr": "('<sealed envelope>',)",
                "kwargsrepr": "{}",
            },
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
                "maas_tenant": self.tenant,
            },
        }
        # 3.7 and 3.8: the entry, the tenant's arrival, the wake-up token and the
        # trim, in one MULTI/EXEC.
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(tenant_list, json.dumps(entry))
        pipe.sadd(f"maas:arrivals:{queue}", self.tenant)
        if wake:
            pipe.lpush("maas:wake", "1")
            pipe.ltrim("maas:wake", 0, 255)
        pipe.execute()
        # 3.9: the queued marker, after the push: expires_at_ms, decimal; TTL in seconds;
        # by the library (a batch's markers in one call; here a batch of one).
        answer = self.r.fcall(
            "maas_v2_mark_queued",
            1,
            self.key("job", job_id),
            "mark",
            f"{expires} {(expires - issued) // 1000 + RESULT_TTL_S}",
        )
        assert answer == b"q"
        self.sent[job_id] = Sent(job_id, header, expires)
        return job_id

    def read(self, job_id: str) -> list[bytes | None]:
        """4.1: result, rejected, cancel, claim and job marker, one pipeline of GETs."""
        pipe = self.r.pipeline(transaction=False)
        for kind in ("result", "rejected", "cancel", "claim", "job"):
            pipe.get(self.key(kind, job_id))
        replies: list[bytes | None] = pipe.execute()
        return replies

    def open(self, job_id: str, sealed: bytes) -> dict[str, Any]:
        doc, request_hash = open_result(sealed, self.keys, tenant=self.tenant, job_id=job_id)
        # 4.4: the result answers this very request.
        assert request_hash == hashlib.sha256(self.sent[job_id].header).digest()
        return doc

    def cancel_valid(self, token: bytes, job_id: str) -> bool:
        """Rule 6 of 4.2: a request of this tenant for this job, under a usable version."""
        tenant, _, rest = token.decode().partition(":")
        version, _, _ = rest.partition(":")
        if tenant != self.tenant or not version.isdigit() or int(version) not in self.keys:
            return False
        want = cancel_token(self.keys[int(version)], int(version), self.tenant, job_id)
        return hmac.compare_digest(want.encode(), token)

    def state(self, job_id: str) -> tuple[str, str | None]:
        """4.2: the first rule that applies."""
        result, rejected, cancel, claim, marker = self.read(job_id)
        if result is not None:
            doc = self.open(job_id, result)
            if doc["ok"]:
                return "succeeded", None  # rule 1
            if doc["error"] == "cancelled":
                return "cancelled", None  # rule 2
            return "failed", doc["error"]  # rule 3
        if rejected == b"expired":
            return "expired", None  # rule 4
        if rejected is not None:
            word = rejected.decode().partition("rejected:")[2]
            return "rejected", word or None  # rule 5
        if cancel is not None and self.cancel_valid(cancel, job_id):
            return "cancelled", None  # rule 6
        if claim is not None and claim != b"done":
            return "running", None  # rule 7
        if marker is not None:
            if marker.isdigit() and time.time() * 1000 > int(marker) + SKEW_S * 1000:
                return "expired", None  # rule 8
            return "queued", None  # rule 9
        return "unknown", None  # rule 10

    def wait(self, job_id: str, timeout: float = WAIT_S) -> tuple[str, str | None]:
        """4.3: read; if not ended, BLPOP the done list for a slice; again."""
        deadline = time.monotonic() + timeout
        while True:
            result, rejected, cancel, claim, _ = self.read(job_id)
            running = claim is not None and claim != b"done"
            if result is not None or rejected is not None or (cancel is not None and not running):
                return self.state(job_id)
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"job {job_id} did not end within {timeout:g} s")
            self.r.blpop([self.key("done", job_id)], timeout=max(0.01, min(1.0, left)))

    def output(self, job_id: str) -> dict[str, Any]:
        assert self.wait(job_id) == ("succeeded", None)
        result = self.r.get(self.key("result", job_id))
        assert result is not None
        return self.open(job_id, result)

    def cancel(self, job_id: str) -> int:
        """Section 5: maas_v2_cancel with the token of the primary version."""
        t = self.tenant
        token = cancel_token(self.keys[self.primary], self.primary, t, job_id)
        reply = self.r.fcall(
            "maas_v2_cancel",
            7,
            *(
                self.key(k, job_id)
                for k in ("result", "cancel", "done", "job", "rejected", "claim")
            ),
            f"maas:{{{t}}}:pending",
            token,
            (3600 + RESULT_TTL_S) * 1000,
            RESULT_TTL_S * 1000,
            job_id,
            2_592_000_000,
        )
        return int(reply)


# -- the deployment ----------------------------------------------------------------------
def maas(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "maas_worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@dataclass
class Deployment:
    stack: Stack  # backend: the observer (operator role)
    producers: dict[str, Producer]
    started: bool = False

    def start_worker(self) -> None:
        if not self.started:
            self.stack.start_worker("conformance", concurrency=2)
            self.started = True

    def audited(self, job_id: str, reason: str) -> dict[str, str]:
        def find() -> dict[str, str] | None:
            observer: Any = self.stack.backend
            for _id, raw in observer.xrevrange("maas:audit", count=1000):
                rec = {k.decode(): v.decode() for k, v in raw.items()}
                if rec.get("job_id") == job_id and rec.get("reason") == reason:
                    return rec
            return None

        found: dict[str, str] = wait_for(find, WAIT_S, f"audit {reason} for {job_id}")
        return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("protocol")
    keyring_path = tmp / "keyring.json"
    ring = Keyring().with_new_tenant("acme", ACME_POLICY).with_new_tenant("globex", GLOBEX_POLICY)
    ring, _ = ring.with_rotation("acme")  # version 1 decrypt-only, 2 primary
    save_keyring(keyring_path, ring)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_METRICS_PORT="0",
        MAAS_CLOCK_SKEW_S=str(SKEW_S),
        MAAS_RESULT_TTL_S=str(RESULT_TTL_S),
        MAAS_MODEL_DIR=str(tmp / "models"),
    )
    port = free_port()
    server = f"redis://127.0.0.1:{port}/0"
    acl_file, passwords = tmp / "users.acl", tmp / "passwords"
    maas(
        "acl", "--acl-file", str(acl_file), "--passwords", str(passwords), "--server", server,
        env=env,
    )  # fmt: skip
    proc = _start_server(tmp, port, acl_file, (passwords / "operator").read_text().strip())

    def url(role: str) -> str:
        secret = (passwords / role).read_text().strip()
        return f"redis://{role}:{secret}@127.0.0.1:{port}/0"

    # 7: the operator loads the library (a worker would at start; none runs yet).
    maas("acl", "--load-functions", env={**env, "MAAS_BROKER_URL": url("operator")})
    producers = {}
    for tenant in ("acme", "globex"):
        # 2.1: the file a producer of the tenant is given.
        out = tmp / f"{tenant}.keyring.json"
        maas("keys", "export", "--tenant", tenant, "--out", str(out), env=env)
        producers[tenant] = Producer.from_export(out, url(f"producer-{tenant}"))  # 2.2
    observer = redis.Redis.from_url(url("operator"))
    stack = Stack(
        url("operator"), tmp, keyring_path, {**env, "MAAS_BROKER_URL": url("worker")}, observer
    )
    try:
        yield Deployment(stack, producers)
    finally:
        for w in stack.workers:
            w.stop(timeout_s=5)
        for p in producers.values():
            p.r.close()
        observer.close()
        proc.terminate()
        proc.wait(10)


# -- the tests ---------------------------------------------------------------------------
def test_the_export_is_the_documented_layout(deployment: Deployment) -> None:
    acme = deployment.producers["acme"]
    # 2.1: both versions open, version 2 seals; the policy carries the quota.
    assert sorted(acme.keys) == [1, 2]
    assert acme.primary == 2
    assert acme.policy == {
        "max_priority": "high",
        "rate_per_s": 1000.0,
        "burst": 1000,
        "max_in_flight": 100,
    }
    assert deployment.producers["globex"].policy == {
        "max_priority": "normal",
        "allowed_models": ["echo"],
    }


def test_queued_expired_and_cancelled_before_a_worker_starts(deployment: Deployment) -> None:
    assert not deployment.started, "this test needs the queues idle: it runs first"
    acme = deployment.producers["acme"]
    echo = acme.submit("echo", {"text": "hi"})
    short = acme.submit("echo", {"n": 1}, ttl_ms=1000)  # a lifetime of 1 s
    doomed = acme.submit("sleep", {"seconds": 30})
    # 3.9: the marker holds expires_at_ms, decimal, with a TTL of lifetime + result TTL (s).
    marker = acme.r.get(acme.key("job", echo))
    assert marker == str(acme.sent[echo].expires_at_ms).encode()
    assert (
        600 + RESULT_TTL_S - 5
        <= deployment.stack.backend.ttl(acme.key("job", echo))
        <= (600 + RESULT_TTL_S)
    )
    # 4.2 rule 9, for each; then rule 8 once past the expiry plus the skew.
    assert [acme.state(j) for j in (echo, short, doomed)] == [("queued", None)] * 3
    wait_for(lambda: acme.state(short) == ("expired", None), 10, "rule 8 for the short job")
    assert acme.state(echo) == ("queued", None)
    # 5: a cancel before it starts; rule 6 reads it cancelled at once.
    assert acme.cancel(doomed) == 1
    assert acme.state(doomed) == ("cancelled", None)
    assert acme.r.blpop([acme.key("done", doomed)], timeout=1) is not None  # 4.3: woken
    # 5: no job of that id for this tenant.
    assert acme.cancel(str(uuid.uuid4())) == -1

    deployment.start_worker()
    # 4.3 and 4.4: the result opens with the tenant's key, names this request.
    doc = acme.output(echo)
    assert doc["ok"] is True
    assert doc["output"] == {"echo": {"text": "hi"}}
    assert doc["model"] == "echo@1"
    # 4.5: the expired job is refused (authenticated): the rejected marker says so.
    assert acme.wait(short) == ("expired", None)
    assert acme.r.get(acme.key("rejected", short)) == b"expired"
    deployment.audited(short, "expired")
    # 5: the cancelled job is closed when taken, never run: no result, claim done.
    wait_for(lambda: acme.r.get(acme.key("claim", doomed)) == b"done", WAIT_S, "the closed claim")
    assert acme.r.get(acme.key("result", doomed)) is None
    assert acme.state(doomed) == ("cancelled", None)
    # 5: a finished job cannot be cancelled.
    assert acme.cancel(echo) == 0


def test_running_cancelled_while_running_failed_and_claim_check(deployment: Deployment) -> None:
    deployment.start_worker()
    acme = deployment.producers["acme"]
    slow = acme.submit("sleep", {"seconds": 30}, priority="high")
    # 4.2 rule 7: a live holder id in the claim.
    wait_for(lambda: acme.state(slow) == ("running", None), WAIT_S, "the job to run")
    holder = acme.r.get(acme.key("claim", slow))
    assert holder is not None and holder.count(b":") == 2  # host:pid:random
    assert acme.cancel(slow) == 1
    assert acme.state(slow) == ("cancelled", None)  # rule 6 before rule 7
    # The stopped job's result follows (rule 2).
    wait_for(lambda: acme.r.exists(acme.key("result", slow)), WAIT_S, "the cancelled job's result")
    doc = acme.open(slow, acme.r.get(acme.key("result", slow)) or b"")
    assert (doc["ok"], doc["error"]) == (False, "cancelled")

    bad = acme.submit("sleep", {"seconds": "soon"}, priority="low")
    assert acme.wait(bad) == ("failed", "bad_input")  # rule 3

    # 3.5: a request over 48 KiB travels by claim check; the worker deletes the payload.
    big_input = {"text": "x" * 60_000}
    big = acme.submit("echo", big_input)
    assert acme.output(big)["output"] == {"echo": big_input}
    assert not acme.r.exists(acme.key("payload", big))


def test_refusals_reach_the_producer_as_documented(deployment: Deployment) -> None:
    deployment.start_worker()
    acme, globex = deployment.producers["acme"], deployment.producers["globex"]
    # 4.5, authenticated: globex may not submit at high priority (its policy, 2.1).
    over = globex.submit("echo", {"n": 1}, priority="high")
    assert globex.wait(over) == ("rejected", "policy")
    assert globex.r.get(globex.key("rejected", over)) == b"rejected:policy"
    assert deployment.audited(over, "policy")["verified"] == "1"
    # 4.5, not authenticated: a spoilt MAC changes no state; a suspect marker, audited.
    forged = acme.submit("echo", {"n": 2}, spoil_mac=True)
    assert deployment.audited(forged, "tampered")["verified"] == "0"
    wait_for(lambda: acme.r.get(acme.key("suspect", forged)) == b"1", WAIT_S, "suspect marker")
    assert acme.state(forged) == ("queued", None)
    assert acme.r.get(acme.key("rejected", forged)) is None
    # 4.5: an entry pushed to another priority's queue than its envelope's is refused too.
    job_id = str(uuid.uuid4())
    envelope, _, _, _ = seal_request(
        acme.keys[acme.primary], acme.primary, tenant="acme", job_id=job_id, model="echo",
        inputs={}, priority="low",
    )  # fmt: skip
    body = base64.b64encode(json.dumps([[base64.b64encode(envelope).decode()], {}, None]).encode())
    entry = {
        "body": body.decode(),
        "content-type": "application/json",
        "headers": {"task": "maas.infer", "id": job_id},
        "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }
    acme.r.lpush("maas.high.acme", json.dumps(entry))
    acme.r.sadd("maas:arrivals:maas.high", "acme")
    assert deployment.audited(job_id, "tampered")["verified"] == "0"
    # 3.4: a batch over the cap on jobs in flight (100) is refused, nothing recorded.
    code, wait_ms = acme.r.fcall(
        "maas_v2_advise_many", 3, "maas:{acme}:bucket", "maas:{acme}:inflight",
        "maas:{acme}:pending", 1000.0, 1000, 100, int(time.time() * 1000) + 60_000,
        *(str(uuid.uuid4()) for _ in range(101)),
    )  # fmt: skip
    assert (int(code), int(wait_ms)) == (-1, 0)


def test_the_wake_up_token_is_taken_by_an_idle_worker(deployment: Deployment) -> None:
    deployment.start_worker()
    acme = deployment.producers["acme"]
    observer = deployment.stack.backend
    wait_for(lambda: observer.llen("maas:wake") == 0, WAIT_S, "the worker to drain the tokens")
    job = acme.submit("echo", {"wake": 1})
    assert acme.output(job)["output"] == {"echo": {"wake": 1}}
    # 3.8: the idle worker took the token (BRPOP); the producer trims, never pops.
    wait_for(lambda: observer.llen("maas:wake") == 0, WAIT_S, "the token to be taken")
    # 3.8: without a token the job still runs (found at the worker's poll timeout).
    quiet = acme.submit("echo", {"wake": 0}, wake=False)
    assert acme.output(quiet)["output"] == {"echo": {"wake": 0}}


def test_a_producer_cannot_step_outside_its_role(deployment: Deployment) -> None:
    acme = deployment.producers["acme"]
    # 2.2: no reading a queue's messages, no other tenant's keys, no Lua,
    # no MGET that names another tenant's key.
    job = str(uuid.uuid4())
    for command in (
        ("LRANGE", "maas.normal.acme", 0, -1),
        ("LPUSH", "maas.normal", "x"),  # 3.7: only its own list of a queue
        ("LPUSH", "maas.normal.globex", "x"),
        ("SMEMBERS", "maas:arrivals:maas.normal"),  # 3.7: add only
        ("GET", f"maas:{{globex}}:job:{job}"),
        ("EVAL", "return 1", 0),
        ("PUBLISH", "maas.monitor", "x"),
        ("XREVRANGE", "maas:audit", "+", "-", "COUNT", 1),
        ("MGET", f"maas:{{acme}}:job:{job}", f"maas:{{globex}}:job:{job}"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            acme.r.execute_command(*command)
