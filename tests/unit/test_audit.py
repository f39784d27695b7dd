"""The audit log: a bounded Redis stream of rejections, on fakeredis."""

from __future__ import annotations

import json
import logging
import socket
import time

import fakeredis
import pytest

from maas_worker.backend import keyspace
from maas_worker.backend.audit import REASONS, AuditLog, AuditRecord, name_worker
from maas_worker.protocol import AuditReason

CONTRACT_REASONS = {
    "tampered",
    "replayed",
    "expired",
    "unknown_key",
    "malformed",
    "oversize",
    "policy",
    "rate_limited",
}
#: Added by the signed-model repository: a model version refused at load.
MODEL_REASONS = {"model_rejected"}


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def audit(server: fakeredis.FakeServer) -> AuditLog:
    return AuditLog(fakeredis.FakeRedis(server=server), maxlen=1000)


def test_reasons_are_the_contract_list() -> None:
    assert set(REASONS) == CONTRACT_REASONS | MODEL_REASONS


def test_records_round_trip_newest_first(audit: AuditLog) -> None:
    before = time.time()
    audit.record(job_id="j1", tenant="acme", reason="tampered", verified=False)
    audit.record(job_id="j2", tenant="globex", reason="expired", verified=True)
    audit.record(job_id="j3", tenant="", reason="malformed", verified=False)
    after = time.time()
    records = audit.latest()
    assert [r.job_id for r in records] == ["j3", "j2", "j1"]
    assert [r.reason for r in records] == ["malformed", "expired", "tampered"]
    assert [r.tenant for r in records] == ["", "globex", "acme"]
    assert [r.verified for r in records] == [False, True, False]
    for rec in records:
        assert isinstance(rec, AuditRecord)
        assert before - 1 <= rec.at <= after + 1
        assert rec.worker == socket.gethostname()
    assert records[0].at >= records[1].at >= records[2].at


def test_records_name_the_worker_node_once_it_is_known(audit: AuditLog) -> None:
    audit.record(job_id="j1", tenant="acme", reason="tampered", verified=False)
    name_worker("gpu-a@host1")
    try:
        audit.record(job_id="j2", tenant="acme", reason="tampered", verified=False)
    finally:
        AuditLog.node = None
    assert [r.worker for r in audit.latest()] == ["gpu-a@host1", socket.gethostname()]


def test_latest_limit(audit: AuditLog) -> None:
    for i in range(10):
        audit.record(job_id=f"j{i}", tenant="acme", reason="replayed", verified=True)
    assert [r.job_id for r in audit.latest(3)] == ["j9", "j8", "j7"]
    assert len(audit.latest()) == 10


def test_latest_on_an_empty_log(audit: AuditLog) -> None:
    assert audit.latest() == []


@pytest.mark.parametrize("reason", sorted(CONTRACT_REASONS))
def test_every_contract_reason_is_accepted(audit: AuditLog, reason: str) -> None:
    audit.record(job_id="j", tenant="acme", reason=reason, verified=False)
    assert audit.latest(1)[0].reason == reason


@pytest.mark.parametrize("reason", ["", "bogus", "TAMPERED", "tampered ", "tampered\n"])
def test_reason_outside_the_allow_list_raises(
    server: fakeredis.FakeServer, audit: AuditLog, reason: str
) -> None:
    with pytest.raises(ValueError, match="unknown audit reason"):
        audit.record(job_id="j", tenant="acme", reason=reason, verified=False)
    assert audit.latest() == []
    assert not fakeredis.FakeRedis(server=server).exists(keyspace.AUDIT_STREAM)


def test_to_json_has_the_contract_fields(audit: AuditLog) -> None:
    audit.record(job_id="j1", tenant="acme", reason="policy", verified=True)
    doc = json.loads(json.dumps(audit.latest()[0].to_json()))
    assert {"job_id", "tenant", "reason", "at"} <= set(doc)
    assert doc["job_id"] == "j1"
    assert doc["tenant"] == "acme"
    assert doc["reason"] == "policy"
    assert isinstance(doc["at"], float)


@pytest.mark.parametrize(
    "evil",
    [
        "job\nFAKE tampered",
        "job\r\x1b[2Jclear",
        "\x00nul",
        "tab\there",
        "bell\x07",
        "\u2028line-sep",
        "\x85nel",
        "del\x7f",
    ],
)
def test_non_printable_characters_are_replaced(audit: AuditLog, evil: str) -> None:
    audit.record(job_id=evil, tenant=evil, reason="malformed", verified=False)
    rec = audit.latest(1)[0]
    for value in (rec.job_id, rec.tenant):
        assert value.isprintable()
        assert len(value) == len(evil)
        assert "?" in value
        assert "\n" not in value and "\r" not in value and "\x1b" not in value


def test_printable_unicode_is_kept(audit: AuditLog) -> None:
    audit.record(job_id="job-é-✓", tenant="acme", reason="malformed", verified=False)
    assert audit.latest(1)[0].job_id == "job-é-✓"


def test_long_job_ids_and_tenants_are_cut(audit: AuditLog) -> None:
    audit.record(job_id="j" * 100_000, tenant="t" * 5000, reason="oversize", verified=False)
    rec = audit.latest(1)[0]
    assert rec.job_id == "j" * 128
    assert rec.tenant == "t" * 128


def test_cut_happens_before_sanitising(audit: AuditLog) -> None:
    audit.record(job_id="\n" * 1000, tenant="acme", reason="malformed", verified=False)
    assert audit.latest(1)[0].job_id == "?" * 128


def test_record_holds_no_other_fields(server: fakeredis.FakeServer, audit: AuditLog) -> None:
    audit.record(job_id="j1", tenant="acme", reason="tampered", verified=False)
    ((_id, fields),) = fakeredis.FakeRedis(server=server).xrange(keyspace.AUDIT_STREAM)
    assert set(fields) == {b"job_id", b"tenant", b"reason", b"at", b"worker", b"verified"}


def test_detail_is_stored_only_when_given_and_cleaned(
    server: fakeredis.FakeServer, audit: AuditLog
) -> None:
    audit.record(
        job_id="",
        tenant="",
        reason="model_rejected",
        verified=False,
        detail="digits@2: signature does not verify\n" + "x" * 500,
    )
    rec = audit.latest(1)[0]
    assert rec.reason == "model_rejected"
    assert rec.detail == ("digits@2: signature does not verify?" + "x" * 500)[:128]
    assert rec.to_json()["detail"] == rec.detail


def test_stream_is_bounded(server: fakeredis.FakeServer) -> None:
    maxlen = 100
    log = AuditLog(fakeredis.FakeRedis(server=server), maxlen=maxlen)
    for i in range(1000):
        log.record(job_id=f"j{i}", tenant="acme", reason="replayed", verified=True)
    length = fakeredis.FakeRedis(server=server).xlen(keyspace.AUDIT_STREAM)
    # Trimming is approximate (~): Redis may keep up to one macro node more.
    assert maxlen <= length <= 2 * maxlen
    assert log.latest(1)[0].job_id == "j999"


def test_redis_error_while_recording_does_not_raise(
    server: fakeredis.FakeServer, audit: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    server.connected = False
    with caplog.at_level(logging.ERROR, logger="maas_worker.backend.audit"):
        audit.record(job_id="j1\nx", tenant="acme", reason="tampered", verified=False)
    assert "audit write failed" in caplog.text
    assert "j1?x" in caplog.text
    server.connected = True
    assert audit.latest() == []


def test_reading_tolerates_missing_fields(server: fakeredis.FakeServer, audit: AuditLog) -> None:
    fakeredis.FakeRedis(server=server).xadd(keyspace.AUDIT_STREAM, {"reason": "tampered"})
    rec = audit.latest(1)[0]
    assert rec == AuditRecord(job_id="", tenant="", reason="tampered", at=0.0)


def test_reading_works_with_decoded_responses(server: fakeredis.FakeServer) -> None:
    log = AuditLog(fakeredis.FakeRedis(server=server, decode_responses=True), maxlen=1000)
    log.record(job_id="j1", tenant="acme", reason="expired", verified=True)
    rec = log.latest(1)[0]
    assert (rec.job_id, rec.tenant, rec.reason, rec.verified) == ("j1", "acme", "expired", True)


def test_on_record_hears_every_reason_even_when_redis_is_down(
    server: fakeredis.FakeServer,
) -> None:
    heard: list[str] = []
    log_ = AuditLog(fakeredis.FakeRedis(server=server), maxlen=1000, on_record=heard.append)
    log_.record(job_id="j1", tenant="acme", reason=AuditReason.POLICY, verified=True)
    server.connected = False
    log_.record(job_id="j2", tenant="acme", reason=AuditReason.TAMPERED, verified=False)
    server.connected = True
    assert heard == ["policy", "tampered"]
    assert [r.job_id for r in log_.latest()] == ["j1"]  # the second write failed, not the hook
    with pytest.raises(ValueError):  # an unknown reason is refused before the hook
        log_.record(job_id="j3", tenant="", reason="nope", verified=False)  # type: ignore[arg-type]
    assert heard == ["policy", "tampered"]


def test_a_failing_on_record_hook_never_stops_the_record(server: fakeredis.FakeServer) -> None:
    def boom(reason: str) -> None:
        raise RuntimeError("metrics broken")

    log_ = AuditLog(fakeredis.FakeRedis(server=server), maxlen=1000, on_record=boom)
    log_.record(job_id="j1", tenant="acme", reason=AuditReason.REPLAYED, verified=True)
    assert [r.reason for r in log_.latest()] == ["replayed"]
