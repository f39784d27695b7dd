"""Where the package keeps the models it ships: the default repository and its signers."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The signed models that ship inside the package (the ``digits`` classifier).
BUNDLED_MODEL_DIR = _HERE / "bundled"
#: The public key(s) the bundled models are signed with.
BUNDLED_SIGNERS_DIR = _HERE / "trusted_signers"
