"""Where the package keeps the models it ships: the default repository and its signers."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The signed models that ship inside the package (the ``digits`` classifier).
BUNDLED_MODEL_DIR = _HERE / "bundled"
#: The public key(s) the bundled models are signed with.
BUNDLED_SIGNERS_DIR = _HERE / "trusted_signers"


def bundled_refs() -> set[str]:
    """The references the shipped models are served under: ``name@version``, and the bare
    ``name`` of those with a release pointer (read from the folder; nothing is verified)."""
    refs: set[str] = set()
    for model in BUNDLED_MODEL_DIR.iterdir() if BUNDLED_MODEL_DIR.is_dir() else ():
        if not model.is_dir():
            continue
        refs.update(f"{model.name}@{v.name}" for v in model.iterdir() if v.is_dir())
        if (model / "release.json").is_file():
            refs.add(model.name)
    return refs
