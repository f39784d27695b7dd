"""``make demo`` prints nothing alarming: building the package and running the demo.

The issue (#15) saw setuptools' "project.license as a TOML table is
deprecated" three times in ``make demo``. Building the project's wheel the way
pip builds it for ``make venv`` (an isolated build with the build-system's
requirements), verbosely so that everything setuptools says is shown, must
print no warning, deprecation or traceback. (``make venv``'s editable install
also sets PYTHONWARNINGS=ignore for setuptools' warning that this checkout's
folder may shadow the package; the wheel build has no such warning to hide.)
The demo's own output is checked in test_cli.py's demo test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Lines a reader would take for a problem.
ALARMING = re.compile(r"warn|deprecat|traceback|^\s*error\b", re.I)
#: pip's notes on this machine's index configuration (a missing mirror folder), not the project's.
MACHINE_NOTES = re.compile(
    r"^\s*WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$"
)
#: What pip says when it cannot reach a package index at all.
UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|"
    r"Temporary failure in name resolution|Network is unreachable|ProxyError"
)


def alarming_lines(text: str) -> list[str]:
    """The lines of ``text`` a reader would take for a warning or an error."""
    return [
        line
        for line in text.splitlines()
        if ALARMING.search(line) and not MACHINE_NOTES.match(line)
    ]


def test_alarming_lines_are_found() -> None:
    sample = (
        "  SetuptoolsDeprecationWarning: `project.license` as a TOML table is deprecated\n"
        "  WARNING: Location 'file:///opt/x/simple/y/' is ignored: "
        "it is neither a file nor a directory.\n"
        "  copying build/lib/maas_worker/errors.py -> build/bdist/wheel/./maas_worker\n"
        "error: metadata-generation-failed\n"
        "Successfully built maas-worker\n"
    )
    lines = sample.splitlines()
    assert alarming_lines(sample) == [lines[0], lines[3]]


def test_building_the_package_prints_no_warning(tmp_path: Path) -> None:
    # A copy of what the build reads: pip builds in the source folder (build/, *.egg-info).
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "maas_worker", src / "maas_worker", ignore=shutil.ignore_patterns("__pycache__")
    )
    # Byte-compiling disabled by the environment makes distutils say so ("warning: ...").
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pip = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--disable-pip-version-check"]
    out = subprocess.run(
        [*pip, "--no-cache-dir", "-w", str(wheels), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    text = out.stdout + out.stderr
    if out.returncode != 0 and UNREACHABLE.search(text):
        pytest.skip("the package index is unreachable: cannot install the build requirements")
    assert out.returncode == 0, text[-3000:]
    assert list(wheels.glob("maas_worker-*.whl"))
    assert alarming_lines(text) == []
