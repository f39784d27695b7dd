"""Module paths from before the 0.2 layout still import, with a DeprecationWarning, for one release.

``import maas_worker.guard`` returns the very module object now at
``maas_worker.backend.claims`` (so attributes set on either are seen by both), which is
what configuration strings such as ``maas_worker.transport:Transport`` need. The old
``client``, ``monitoring`` and ``cli`` paths are packages now and forward old names
themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

#: Old dotted path -> new dotted path.
MOVED: dict[str, str] = {
    f"maas_worker.{old}": f"maas_worker.{new}"
    for old, new in {
        "aead": "crypto.primitives",
        "envelope": "crypto.envelope",
        "keys": "tenancy.keyring",
        "quota": "tenancy.quota",
        "cancellation": "tenancy.cancellation",
        "acl": "tenancy.acl",
        "job": "client.job",
        "transport": "broker.transport",
        "fetch": "broker.fetch",
        "queue_entries": "broker.entries",
        "scheduling": "broker.scheduling",
        "backlog": "broker.backlog",
        "keyspace": "backend.keyspace",
        "guard": "backend.claims",
        "audit": "backend.audit",
        "functions": "backend.functions",
        "runtime": "worker.runtime",
        "pipeline": "worker.pipeline",
        "tasks": "worker.tasks",
        "watchdog": "worker.watchdog",
        "batching": "worker.batching",
        "control": "worker.control",
        "consumer": "worker.batch.consumer",
        "supervisor": "worker.batch.supervisor",
        "task_events": "worker.batch.events",
        "monitor_tasks": "monitoring.tasks",
        "metrics": "monitoring.metrics",
        "exporter": "monitoring.exporter",
        "fleet": "monitoring.fleet",
        "autoscale": "monitoring.autoscale",
        "embedded": "local.embedded",
        "processes": "local.processes",
        "demo": "local.demo",
        "models.commands": "cli.models",
    }.items()
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: types.ModuleType) -> None:
        """The module is the new one, already executed."""


def forwarder(package: str, module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that finds its old names in ``module``.

    For a package that was a module before 0.2: ``maas_worker.client.log`` warns and
    returns ``maas_worker.client.client.log``. Lazy (``module`` is imported on the first
    old name asked for), and a submodule's name is left to the import system.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
            raise AttributeError(name)
        target = importlib.import_module(module)
        if not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(
            f"{package}.{name} moved to {module}.{name}; the old path will be removed in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(target, name)

    return __getattr__


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
