"""The worker's side of private inference: a signed model's affine layer on ciphertexts.

A model whose signed manifest says ``"private": "ckks-affine"`` declares that its
output ``private_output`` (``logits``) is an affine function of its input. The worker
reads that layer from the verified model itself (`affine_of`: the model run on the
zero vector and the unit vectors, then checked on a probe), so the weights come
from the signed artifact through the usual load path and nowhere else. A job's
ciphertext is then multiplied by the weights and the bias added (`PrivateModel`),
with only the tenant's public context: the worker never holds the input, the output
or the secret key.
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maas_worker.errors import ModelError, ModelRejected
from maas_worker.private import params
from maas_worker.private.ckks import tenseal

#: How far the model may be from the affine layer read from it (on the probe).
AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Affine:
    """``y = x @ weights + bias``: ``weights`` has one row per input value."""

    weights: list[list[float]]
    bias: list[float]

    @property
    def inputs(self) -> int:
        """How many values an input vector has."""
        return len(self.weights)

    def apply(self, x: list[float]) -> list[float]:
        """The layer in the clear (to check it against the model)."""
        return [
            self.bias[j] + sum(x[i] * row[j] for i, row in enumerate(self.weights))
            for j in range(len(self.bias))
        ]


def private_spec(model: Any) -> tuple[str, str, int] | None:
    """(input key, output key, input width) of a model that declares private evaluation.

    None for a model without a manifest, or whose manifest does not say
    ``"private": "ckks-affine"`` with an output and a fixed input width.
    """
    manifest = getattr(model, "manifest", None)
    if manifest is None or manifest.metadata.get(params.MANIFEST_PRIVATE) != (
        params.PRIVATE_AFFINE
    ):
        return None
    output = manifest.metadata.get(params.MANIFEST_PRIVATE_OUTPUT)
    shape = manifest.input.shape
    keys = {o.key for o in manifest.outputs}
    if output not in keys or len(shape) != 2 or not isinstance(shape[1], int):
        return None
    return manifest.input.key, str(output), shape[1]


def affine_of(
    predict: Callable[[Any], dict[str, Any]], in_key: str, out_key: str, width: int
) -> Affine:
    """The affine layer of a model: its output on 0 and on each unit vector, then checked.

    `ModelRejected` if the output is not affine (the manifest's claim is false).
    """
    rows = [[0.0] * width] + [[1.0 if i == j else 0.0 for i in range(width)] for j in range(width)]
    out = predict({in_key: rows})[out_key]
    bias = [float(v) for v in out[0]]
    weights = [[float(v) - b for v, b in zip(out[1 + i], bias, strict=True)] for i in range(width)]
    layer = Affine(weights, bias)
    # A fixed probe with every input non-zero: a non-affine graph (an activation, a
    # product of inputs) is far from the layer there.
    probe = [float((7 * i) % 17) for i in range(width)]
    got = predict({in_key: [probe]})[out_key][0]
    want = layer.apply(probe)
    scale = max(1.0, *(abs(v) for v in want))
    if any(
        not math.isfinite(g) or abs(g - w) > AFFINE_TOLERANCE * scale
        for g, w in zip(got, want, strict=True)
    ):
        raise ModelRejected("the model's private output is not affine in its input")
    return layer


class PrivateModel:
    """A model run on one job's ciphertext; implements `Model` (``predict``)."""

    def __init__(self, name: str, version: str, layer: Affine, context: Any) -> None:
        self.name = name
        self.version = version
        self._layer = layer
        self._context = context

    def predict(self, inputs: Any) -> dict[str, Any]:
        """``inputs`` is the base64 ciphertext; the result is ``{"ckks": {...}}``.

        `ModelError` (``bad_input``) for a ciphertext that does not parse under the
        tenant's context or does not have the model's width: that job fails alone.
        """
        ts = tenseal()
        try:
            raw = base64.b64decode(inputs, validate=True)
            vector = ts.ckks_vector_from(self._context, raw)
            if vector.size() != self._layer.inputs:
                raise ValueError("width")
            result = vector.matmul(self._layer.weights) + self._layer.bias
            out = result.serialize()
        except (binascii.Error, ValueError, TypeError, RuntimeError):
            raise ModelError(
                f"{self.name}@{self.version} takes one CKKS ciphertext of "
                f"{self._layer.inputs} values under the registered context",
                reason="bad_input",
            ) from None
        return {
            params.FIELD: {
                "vector": base64.b64encode(out).decode("ascii"),
                "size": len(self._layer.bias),
            }
        }


class PrivateCache:
    """Per worker process: loaded public contexts (bounded, least recently used out) and
    each model's affine layer. Thread-safe (the threads pool)."""

    def __init__(self, max_contexts: int) -> None:
        self._max = max_contexts
        self._contexts: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._layers: dict[int, tuple[Any, Affine]] = {}
        self._lock = threading.Lock()

    def context(self, tenant: str, digest: str, load: Callable[[], Any]) -> Any:
        """The context ``(tenant, digest)``, loaded with ``load`` the first time."""
        key = (tenant, digest)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
                return ctx
        ctx = load()  # outside the lock: tens of MB to parse
        with self._lock:
            self._contexts[key] = ctx
            self._contexts.move_to_end(key)
            while len(self._contexts) > self._max:
                self._contexts.popitem(last=False)
        return ctx

    def layer(self, model: Any, spec: tuple[str, str, int]) -> Affine:
        """The affine layer of ``model`` (read once per loaded model object)."""
        with self._lock:
            known = self._layers.get(id(model))
            if known is not None and known[0] is model:
                return known[1]
        layer = affine_of(model.predict, *spec)
        with self._lock:
            self._layers[id(model)] = (model, layer)
        return layer
