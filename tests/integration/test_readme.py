"""README.md's "Using it" runs as written: its shell block in bash, its Python block in Python.

The shell block is taken from README.md as it is and run with bash in a fresh
folder with a fresh HOME, as a reader pastes it into a fresh shell in the
checkout (``.venv`` there is a link to this test's virtualenv). The ONLY change
made to its text is the port: 6390 becomes a free one, so that parallel runs do
not meet. bash runs it with ``-e`` (a failing line fails the test where a
reader would only see an error). What a reader checks is asserted: the job's
result line, a stats line naming the worker with its sample, exit 0; and no
process it started outlives it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from maas_worker.local.embedded import free_port
from tests.integration.conftest import WAIT_S, Stack
from tests.modelkit import BUNDLED_DIGITS, holdout, with_marker

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
#: The port the README's block uses (replaced by a free one here, and only that).
README_PORT = "6390"


def readme_block(section: str, lang: str) -> str:
    """The first ```lang block of README.md's ``## section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    match = re.search(rf"```{lang}\n(.*?)```", body, re.S)
    assert match, f"no {lang} block in README section {section!r}"
    return match.group(1)


def processes_with_home(home: Path) -> list[psutil.Process]:
    """Every process whose environment has ``HOME=home``: all the block started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("HOME") == str(home):
                found.append(proc)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def fresh_shell(tmp_path: Path, *, activated: bool) -> tuple[Path, Path, dict[str, str]]:
    """A checkout folder (``.venv`` linked to this virtualenv), a HOME, and their environment.

    ``activated``: the virtualenv's ``bin`` is on PATH, as after ``. .venv/bin/activate``.
    """
    work, home = tmp_path / "checkout", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAAS_", "XDG_", "VIRTUAL_ENV", "PYTHON"))
    }
    env["HOME"] = str(home)
    if activated:
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return work, home, env


def test_readme_using_it_shell_block_runs_in_a_fresh_shell(tmp_path: Path) -> None:
    block = readme_block("Using it", "sh")
    assert block.count(README_PORT) >= 3  # the server, the URL and the stop
    port = free_port()
    script = block.replace(README_PORT, str(port))
    work, home, env = fresh_shell(tmp_path, activated=False)  # the block activates it
    proc = None
    try:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        out, err = proc.communicate(timeout=180)
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in work.glob("*.log")
        )
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}{logs}"
        lines = out.splitlines()
        assert '{"echo": {"text": "hi"}}' in lines
        node = f"celery@{socket.gethostname()}"
        stats = [ln for ln in lines if ln.startswith(node)]
        assert stats and "sampled" in stats[0], out
        assert re.search(r"^    cpu \d", out, re.M), out
        assert "no audit records" in err
        # The terminal is not flooded: Celery's logs went to the files.
        assert "celery@" not in err and "[INFO" not in out + err
        assert "ready" in (work / "worker.log").read_text()
        assert "Scheduler: Sending due task maas-sample" in (work / "beat.log").read_text()
        # Nothing outlives the block: not in its process group, nor anywhere with its HOME
        # (the server daemonized into a session of its own).
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
        assert processes_with_home(home) == []
        assert not list(home.glob(".local/share/maas-worker/server-*/valkey.pid"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for leftover in processes_with_home(home):
            leftover.kill()


def test_readme_using_it_python_block_runs(shared_stack: Stack) -> None:
    """The Python block, unchanged, against a running worker (MAAS_TENANT=acme)."""
    block = readme_block("Using it", "python")
    out = subprocess.run(
        [sys.executable, "-c", block],
        env=shared_stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f-]{36} (queued|running|succeeded)", lines[0]), lines
    assert lines[1] == "{'echo': {'text': 'hi'}}"
    assert lines[2].startswith("JobInfo(") and "succeeded" in lines[2]
    assert re.fullmatch(r"\[\[\d\], \[\d\]\]", lines[3]), lines


def test_readme_using_it_asyncio_block_runs(shared_stack: Stack) -> None:
    """The asyncio block (the second Python block), unchanged, against a running worker."""
    text = README.read_text()
    section = text[text.index("\n## Using it\n") :]
    blocks = re.findall(r"```python\n(.*?)```", section[: section.find("\n## ", 1)], re.S)
    assert len(blocks) == 2 and "AsyncClient" in blocks[1]
    out = subprocess.run(
        [sys.executable, "-c", blocks[1]],
        env=shared_stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["{'echo': {'text': 'hi'}}", "100 done"]


def test_readme_model_security_block_runs_and_a_worker_serves_the_encrypted_model(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    """The block, unchanged, on two throw-away models named as it names them."""
    work, home, env = fresh_shell(tmp_path, activated=True)
    digits = BUNDLED_DIGITS.read_bytes()
    (work / "fraud-2.onnx").write_bytes(with_marker(digits, b"readme fraud 2"))
    (work / "fraud-3.onnx").write_bytes(with_marker(digits, b"readme fraud 3"))
    out = subprocess.run(
        ["bash", "-e", "-c", readme_block("Model security", "sh")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert out.stderr == ""
    rows = {
        tuple(line.split()[:2]): line
        for line in out.stdout.splitlines()
        if line.startswith("fraud ")
    }
    # `list`: 3 encrypted, 2 plain, both verify; the rollback released 2 (serial 3).
    assert re.search(r"\byes\s+-\s+yes$", rows[("fraud", "3")]), out.stdout
    assert re.search(r"\bno\s+serial 3\s+yes$", rows[("fraud", "2")]), out.stdout
    keys = home / ".config" / "maas-worker" / "model-keys.json"
    assert (keys.stat().st_mode & 0o777) == 0o600
    assert b"readme fraud 3" not in (work / "models/fraud/3/model.onnx.enc").read_bytes()
    # A worker with the variables the block exported, and its keys file, serves both.
    stack = make_stack(
        MAAS_MODEL_DIR=str(work / "models"),
        MAAS_TRUSTED_SIGNERS=str(work / "owner.key.pub"),
        MAAS_MODEL_KEYS=str(keys),
    )
    stack.start_worker(concurrency=1)
    data = holdout()
    few = {"inputs": data["inputs"][:3]}
    with stack.client() as client:
        encrypted = client.submit("fraud@3", few).result(timeout=WAIT_S)
        released = client.submit("fraud", few).result(timeout=WAIT_S)
    assert encrypted["label"] == released["label"] == data["labels"][:3]
