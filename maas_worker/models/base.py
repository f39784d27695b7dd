"""The model interface and the registry a worker resolves model references with."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any, Protocol, runtime_checkable

from maas_worker.errors import ModelError

MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,31}")


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name`` or ``name@version``; ValueError with one line if invalid."""
    name, _, version = ref.partition("@")
    if not MODEL_NAME_RE.fullmatch(name) or (version and not VERSION_RE.fullmatch(version)):
        raise ValueError(f"invalid model reference {ref!r}: use name or name@version")
    return name, version or None


def version_key(version: str) -> tuple[tuple[int, Any], ...]:
    """Sort key for versions: "10" sorts after "9" (numeric parts compare as numbers)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


_version_key = version_key


@runtime_checkable
class Model(Protocol):
    """What a worker runs. Implementations must be safe to call repeatedly.

    ``predict`` receives the decrypted JSON input and returns a JSON-ready
    dict. It raises `ModelError` for input it cannot handle; the message must
    describe the problem without echoing the input.
    """

    name: str
    version: str

    def predict(self, inputs: Any) -> dict[str, Any]:
        """Run the model on one job's input."""
        ...


class ModelSource(Protocol):
    """Models that come from outside the code, e.g. the signed-model repository."""

    def refs(self) -> list[str]:
        """Every servable ``name`` and ``name@version``; cheap (loads nothing)."""
        ...

    def get(
        self, name: str, version: str | None, *, signers: Collection[str] | None = None
    ) -> Model | None:
        """The model, or None if unknown (or not signed by one of ``signers``).

        Raises `ModelRejected` if it exists but fails verification.
        """
        ...


class ModelRegistry:
    """Models by name and version; ``name`` alone means the newest version.

    Registered models (the built-in diagnostics) come first, then each source
    in order. ``signers`` restricts source models to those signed by one of
    the given key ids; built-in models are code, not artifacts, and are
    governed by the tenant's ``allowed_models`` only.
    """

    def __init__(self, models: Iterable[Model] = (), sources: Iterable[ModelSource] = ()) -> None:
        self._models: dict[str, dict[str, Model]] = {}
        self._sources = list(sources)
        for m in models:
            self.register(m)

    def add_source(self, source: ModelSource) -> None:
        """Resolve names this registry does not hold in ``source`` too."""
        self._sources.append(source)

    def register(self, model: Model) -> None:
        """Add (or replace) one model version."""
        parse_model_ref(f"{model.name}@{model.version}")
        self._models.setdefault(model.name, {})[model.version] = model

    def resolve(self, ref: str, *, signers: Collection[str] | None = None) -> Model:
        """The model for ``name`` or ``name@version``; `ModelError("unknown model")`.

        Raises `ModelRejected` (a `ModelError`) for a model that exists but
        fails verification.
        """
        try:
            name, version = parse_model_ref(ref)
        except ValueError:
            raise ModelError("unknown model", reason="unknown_model") from None
        versions = self._models.get(name)
        if not versions:
            for source in self._sources:
                model = source.get(name, version, signers=signers)
                if model is not None:
                    return model
            raise ModelError("unknown model", reason="unknown_model")
        if version is None:
            return versions[max(versions, key=_version_key)]
        try:
            return versions[version]
        except KeyError:
            raise ModelError("unknown model version", reason="unknown_model") from None

    def refs(self) -> list[str]:
        """Every servable reference: each ``name`` and each ``name@version``."""
        out = []
        for name, versions in sorted(self._models.items()):
            out.append(name)
            out.extend(f"{name}@{v}" for v in sorted(versions, key=_version_key))
        for source in self._sources:
            out.extend(
                r for r in source.refs() if r.partition("@")[0] not in self._models and r not in out
            )
        return out
