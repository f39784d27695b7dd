"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.modelkit import ModelKit, make_kit


@pytest.fixture
def kit(tmp_path: Path) -> ModelKit:
    """A fresh trusted signer, model key and empty signed-model repository."""
    return make_kit(tmp_path)
