"""Running a verified ONNX model with ONNX Runtime.

One `OnnxModel` wraps one ``InferenceSession``, created once per model version
per worker process (by the repository, from verified bytes only) and reused for
every job. ONNX is a protobuf graph: nothing here unpickles. Each session runs
single-threaded, since a worker already runs one job per pool process and more
threads would only fight over the cores.

Inputs are checked against the manifest (numbers only, rank, fixed dimensions,
batch limit, finite values) before the model runs; a mismatch is a
`ModelError` with reason ``bad_input`` that describes the expected shape and
never quotes the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from maas_worker.errors import ModelError, ModelRejected
from maas_worker.models.manifest import InputSpec, Manifest

#: ONNX Runtime's tensor type names for the dtypes a manifest may declare.
ORT_TYPES = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
}
_KINDS = {"float32": "iuf", "float64": "iuf", "int32": "iu", "int64": "iu"}


def session_options() -> ort.SessionOptions:
    """Options for every session: one thread, sequential, quiet."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # The bytes are ONNX (protobuf); never guess another format from content.
    opts.add_session_config_entry("session.load_model_format", "ONNX")
    return opts


def create_session(model: bytes | str) -> ort.InferenceSession:
    """A CPU session from verified model bytes (or a path to an in-memory file).

    `ModelRejected` if ONNX Runtime cannot load it.
    """
    try:
        return ort.InferenceSession(
            model, sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception:
        raise ModelRejected("not a loadable ONNX model") from None


def _shape_text(spec: InputSpec) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"


def check_session(session: ort.InferenceSession, manifest: Manifest) -> None:
    """Refuse a model whose graph does not match what its manifest declares."""
    inputs = session.get_inputs()
    spec = manifest.input
    if (
        len(inputs) != 1
        or inputs[0].name != spec.name
        or inputs[0].type != ORT_TYPES[spec.dtype]
        or len(inputs[0].shape) != len(spec.shape)
    ):
        raise ModelRejected("the model's input does not match its manifest")
    for declared, actual in zip(spec.shape, inputs[0].shape, strict=True):
        if isinstance(actual, int) and declared != actual:
            raise ModelRejected("the model's input shape does not match its manifest")
    names = {o.name for o in session.get_outputs()}
    if not {o.name for o in manifest.outputs} <= names:
        raise ModelRejected("the model's outputs do not match its manifest")


class OnnxModel:
    """A verified model version with its loaded session; implements `Model`."""

    def __init__(self, manifest: Manifest, session: ort.InferenceSession) -> None:
        check_session(session, manifest)
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.signer = manifest.signer
        self._session = session
        self._output_names = [o.name for o in manifest.outputs]

    def __repr__(self) -> str:
        return f"OnnxModel({self.manifest.ref}, signer={self.signer})"

    def validate(self, inputs: Any) -> np.ndarray[Any, Any]:
        """The job's input as an array the model accepts, or `ModelError` (bad_input)."""
        spec = self.manifest.input
        expected = (
            f"{{{spec.key!r}: array of numbers with shape {_shape_text(spec)}"
            f", N <= {self.manifest.max_batch}}}"
        )
        if not isinstance(inputs, dict) or spec.key not in inputs:
            raise ModelError(f"{self.manifest.ref} takes {expected}", reason="bad_input")
        try:
            raw = np.array(inputs[spec.key])
        except (ValueError, TypeError, OverflowError):
            raise ModelError(
                f"{self.manifest.ref} takes {expected}: got a ragged array", reason="bad_input"
            ) from None
        if raw.dtype.kind not in _KINDS[spec.dtype]:
            raise ModelError(
                f"{self.manifest.ref} takes {expected}: got non-numbers", reason="bad_input"
            )
        got = "[" + ", ".join(str(d) for d in raw.shape) + "]"
        ok = raw.ndim == len(spec.shape) and all(
            d is None or d == n for d, n in zip(spec.shape, raw.shape, strict=True)
        )
        batch_ok = all(
            1 <= n <= self.manifest.max_batch
            for d, n in zip(spec.shape, raw.shape, strict=False)
            if d is None
        )
        if not (ok and batch_ok):
            raise ModelError(
                f"{self.manifest.ref} takes {expected}: got shape {got}", reason="bad_input"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            array = raw.astype(spec.dtype)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelError(f"{self.manifest.ref} takes finite numbers only", reason="bad_input")
        if array.dtype.kind != "f" and not np.array_equal(array, raw):
            raise ModelError(f"{self.manifest.ref} takes {spec.dtype} values", reason="bad_input")
        return array

    def predict(self, inputs: Any) -> dict[str, Any]:
        """Validate, run the session, return each output under its manifest key."""
        array = self.validate(inputs)
        outputs = self._session.run(self._output_names, {self.manifest.input.name: array})
        result: dict[str, Any] = {}
        for spec, raw in zip(self.manifest.outputs, outputs, strict=True):
            value = np.asarray(raw)
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ModelError("the model produced a non-finite value")
            result[spec.key] = value.tolist()
        return result

    def predict_batch(self, batch: list[Any]) -> list[dict[str, Any] | ModelError]:
        """Run several jobs' inputs in ONE session call (dynamic batching).

        Each input is validated on its own (a bad one fails only its job); the
        valid ones are stacked along the batch axis, run once, and the outputs
        split back by each job's row count. Same results as `predict` per job.
        """
        out: list[dict[str, Any] | ModelError] = []
        arrays: list[tuple[int, np.ndarray[Any, Any]]] = []
        for i, inputs in enumerate(batch):
            try:
                arrays.append((i, self.validate(inputs)))
                out.append({})
            except ModelError as exc:
                out.append(exc)
        if not arrays:
            return out
        stacked = np.concatenate([a for _, a in arrays], axis=0)
        outputs = self._session.run(self._output_names, {self.manifest.input.name: stacked})
        values = [np.asarray(raw) for raw in outputs]
        start = 0
        for i, array in arrays:
            rows = array.shape[0]
            result: dict[str, Any] = {}
            for spec, value in zip(self.manifest.outputs, values, strict=True):
                part = value[start : start + rows]
                if part.dtype.kind == "f" and not np.isfinite(part).all():
                    out[i] = ModelError("the model produced a non-finite value")
                    break
                result[spec.key] = part.tolist()
            else:
                out[i] = result
            start += rows
        return out
