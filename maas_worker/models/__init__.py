"""Models a worker can run, behind one small interface (`Model`) and a `ModelRegistry`."""

from __future__ import annotations

from .base import Model, ModelRegistry, parse_model_ref
from .diagnostic import EchoModel, SleepModel

__all__ = ["EchoModel", "Model", "ModelRegistry", "SleepModel", "parse_model_ref"]
