"""The command line as a user runs it: real processes, real Redis, real worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from .conftest import Stack

pytestmark = pytest.mark.integration
#: A well-formed job id that no job has.
NO_SUCH_JOB = str(uuid.uuid4())


def test_submit_wait_prints_the_result_as_json(shared_stack: Stack) -> None:
    out = shared_stack.cli(
        "submit",
        "--model",
        "echo",
        "--priority",
        "high",
        "--input",
        '{"text": "cli"}',
        "--wait",
        "--timeout",
        "60",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"echo": {"text": "cli"}}


def test_submit_then_status_and_result(shared_stack: Stack, tmp_path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"seconds": 0.1}')
    out = shared_stack.cli("submit", "--model", "sleep", "--input-file", str(path))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert len(out.stdout.splitlines()) == 1
    res = shared_stack.cli("result", job_id, "--timeout", "60")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["slept"] >= 0.1
    st = shared_stack.cli("status", job_id)
    assert (st.returncode, st.stdout.strip()) == (0, "succeeded")
    # which model version answered is in the sealed result, shown by status --json
    st = shared_stack.cli("status", job_id, "--json")
    assert json.loads(st.stdout) == {
        "job_id": job_id,
        "state": "succeeded",
        "reason": None,
        "model": "sleep@1",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "--model", "echo", "--input", "{not json"], "not valid JSON"),
        (["submit", "--model", "nope", "--input", "{}"], "unknown model 'nope'"),
        (["submit", "--model", "echo", "--input", "{}", "--tenant", "initech"], "unknown tenant"),
        (["submit", "--model", "echo", "--input-file", "/nonexistent.json"], "cannot read"),
        (
            ["--keyring", "/nonexistent/k.json", "submit", "--model", "echo", "--input", "{}"],
            "keys init",
        ),
        (["status", NO_SUCH_JOB], "unknown job"),
        (["result", NO_SUCH_JOB, "--timeout", "0.2"], "unknown job"),
        (["status", "no-such-job"], "not a job id"),
        (["result", "no-such-job", "--timeout", "0.2"], "not a job id"),
        (["cancel", NO_SUCH_JOB], "no job of tenant 'acme'"),
    ],
)
def test_errors_are_one_line_on_stderr_and_exit_nonzero(
    shared_stack: Stack, args: list[str], message: str
) -> None:
    out = shared_stack.cli(*args)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("maas-worker: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    "command",
    [["audit"], ["stats"], ["submit", "--model", "echo", "--input", "{}"], ["status", NO_SUCH_JOB]],
)
@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("database 99", "no such database on the server (DB index is out of range)"),
        ("unknown host", "unknown host ("),
    ],
)
def test_a_bad_redis_url_is_one_line_naming_the_cause(
    shared_stack: Stack, command: list[str], where: str, cause: str
) -> None:
    if where == "database 99":  # the server holds 16
        url = shared_stack.url.rsplit("/", 1)[0] + "/99"
    else:
        url = "redis://no-such-host.invalid:6379/0"
    out = shared_stack.cli("--broker-url", url, *command)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("maas-worker: error: ")
    assert f"unavailable ({url}" in lines[0] and cause in lines[0]
    for name in ("Error", "gaierror", "Traceback"):
        assert name not in lines[0]


def test_rejected_job_exits_nonzero_and_shows_in_audit(shared_stack: Stack) -> None:
    from maas_worker.local.demo import _forge

    # A job whose ciphertext was altered in Redis: it does not authenticate, so
    # the worker only audits it (anyone who can write a queue could have sent
    # it); the job's client learns of it when its wait ends.
    forged = _forge(shared_stack.client())
    shared_stack.wait_audit(forged, "tampered")
    res = shared_stack.cli("result", forged, "--timeout", "1")
    assert res.returncode == 1
    assert "did not authenticate" in res.stderr
    audit = shared_stack.cli("audit", "--json", "--limit", "1000")
    assert audit.returncode == 0
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    mine = [r for r in records if r["job_id"] == forged]
    assert mine and mine[0]["reason"] == "tampered"
    assert mine[0]["tenant"] == "acme" and mine[0]["verified"] is False
    assert {"job_id", "tenant", "reason", "at"} <= set(mine[0])
    ats = [r["at"] for r in records]
    assert ats == sorted(ats, reverse=True)  # newest first
    text = shared_stack.cli("audit", "--limit", "5")
    assert forged in text.stdout
    assert "(unverified)" in text.stdout


def test_audit_with_no_records_says_so_on_stderr_and_exits_zero(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()  # a fresh Redis: nothing audited yet
    text = stack.cli("audit")
    assert (text.returncode, text.stdout, text.stderr) == (0, "", "no audit records\n")
    as_json = stack.cli("audit", "--json")
    assert (as_json.returncode, as_json.stdout, as_json.stderr) == (0, "", "")


def test_a_worker_whose_credentials_redis_refuses_exits_with_the_cause(
    shared_stack: Stack,
) -> None:
    url = shared_stack.env["MAAS_BROKER_URL"].replace("redis://", "redis://nobody:wrong@", 1)
    out = subprocess.run(
        [sys.executable, "-m", "maas_worker", "worker", "--concurrency", "1"],
        env={**shared_stack.env, "MAAS_BROKER_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr == (
        "maas-worker: error: Redis refused the worker's credentials "
        "(WRONGPASS invalid username-password pair or user is disabled.)\n"
    )
    assert "wrong" not in out.stderr + out.stdout  # the password never shows
    assert "Trying again" not in out.stderr + out.stdout


def test_stats_lists_the_worker_and_backlog(shared_stack: Stack) -> None:
    out = shared_stack.cli("stats", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc["backlog"]) == {"high", "normal", "low"}
    assert any(w["worker"].startswith("shared@") for w in doc["workers"])


def test_demo_runs_the_whole_system_and_exits_zero(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "maas_worker", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for priority in ("high", "normal", "low"):
        assert f"[{priority:<6}] echo" in out.stdout
    assert "refused, audit: tampered; the model never ran" in out.stdout
    assert "none found" in out.stdout
    assert out.stdout.rstrip().endswith("OK")
    # Nothing a reader would take for a problem (#15: `make demo` showed warnings).
    assert not re.search(r"warn|deprecat|traceback", out.stdout + out.stderr, re.I)
    assert out.stderr == ""
