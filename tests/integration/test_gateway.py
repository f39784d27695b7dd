"""The HTTP gateway end to end: a caller seals, the gateway (MAC keys only) checks and
enqueues, a real worker runs the job, the caller opens the sealed result.

Every status code of docs/gateway.md, and hostile requests: each gets a clear
error and loses nothing (the jobs submitted around it still run).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from maas_worker.backend import keyspace
from maas_worker.broker import fetch
from maas_worker.protocol import queue_for
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring, save_keyring

from .conftest import Stack, wait_for
from .gatewaykit import Caller, GatewayProcess

pytestmark = pytest.mark.integration

BODY_TIMEOUT_S = 1.0
#: Where acme's normal jobs wait (fair share: one list per tenant and priority).
ACME_NORMAL = fetch.tenant_queue(queue_for("normal"), "acme")


@pytest.fixture(scope="module")
def gateway(shared_stack: Stack) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        shared_stack,
        MAAS_GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        MAAS_GATEWAY_MAX_BATCH="8",
        MAAS_GATEWAY_MAX_BATCH_BYTES="65536",
    )
    yield gw
    gw.stop()


@pytest.fixture
def acme(shared_stack: Stack, gateway: GatewayProcess) -> Iterator[Caller]:
    caller = Caller(shared_stack, gateway, "acme")
    yield caller
    caller.http.close()


@pytest.fixture
def globex(shared_stack: Stack, gateway: GatewayProcess) -> Iterator[Caller]:
    caller = Caller(shared_stack, gateway, "globex")
    yield caller
    caller.http.close()


def _error(resp: httpx.Response) -> str:
    doc = resp.json()
    assert doc["message"], doc
    code: str = doc["error"]
    return code


def test_submit_wait_and_open_the_result(acme: Caller) -> None:
    header, raw = acme.seal({"text": "hi"})
    resp = acme.submit(raw)
    assert resp.status_code == 202, resp.text
    assert resp.headers["Location"] == f"/v1/jobs/{header.job_id}"
    assert resp.json() == {
        "job_id": header.job_id,
        "state": "queued",
        "url": f"/v1/jobs/{header.job_id}",
        "duplicate": False,
    }
    done = acme.http.get(resp.headers["Location"], params={"wait": 30})
    assert done.status_code == 200
    body = done.json()
    assert body["state"] == "completed", body
    assert acme.open(body["result"], header.job_id)["output"] == {"echo": {"text": "hi"}}
    # Replayed after it ran: accepted as the same job again, not queued again.
    again = acme.submit(raw)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert acme.http.get(resp.headers["Location"]).json() == body


def test_the_gateway_keyring_holds_no_key_that_decrypts(gateway: GatewayProcess) -> None:
    doc = json.loads(Path(gateway.keyring_path).read_text())
    assert doc["kind"] == "gateway"
    for tenant in doc["tenants"].values():
        for key in tenant["keys"]:
            assert set(key) == {"version", "state", "mac", "bearer_sha256"}


def test_bad_mac_is_401_and_audited_under_the_tenant(shared_stack: Stack, acme: Caller) -> None:
    header, raw = acme.seal({"text": "forged"})
    forged = raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:]
    resp = acme.submit(forged)
    assert resp.status_code == 401
    assert _error(resp) == "tampered"
    record = shared_stack.wait_audit(header.job_id, "tampered")
    assert record.tenant == "acme" and not record.verified
    assert not shared_stack.backend.exists(keyspace.submitted("acme", header.job_id))


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer x", "Bearer acme.1.AAAA", "Basic YWNtZTp4", "Bearer nobody.1.xyz"],
)
def test_bad_bearer_is_401_before_the_body(acme: Caller, authorization: str) -> None:
    _, raw = acme.seal({"text": "x"})
    resp = httpx.post(
        str(acme.http.base_url) + "/v1/jobs",
        content=raw,
        headers={"Authorization": authorization, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 401
    assert _error(resp) == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_another_tenants_token_does_not_pass_for_mine(acme: Caller, globex: Caller) -> None:
    # globex's valid token, with acme's name in front of its secret part
    forged = "acme." + globex.token.split(".", 1)[1]
    resp = acme.http.get(f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401


def test_policy_is_403(globex: Caller) -> None:
    _, raw = globex.seal({"seconds": 0}, model="sleep")  # globex may use echo only
    resp = globex.submit(raw)
    assert resp.status_code == 403 and _error(resp) == "policy"
    _, raw = globex.seal({"text": "x"}, priority="high")  # at most normal
    assert globex.submit(raw).status_code == 403


def test_an_envelope_of_another_tenant_is_403(acme: Caller) -> None:
    _, raw = acme.seal({"text": "x"}, tenant="globex")
    resp = acme.submit(raw)
    assert resp.status_code == 403 and _error(resp) == "policy"


def test_expired_envelope_is_422(acme: Caller) -> None:
    _, raw = acme.seal({"text": "x"}, ttl_s=1, issued_ms=int(time.time() * 1000) - 120_000)
    resp = acme.submit(raw)
    assert resp.status_code == 422 and _error(resp) == "expired"


def test_garbage_is_400(acme: Caller) -> None:
    resp = acme.submit(b"\x01" * 200)
    assert resp.status_code in (400, 401)
    resp = acme.submit(b"not an envelope")
    assert resp.status_code == 400 and _error(resp) == "malformed"


def test_wrong_content_type_is_415(acme: Caller) -> None:
    _, raw = acme.seal({"text": "x"})
    resp = acme.submit(raw, **{"Content-Type": "application/json"})
    assert resp.status_code == 415 and _error(resp) == "unsupported_media_type"
    resp = acme.http.post("/v1/jobs", content=raw)  # none at all
    assert resp.status_code == 415


def test_oversize_is_413_declared_or_streamed(acme: Caller, shared_stack: Stack) -> None:
    cap = shared_stack.settings.max_input_bytes + 1024
    resp = acme.submit(b"\x00" * (cap + 1))
    assert resp.status_code == 413 and _error(resp) == "too_large"

    sent = 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as it streams
        nonlocal sent
        for _ in range(64):
            sent += 64 * 1024
            yield b"\x00" * (64 * 1024)

    try:
        resp = acme.http.post(
            "/v1/jobs", content=chunks(), headers={"Content-Type": "application/octet-stream"}
        )
        assert resp.status_code == 413
    except httpx.HTTPError:
        pass  # the gateway may close the connection before the client reads the answer
    # The gateway stopped reading at the cap, not at the end of the 4 MiB.
    assert sent < 4 * 1024 * 1024 or resp.status_code == 413


def test_slow_body_is_408(acme: Caller, gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            + f"Authorization: Bearer {acme.token}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b"\x01" * 10
        )
        started = time.monotonic()
        sock.settimeout(30)
        answer = sock.recv(4096)
        assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


def test_another_tenants_job_is_404_like_an_unknown_one(acme: Caller, globex: Caller) -> None:
    header, raw = acme.seal({"text": "mine"})
    assert acme.submit(raw).status_code == 202
    theirs = globex.http.get(f"/v1/jobs/{header.job_id}")
    unknown = globex.http.get(f"/v1/jobs/{uuid.uuid4()}")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    assert globex.http.delete(f"/v1/jobs/{header.job_id}").status_code == 404
    # Still acme's, untouched: it runs.
    done = acme.http.get(f"/v1/jobs/{header.job_id}", params={"wait": 30}).json()
    assert done["state"] == "completed"
    assert acme.open(done["result"], header.job_id)["ok"] is True


def test_cancel_as_the_owner(acme: Caller) -> None:
    # Fill the two pool processes, so the third job waits in its queue.
    busy = [acme.seal({"seconds": 3}, model="sleep") for _ in range(2)]
    for _, raw in busy:
        assert acme.submit(raw).status_code == 202
    header, raw = acme.seal({"seconds": 3}, model="sleep", priority="low")
    assert acme.submit(raw).status_code == 202
    resp = acme.http.delete(f"/v1/jobs/{header.job_id}")
    assert resp.status_code == 200 and resp.json()["cancel_requested"] is True
    state = acme.http.get(f"/v1/jobs/{header.job_id}", params={"wait": 30}).json()
    assert state["state"] in ("cancelled", "completed")
    if state["state"] == "completed":  # it had started: its result says cancelled
        assert acme.open(state["result"], header.job_id)["error"] == "cancelled"
    for h, _ in busy:
        acme.http.get(f"/v1/jobs/{h.job_id}", params={"wait": 30})


def test_batch_one_status_per_item(acme: Caller) -> None:
    good = [acme.seal({"n": n}) for n in range(3)]
    _, bad = acme.seal({"n": "bad"})
    bad = bad[:-1] + bytes([bad[-1] ^ 1])
    envelopes = [good[0][1], bad, good[1][1], good[2][1]]
    resp = acme.http.post(
        "/v1/jobs:batch",
        json={"envelopes": [base64.b64encode(e).decode() for e in envelopes]},
    )
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert [i["status"] for i in items] == [202, 401, 202, 202]
    for header, _ in good:
        done = acme.http.get(f"/v1/jobs/{header.job_id}", params={"wait": 30}).json()
        assert done["state"] == "completed"
    too_many = acme.http.post(
        "/v1/jobs:batch", json={"envelopes": [base64.b64encode(good[0][1]).decode()] * 9}
    )
    assert too_many.status_code == 413 and _error(too_many) == "too_many"
    too_big = acme.http.post("/v1/jobs:batch", json={"envelopes": ["A" * 70_000]})
    assert too_big.status_code == 413 and _error(too_big) == "too_large"
    assert acme.http.post("/v1/jobs:batch", json={"items": []}).status_code == 400


def test_health_metrics_and_openapi(gateway: GatewayProcess, acme: Caller) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"ok": True}
    text = httpx.get(gateway.url + "/metrics").text
    assert "maas_gateway_requests_total{" in text
    assert "maas_gateway_jobs_enqueued_total" in text
    served = httpx.get(gateway.url + "/openapi.json").json()
    checked_in = json.loads(
        (Path(__file__).parents[2] / "docs" / "gateway-openapi.json").read_text()
    )
    assert served == checked_in


# -- queue-level behaviour: a stack with no worker, so the queue shows what was sent ------
@pytest.fixture
def idle(make_stack: object) -> Iterator[tuple[Stack, GatewayProcess, Caller]]:
    stack: Stack = make_stack(MAAS_MAX_QUEUE_DEPTH="normal=3")  # type: ignore[operator]
    ring = load_keyring(stack.keyring_path)
    ring = ring.with_new_tenant("slow", TenantPolicy(rate_per_s=0.01, burst=1))
    save_keyring(stack.keyring_path, ring)
    gw = GatewayProcess(stack)
    caller = Caller(stack, gw)
    yield stack, gw, caller
    caller.http.close()
    gw.stop()


def test_idempotent_on_the_job_id(idle: tuple[Stack, GatewayProcess, Caller]) -> None:
    stack, _, acme = idle
    header, raw = acme.seal({"text": "once"})
    first = acme.submit(raw)
    again = acme.submit(raw)
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] is True
    assert stack.backend.llen(ACME_NORMAL) == 1
    marker = keyspace.submitted("acme", header.job_id)
    assert stack.backend.get(marker) == str(header.expires_at_ms).encode()
    other_header, other = acme.seal({"text": "other"}, job_id=header.job_id, ttl_s=120)
    assert other_header.expires_at_ms != header.expires_at_ms
    conflict = acme.submit(other)
    assert conflict.status_code == 409 and _error(conflict) == "conflict"
    assert stack.backend.llen(ACME_NORMAL) == 1
    # The conflict wrote nothing over the first job's queued marker.
    assert stack.backend.get(marker) == str(header.expires_at_ms).encode()
    assert acme.http.get(f"/v1/jobs/{header.job_id}").json()["state"] == "queued"


def test_queue_full_is_503_with_retry_after(idle: tuple[Stack, GatewayProcess, Caller]) -> None:
    stack, _, acme = idle
    for n in range(3):
        assert acme.submit(acme.seal({"n": n})[1]).status_code == 202
    header, raw = acme.seal({"n": 3})
    resp = acme.submit(raw)
    assert resp.status_code == 503 and _error(resp) == "queue_full"
    assert int(resp.headers["Retry-After"]) >= 1
    # Its idempotency record and its queued marker (written before the send) are gone.
    assert not stack.backend.exists(keyspace.gateway_seen("acme", header.job_id))
    assert not stack.backend.exists(keyspace.submitted("acme", header.job_id))
    assert acme.http.get(f"/v1/jobs/{header.job_id}").status_code == 404
    # Refused, not half-accepted: the same envelope goes through once there is room.
    stack.backend.rpop(ACME_NORMAL)
    assert acme.submit(raw).status_code == 202


def test_rate_limit_is_429_with_retry_after(idle: tuple[Stack, GatewayProcess, Caller]) -> None:
    stack, gw, _ = idle
    slow = Caller(stack, gw, "slow")
    assert slow.submit(slow.seal({"n": 1})[1]).status_code == 202
    resp = slow.submit(slow.seal({"n": 2})[1])
    assert resp.status_code == 429 and _error(resp) == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    slow.http.close()


def test_redis_down_is_503(idle: tuple[Stack, GatewayProcess, Caller]) -> None:
    stack, gw, acme = idle
    _, raw = acme.seal({"text": "x"})
    server_pid = stack.backend.info("server")["process_id"]
    import signal

    os.kill(server_pid, signal.SIGSTOP)  # Redis hangs: reads time out
    try:
        stack.backend.connection_pool.disconnect()
        wait_for(
            lambda: httpx.get(gw.url + "/healthz", timeout=30).status_code == 503,
            60,
            "/healthz to say 503",
        )
        resp = acme.submit(raw)
        assert resp.status_code == 503 and _error(resp) == "unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        os.kill(server_pid, signal.SIGCONT)


# -- a client in another language ------------------------------------------------------------
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_client_seals_submits_and_opens(shared_stack: Stack, gateway: GatewayProcess) -> None:
    kv = load_keyring(shared_stack.keyring_path).tenant("acme").primary()
    proc = subprocess.run(
        ["node", str(Path(__file__).with_name("gateway_client.mjs"))],
        env={
            "PATH": os.environ["PATH"],
            "GATEWAY_URL": gateway.url,
            "MAAS_TENANT": "acme",
            "ROOT_SECRET_B64": base64.b64encode(kv.secret).decode(),
            "KEY_VERSION": str(kv.version),
            "MODEL": "echo",
            "INPUT_JSON": json.dumps({"from": "node", "n": 7}),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["result"] == {
        "ok": True,
        "output": {"echo": {"from": "node", "n": 7}},
        "model": out["result"]["model"],
    }
    assert out["result"]["model"].startswith("echo@")


# -- TLS --------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_serves_https_only(shared_stack: Stack, tmp_path: Path) -> None:
    cert, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    gw = GatewayProcess(
        shared_stack,
        "gateway-tls",
        verify=ssl.create_default_context(cafile=str(cert)),
        MAAS_GATEWAY_TLS_CERT=str(cert),
        MAAS_GATEWAY_TLS_KEY=str(key),
    )
    try:
        assert gw.url.startswith("https://")
        caller = Caller(shared_stack, gw)
        header, raw = caller.seal({"over": "tls"})
        assert caller.submit(raw).status_code == 202
        done = caller.http.get(f"/v1/jobs/{header.job_id}", params={"wait": 30}).json()
        assert caller.open(done["result"], header.job_id)["output"] == {"echo": {"over": "tls"}}
        caller.http.close()
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5)
    finally:
        gw.stop()
