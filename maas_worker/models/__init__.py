"""Models a worker can run, behind one small interface (`Model`) and a `ModelRegistry`."""

from __future__ import annotations

from maas_worker.models.base import Model, ModelRegistry, ModelSource, parse_model_ref
from maas_worker.models.diagnostic import EchoModel, SleepModel

# The repository, signing and encryption live in their own modules
# (`repository`, `signing`, `artifact_crypto`, `manifest`, `onnx_runner`) and are
# imported where needed, so that clients never import ONNX Runtime.
__all__ = ["EchoModel", "Model", "ModelRegistry", "ModelSource", "SleepModel", "parse_model_ref"]
