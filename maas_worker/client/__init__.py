"""The producer side: seal and submit jobs (``Client``), wait for and open results (``Job``)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from maas_worker.client.client import Client
from maas_worker.client.job import Job

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    # Before 0.2 ``maas_worker.client`` was one module; its other names now live in
    # ``maas_worker.client.client``. Kept for one release.
    module = importlib.import_module("maas_worker.client.client")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(name)
    warnings.warn(
        f"maas_worker.client.{name} moved to maas_worker.client.client.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
