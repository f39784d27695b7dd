"""Build, sign and release ``digits-he``: the bundled digits model that runs on ciphertexts.

A multinomial logistic regression on scikit-learn's bundled 8x8 digits (the same
held-out split as ``digits``: tests/data/digits_holdout.json), exported as a plain
ONNX graph ``logits = x @ W + b`` (the 1/16 pixel scale folded into W), then
``probabilities = softmax(logits)`` and ``label = argmax``. Its signed manifest says
``"private": "ckks-affine"`` and ``"private_output": "logits"``: a worker may evaluate
the logits on a CKKS ciphertext (docs/private-inference.md), and the client applies
softmax and argmax after decrypting. The held-out accuracy is measured both ways,
in the clear through ONNX Runtime exactly as a worker loads the model, and privately
through the same encryption, evaluation and decryption code a job uses, and both go
into the manifest's metadata.

    maas_worker/models/bundled/digits-he/<version>/  model.onnx, manifest.json, manifest.sig
    maas_worker/models/bundled/digits-he/release.json
    maas_worker/models/trusted_signers/maas-worker-private-models.pub

The private key stays outside the repository (default
~/.config/maas-worker/signing/maas-worker-private-models.key, created mode 0600 if
missing). Needs the ``train`` and ``private`` extras:

    .venv/bin/pip install -e '.[train,private]'
    .venv/bin/python scripts/build_digits_he_model.py [--key PATH] [--version 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maas_worker.errors import ModelRejected  # noqa: E402
from maas_worker.models.artifact_crypto import ModelKeys  # noqa: E402
from maas_worker.models.publish import sign_version  # noqa: E402
from maas_worker.models.release import read_release, write_release  # noqa: E402
from maas_worker.models.repository import ModelRepository, load_verified, verify_manifest  # noqa: E402
from maas_worker.models.signing import SigningKey, TrustedSigners  # noqa: E402
from maas_worker.private import params  # noqa: E402
from maas_worker.private.ckks import SecretContext, softmax  # noqa: E402
from maas_worker.private.evaluate import PrivateModel, affine_of, private_spec  # noqa: E402

PACKAGE = ROOT / "maas_worker" / "models"
BUNDLED = PACKAGE / "bundled"
SIGNERS_DIR = PACKAGE / "trusted_signers"
NAME = "digits-he"
KEY_NAME = "maas-worker-private-models"
DEFAULT_KEY = Path.home() / ".config" / "maas-worker" / "signing" / f"{KEY_NAME}.key"
DEFAULT_VERSION = "1"
SEED = 0
TEST_SIZE = 0.25
#: Below this clean held-out accuracy nothing is written.
MIN_ACCURACY = 0.95
TARGET_OPSET = 17


def graph(weights: Any, bias: Any) -> bytes:
    """The ONNX graph: logits = x @ weights + bias; softmax; argmax."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    b = numpy_helper.from_array(bias.astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["float_input", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    g = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10]),
        ],
        [w, b],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", TARGET_OPSET)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def private_accuracy(model: Any, rows: list[list[int]], labels: list[int]) -> tuple[float, float]:
    """(accuracy, largest |logit error|) of the private path on ``rows``: encrypt with a
    fresh key, evaluate with its public context only, decrypt, argmax."""
    from maas_worker.private.ckks import load_public

    key = SecretContext.generate()
    spec = private_spec(model)
    assert spec is not None
    layer = affine_of(model.predict, *spec)
    runner = PrivateModel(
        model.name, model.version, layer, load_public(key.public_bytes, key.digest)
    )
    plain = model.predict({"inputs": rows})["logits"]
    right, worst = 0, 0.0
    for row, label, want in zip(rows, labels, plain, strict=True):
        out = runner.predict(key.encrypt([float(v) for v in row]))[params.FIELD]
        logits = key.decrypt(out["vector"], out["size"])
        probs = softmax(logits)
        right += int(max(range(10), key=probs.__getitem__) == label)
        worst = max(worst, *(abs(a - b) for a, b in zip(logits, want, strict=True)))
    return right / len(rows), worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY)
    parser.add_argument("--version", default=DEFAULT_VERSION)
    args = parser.parse_args()

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_train / 16.0, y_train)
    weights = (clf.coef_.T / 16.0).astype(np.float64)  # pixels are 0..16
    bias = clf.intercept_.astype(np.float64)
    sk_acc = float((clf.predict(x_test / 16.0) == y_test).mean())
    print(f"held-out accuracy (scikit-learn): {sk_acc:.4f}")
    if sk_acc < MIN_ACCURACY:
        print(f"below {MIN_ACCURACY}: nothing written", file=sys.stderr)
        return 1

    if args.key.exists():
        key = SigningKey.load(args.key)
    else:
        key = SigningKey.generate()
        key.save(args.key)
        print(f"generated a new signing key {key.key_id} at {args.key} (keep it private)")
    SIGNERS_DIR.mkdir(exist_ok=True)
    (SIGNERS_DIR / f"{KEY_NAME}.pub").write_text(key.public_pem())
    signers = TrustedSigners.from_paths([SIGNERS_DIR])
    try:
        previous = read_release(BUNDLED / NAME, signers)
    except ModelRejected:
        previous = None

    rows = x_test.astype(int).tolist()
    labels = y_test.tolist()
    target = BUNDLED / NAME / args.version
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=BUNDLED) as tmp:
        stage = Path(tmp) / NAME / args.version
        stage.mkdir(parents=True)
        (stage / "model.onnx").write_bytes(graph(weights, bias))
        base: dict[str, str | int | float] = {
            "dataset": "scikit-learn digits (8x8, 1797 images)",
            "classifier": "LogisticRegression(C=1) on pixels / 16; logits = x @ W + b",
            "held_out_samples": len(labels),
            params.MANIFEST_PRIVATE: params.PRIVATE_AFFINE,
            params.MANIFEST_PRIVATE_OUTPUT: "logits",
        }
        keys = {"label": "labels", "probabilities": "probabilities", "logits": "logits"}
        manifest = sign_version(stage, key, output_keys=keys, metadata=base)
        model = load_verified(stage, verify_manifest(stage, signers), ModelKeys)
        plain = float((np.array(model.predict({"inputs": rows})["labels"]) == y_test).mean())
        print(f"held-out accuracy (ONNX Runtime, as a worker loads it): {plain:.4f}")
        started = time.perf_counter()
        private, error = private_accuracy(model, rows, labels)
        took = time.perf_counter() - started
        print(
            f"held-out accuracy (CKKS, N={params.DEFAULT_POLY_MODULUS_DEGREE}): {private:.4f}; "
            f"largest logit error {error:.2e}; {took / len(rows) * 1000:.0f} ms a row"
        )
        # Signed again with the measured figures (the artifact is unchanged).
        metadata = {
            **base,
            "held_out_accuracy": round(plain, 4),
            "held_out_accuracy_private": round(private, 4),
            "private_max_logit_error": float(f"{error:.1e}"),
        }
        manifest = sign_version(stage, key, output_keys=keys, metadata=metadata)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(target)
    rel = write_release(
        BUNDLED / NAME, key, manifest, previous.serial + 1 if previous is not None else 1
    )
    print(f"released {rel.ref} (serial {rel.serial}, signer {rel.signer})")
    repo = ModelRepository(BUNDLED, signers=lambda: (signers, False), model_keys=ModelKeys)
    served = repo.get(NAME, None)
    if served is None or served.version != args.version:
        raise SystemExit(f"{NAME} does not resolve to {NAME}@{args.version}")
    return 0 if private == plain else 1


if __name__ == "__main__":
    sys.exit(main())
