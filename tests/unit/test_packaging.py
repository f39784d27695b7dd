"""What the distribution says about itself: one version, its licence, its type hints."""

from __future__ import annotations

import tomllib
from pathlib import Path

import maas_worker

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "maas_worker.__version__"
    }
    # the compose file's default image tag follows it
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert f"maas-worker:{maas_worker.__version__}}}" in compose
    assert f"## [{maas_worker.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_licence_and_type_hints_ship() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert (ROOT / "maas_worker" / "py.typed").exists()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["maas_worker"]
    for name in ("SECURITY.md", "CONTRIBUTING.md", "CHANGELOG.md"):
        assert (ROOT / name).read_text().strip(), name
