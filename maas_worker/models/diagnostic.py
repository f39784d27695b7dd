"""Diagnostic models, registered only with ``MAAS_DIAGNOSTIC_MODELS=1`` (and in the demo).

``echo`` returns its input; ``sleep`` waits ``{"seconds": s}`` (at most
`MAX_SLEEP_S`) and is how tests and operators exercise timing, crashes and load.
"""

from __future__ import annotations

import time
from typing import Any

from maas_worker.errors import ModelError
from maas_worker.models.base import ModelRegistry

MAX_SLEEP_S = 300.0


class EchoModel:
    """Returns its input unchanged."""

    name = "echo"
    version = "1"

    def predict(self, inputs: Any) -> dict[str, Any]:
        """Return ``{"echo": inputs}``."""
        return {"echo": inputs}


class SleepModel:
    """Sleeps for ``inputs["seconds"]`` seconds."""

    name = "sleep"
    version = "1"

    def predict(self, inputs: Any) -> dict[str, Any]:
        """Sleep, then return how long it slept."""
        seconds = inputs.get("seconds") if isinstance(inputs, dict) else None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds <= MAX_SLEEP_S
        ):
            raise ModelError(f'sleep needs {{"seconds": 0..{MAX_SLEEP_S:g}}}', reason="bad_input")
        start = time.monotonic()
        time.sleep(seconds)
        return {"slept": round(time.monotonic() - start, 3)}


def diagnostic_refs() -> list[str]:
    """References of the diagnostic models (cheap: loads nothing).

    What a client adds to the served catalogue when it enables them, so it can
    submit before any worker has started (a test, the demo).
    """
    return ModelRegistry([EchoModel(), SleepModel()]).refs()
