"""Dynamic batching: many jobs, one model call, each result sealed on its own.

Like Triton's dynamic batcher. A worker started with the threads pool
(``maas-worker worker --pool threads --concurrency 32``) runs many jobs at
once in one process; for a model listed in ``MAAS_BATCH`` (``digits=32:5``:
up to 32 jobs, waiting at most 5 ms for more), each job's thread hands its
input to the model's `DynamicBatcher` and waits. One batcher thread gathers
what has arrived (until the batch is full or the wait is over), makes a single
`predict_batch` call, and hands each job its own output. Everything else stays
per job: each envelope is verified, claimed, decrypted, policy-checked, its
result sealed and stored write-once and its message acknowledged by its own
task, exactly as without batching.

ONNX Runtime releases the GIL while it computes, so the job threads keep
verifying and sealing while a batch runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from maas_worker.errors import ModelError

log = logging.getLogger(__name__)


class BatchModel(Protocol):
    """A model that can run several jobs' inputs in one call."""

    name: str
    version: str

    def predict_batch(self, batch: list[Any]) -> list[dict[str, Any] | ModelError]:
        """One output (or error) per input, in order."""
        ...


@dataclass
class _Pending:
    inputs: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | BaseException | None = None


class DynamicBatcher:
    """Gathers concurrent calls to one model into batches of at most ``max_batch``."""

    def __init__(self, model: BatchModel, *, max_batch: int, max_wait_s: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0
        self.jobs = 0
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._loop, daemon=True, name=f"maas-batch-{model.name}"
        )
        self._thread.start()

    def predict(self, inputs: Any, *, timeout_s: float) -> dict[str, Any]:
        """Run ``inputs`` in the next batch; `ModelError` (``timeout``) if it takes too long."""
        pending = _Pending(inputs)
        self._queue.put(pending)
        if not pending.done.wait(timeout_s):
            raise ModelError(f"the job exceeded its time limit ({timeout_s:g} s)", reason="timeout")
        if isinstance(pending.result, BaseException):
            raise pending.result
        assert pending.result is not None
        return pending.result

    def _gather(self) -> list[_Pending]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            try:
                outputs: list[dict[str, Any] | ModelError] = self.model.predict_batch(
                    [p.inputs for p in batch]
                )
            except Exception as exc:
                # Never echo the exception text: it may quote an input.
                log.error(
                    "batch of %d for %s raised %s", len(batch), self.model.name, type(exc).__name__
                )
                outputs = [ModelError("the model failed", reason="internal_error")] * len(batch)
            self.batches += 1
            self.jobs += len(batch)
            log.debug("batch of %d for %s", len(batch), self.model.name)
            for pending, output in zip(batch, outputs, strict=True):
                pending.result = output
                pending.done.set()
