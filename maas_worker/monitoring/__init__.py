"""The monitoring plane: resource samples, Prometheus metrics and exporter, fleet view, autoscaling.

Nothing here is imported by producers (``maas_worker.client``): psutil and prometheus-client
are worker extras.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    # Before 0.2 ``maas_worker.monitoring`` was the module now at
    # ``maas_worker.monitoring.samples``. Kept for one release; lazy, so importing the
    # package does not load psutil.
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("maas_worker.monitoring.samples")
    if not hasattr(module, name):
        raise AttributeError(name)
    warnings.warn(
        f"maas_worker.monitoring.{name} moved to maas_worker.monitoring.samples.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
