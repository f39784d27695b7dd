"""The wire vocabulary: every value is the documented string, documents are byte-identical."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

from maas_worker import protocol
from maas_worker.errors import ConfigError, InvalidEnvelope
from maas_worker.protocol import (
    ARGS_REPR,
    MONITOR_EXCHANGE,
    PRIORITIES,
    PRIORITY_CODES,
    QUEUE_NAMES,
    SAMPLE_TASK,
    TASK_NAME,
    AuditReason,
    FailureCode,
    JobInfo,
    JobState,
    Outcome,
    Priority,
    ResultDoc,
    payload_ref,
    payload_ref_tenant,
    queue_for,
    read_rejected_marker,
    rejected_marker,
)


def test_protocol_is_the_bottom_layer() -> None:
    # It may import errors only, so that every layer (crypto included) can import it.
    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert {m for m in imported if m.startswith("maas_worker")} == {"maas_worker.errors"}


def test_task_names_are_the_documented_ones() -> None:
    # docs/envelope.md (header task), docs/monitoring.md (the sample broadcast)
    assert (TASK_NAME, SAMPLE_TASK, MONITOR_EXCHANGE) == (
        "maas.infer",
        "maas.sample",
        "maas.monitor",
    )
    assert ARGS_REPR == "('<sealed envelope>',)"


def test_priorities_and_queues_are_the_documented_names() -> None:
    # docs/envelope.md 3.1 (the priority byte) and docs/operations.md (the queue lists)
    assert [p.value for p in Priority] == ["high", "normal", "low"]
    assert PRIORITIES == ("high", "normal", "low")
    assert all(type(p) is str for p in PRIORITIES)  # CLI choices print them as they are
    assert PRIORITY_CODES == {"high": 0, "normal": 1, "low": 2}
    assert QUEUE_NAMES == ("maas.high", "maas.normal", "maas.low")
    assert queue_for(Priority.LOW) == queue_for("low") == "maas.low"
    with pytest.raises(ConfigError, match="unknown priority 'urgent'"):
        queue_for("urgent")


def test_job_states_are_the_documented_strings() -> None:
    # DESIGN's job.status() contract and docs/compute.md "Job states"
    assert [s.value for s in JobState] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "rejected",
        "cancelled",
        "expired",
    ]
    assert JobState.QUEUED == "queued"
    assert f"{JobState.RUNNING}" == str(JobState.RUNNING) == "running"
    assert json.dumps(JobState.FAILED) == '"failed"'


def test_audit_reasons_are_the_contract_list() -> None:
    # DESIGN: tampered, replayed, expired, unknown_key, malformed, oversize, policy,
    # rate_limited; docs/models.md adds model_rejected (a model's, not a job's)
    assert {r.value for r in AuditReason} == {
        "tampered",
        "replayed",
        "expired",
        "unknown_key",
        "malformed",
        "oversize",
        "policy",
        "rate_limited",
        "model_rejected",
    }
    assert "%s" % AuditReason.UNKNOWN_KEY == "unknown_key"  # noqa: UP031 (the log format)


@pytest.mark.parametrize("reason", [r for r in AuditReason if r != AuditReason.EXPIRED])
def test_a_rejected_marker_carries_its_reason_and_old_clients_still_read_rejected(
    reason: AuditReason,
) -> None:
    marker = rejected_marker(JobState.REJECTED, reason)
    assert marker == f"rejected:{reason}"
    assert read_rejected_marker(marker.encode()) == (JobState.REJECTED, reason)
    # a client before 0.2 reads every marker but "expired" as rejected
    assert marker != "expired"


def test_rejected_markers_of_before_and_junk_read_without_a_reason() -> None:
    assert rejected_marker(JobState.REJECTED) == "rejected"
    assert rejected_marker(JobState.EXPIRED, AuditReason.EXPIRED) == "expired"
    assert read_rejected_marker(b"rejected") == (JobState.REJECTED, None)
    assert read_rejected_marker(b"expired") == (JobState.EXPIRED, None)
    for junk in (b"rejected:", b"rejected:secret text", b"rejected:policy ", b"\xff", b"x:policy"):
        assert read_rejected_marker(junk) == (JobState.REJECTED, None)
    with pytest.raises(ValueError):
        rejected_marker(JobState.FAILED, AuditReason.POLICY)


def test_outcomes_and_failure_codes_are_the_documented_strings() -> None:
    # docs/monitoring.md (maas_jobs_total outcome label), docs/compute.md (failure codes)
    assert {o.value for o in Outcome} == {
        "succeeded",
        "failed",
        "duplicate",
        "cancelled",
        "finished",
    }
    assert {c.value for c in FailureCode} == {
        "timeout",
        "cancelled",
        "worker_lost",
        "internal_error",
        "oversize",
    }


def test_payload_reference() -> None:
    assert payload_ref("acme") == "ref:payload:acme"
    assert payload_ref_tenant("ref:payload:acme") == "acme"
    assert payload_ref_tenant("ref:payload:Not A Tenant") == ""
    assert payload_ref_tenant("AQID") is None


# Result documents as the worker wrote them before ResultDoc (pipeline.py's dicts through
# json.dumps(doc, separators=(",", ":"), allow_nan=False)), pinned byte for byte.
PINNED = [
    (
        ResultDoc.success(
            {"label": 7, "scores": [0.1, 2.5e-07, 1], "text": 'h\u00e9 "q"'}, model="digits@2"
        ),
        b'{"ok":true,"output":{"label":7,"scores":[0.1,2.5e-07,1],'
        b'"text":"h\\u00e9 \\"q\\""},"model":"digits@2"}',
    ),
    (
        ResultDoc.failure("timeout", "the job exceeded its time limit (1.5 s)", model="digits@2"),
        b'{"ok":false,"error":"timeout","message":"the job exceeded its time limit (1.5 s)",'
        b'"model":"digits@2"}',
    ),
    (
        ResultDoc.failure("cancelled", "the job was cancelled", model="digits@2"),
        b'{"ok":false,"error":"cancelled","message":"the job was cancelled","model":"digits@2"}',
    ),
    (
        ResultDoc.failure("internal_error", "the model failed", model="digits@2"),
        b'{"ok":false,"error":"internal_error","message":"the model failed","model":"digits@2"}',
    ),
    (
        ResultDoc.failure(
            "worker_lost", "the job was started 3 times and its worker died each time"
        ),
        b'{"ok":false,"error":"worker_lost",'
        b'"message":"the job was started 3 times and its worker died each time"}',
    ),
    (
        ResultDoc.failure("oversize", "the result exceeds the size limit", model="digits@2"),
        b'{"ok":false,"error":"oversize","message":"the result exceeds the size limit",'
        b'"model":"digits@2"}',
    ),
    (
        ResultDoc.failure("internal_error", "the model's output is not JSON"),
        b'{"ok":false,"error":"internal_error","message":"the model\'s output is not JSON"}',
    ),
    (ResultDoc.success({"text": "hi"}), b'{"ok":true,"output":{"text":"hi"}}'),
    (ResultDoc.success(None), b'{"ok":true,"output":null}'),
]


@pytest.mark.parametrize(("doc", "body"), PINNED)
def test_result_documents_are_byte_identical_and_round_trip(doc: ResultDoc, body: bytes) -> None:
    assert doc.to_json() == body
    assert ResultDoc.from_json(body) == doc
    assert ResultDoc.from_json(body).to_json() == body


def test_produced_by_names_the_model_version() -> None:
    doc = ResultDoc.success([1, 2]).produced_by("echo@1")
    assert doc.to_json() == b'{"ok":true,"output":[1,2],"model":"echo@1"}'


def test_output_that_is_not_json_raises_for_the_worker_to_replace() -> None:
    with pytest.raises(ValueError):
        ResultDoc.success({"x": float("nan")}).to_json()
    with pytest.raises(TypeError):
        ResultDoc.success({"x": object()}).to_json()


def test_reading_is_as_lenient_as_the_client_always_was() -> None:
    # docs/envelope.md: readers ignore members they do not know
    assert ResultDoc.from_json(b'{"ok":true,"output":3,"extra":1}') == ResultDoc.success(3)
    assert ResultDoc.from_json(b'{"ok":true}') == ResultDoc.success({})
    assert ResultDoc.from_json(b'{"ok":false}') == ResultDoc.failure("error", "")
    assert ResultDoc.from_json(b'{"ok":0,"error":7,"model":5}') == ResultDoc.failure("7", "")
    assert ResultDoc.from_json(b'{"ok":false,"error":"cancelled"}').cancelled
    assert not ResultDoc.from_json(b'{"ok":false,"error":"timeout"}').cancelled


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1,2]", b'"ok"', b"null", b"\xff\xfe", b"[" * 100_000]
)
def test_a_body_that_is_not_a_json_object_is_an_invalid_envelope(body: bytes) -> None:
    with pytest.raises(InvalidEnvelope) as caught:
        ResultDoc.from_json(body)
    assert str(caught.value) == "invalid envelope"


JOB = "5e0c6a4e-7d1b-4c38-9a51-2f7f9a0c1b2d"


def test_job_info_has_attributes_and_prints_as_before() -> None:
    info = JobInfo(JOB, JobState.FAILED, "timeout", "digits@2")
    assert (info.job_id, info.state, info.reason, info.model) == (
        JOB,
        "failed",
        "timeout",
        "digits@2",
    )
    # `maas-worker status --json` prints as_dict(): the same JSON as the old dict
    assert json.dumps(info.as_dict()) == json.dumps(
        {"job_id": JOB, "state": "failed", "reason": "timeout", "model": "digits@2"}
    )
    assert info == JobInfo(JOB, JobState.FAILED, "timeout", "digits@2")
    assert len({info, JobInfo(JOB, JobState.FAILED, "timeout", "digits@2")}) == 1


def test_job_info_still_reads_like_the_old_dict_with_a_deprecation_warning() -> None:
    info = JobInfo(JOB, JobState.QUEUED)
    old = {"job_id": JOB, "state": "queued", "reason": None, "model": None}
    with pytest.warns(DeprecationWarning, match=r"info\.state"):
        assert info["state"] == "queued"
    with pytest.warns(DeprecationWarning):
        assert info == old
    with pytest.warns(DeprecationWarning):
        assert old == info
    with pytest.warns(DeprecationWarning):
        assert dict(info) == old
    with pytest.warns(DeprecationWarning):
        assert info.get("model") is None
    with pytest.warns(DeprecationWarning):
        assert "reason" in info
    with pytest.warns(DeprecationWarning):
        assert list(info) == list(old)
    with pytest.warns(DeprecationWarning):
        assert dict(info.items()) == old
    with pytest.warns(DeprecationWarning), pytest.raises(KeyError):
        info["nope"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert info.state == "queued"
        assert info.as_dict() == old
        assert info != JobInfo(JOB, JobState.RUNNING)
