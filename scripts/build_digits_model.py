"""Build, sign and bundle the `digits` model (needs the `train` extra).

Trains a small neural network on scikit-learn's bundled 8x8 digits (1,797
images; nothing is downloaded), exports it to ONNX with skl2onnx, signs it with
the model owner's Ed25519 key and writes the signed version into the package:

    maas_worker/models/bundled/digits/<version>/   model.onnx, manifest.json, manifest.sig
    maas_worker/models/trusted_signers/maas-worker-models.pub   (public key only)
    tests/data/digits_holdout.json                 held-out samples for the tests

The PRIVATE key stays outside the repository (default
~/.config/maas-worker/signing/maas-worker-models.key, mode 0600); if it does
not exist a new one is generated and the bundled public key replaced.

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python scripts/build_digits_model.py [--key PATH] [--version 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from maas_worker.models.artifact_crypto import ModelKeys
from maas_worker.models.publish import sign_version
from maas_worker.models.repository import load_verified, verify_manifest
from maas_worker.models.signing import SigningKey, TrustedSigners

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "maas_worker" / "models"
KEY_NAME = "maas-worker-models"
DEFAULT_KEY = Path.home() / ".config" / "maas-worker" / "signing" / f"{KEY_NAME}.key"
SEED = 0
TEST_SIZE = 0.25
#: ONNX opset: old enough for any onnxruntime >= 1.17.
TARGET_OPSET = 17


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", type=Path, default=DEFAULT_KEY, help="private signing key")
    p.add_argument("--version", default="1")
    args = p.parse_args()

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y)
    clf = make_pipeline(StandardScaler(),
                        MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=SEED))
    clf.fit(x_train, y_train)
    sk_pred = clf.predict(x_test)
    accuracy = float((sk_pred == y_test).mean())
    onx = to_onnx(clf, initial_types=[("float_input", FloatTensorType([None, 64]))],
                  options={"zipmap": False}, target_opset=TARGET_OPSET)

    if args.key.exists():
        key = SigningKey.load(args.key)
    else:
        key = SigningKey.generate()
        key.save(args.key)
        print(f"generated a new signing key {key.key_id} at {args.key} (keep it private)")
    signers_dir = PACKAGE / "trusted_signers"
    signers_dir.mkdir(exist_ok=True)
    (signers_dir / f"{KEY_NAME}.pub").write_text(key.public_pem())

    target = PACKAGE / "bundled" / "digits" / args.version
    (PACKAGE / "bundled").mkdir(exist_ok=True)
    # A dot-directory: never mistaken for a model by a worker scanning meanwhile.
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=PACKAGE / "bundled") as tmp:
        stage = Path(tmp) / "digits" / args.version
        stage.mkdir(parents=True)
        (stage / "model.onnx").write_bytes(onx.SerializeToString())
        manifest = sign_version(
            stage, key, output_keys={"label": "labels", "probabilities": "probabilities"},
            metadata={"dataset": "scikit-learn digits (8x8, 1797 images)",
                      "classifier": "StandardScaler + MLPClassifier(64)",
                      "held_out_samples": len(y_test),
                      "held_out_accuracy": round(accuracy, 4)})
        # Check it the way a worker will, before it replaces anything.
        signers = TrustedSigners.from_paths([signers_dir])
        model = load_verified(stage, verify_manifest(stage, signers), ModelKeys)
        ort_pred = model.predict({"inputs": x_test.tolist()})["labels"]
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(target)

    agree = float((np.array(ort_pred) == sk_pred).mean())
    ort_acc = float((np.array(ort_pred) == y_test).mean())
    holdout = ROOT / "tests" / "data" / "digits_holdout.json"
    holdout.parent.mkdir(exist_ok=True)
    holdout.write_text(json.dumps({
        "note": "held-out split of sklearn's digits (test_size=0.25, random_state=0, "
                "stratified); written by scripts/build_digits_model.py",
        "inputs": x_test.astype(int).tolist(), "labels": y_test.tolist(),
        "sklearn_predictions": sk_pred.tolist()}, separators=(",", ":")) + "\n")
    print(f"digits@{manifest.version}: signer {key.key_id}, "
          f"{manifest.files['model.onnx'].size} bytes")
    print(f"held-out accuracy: scikit-learn {accuracy:.4f}, ONNX Runtime {ort_acc:.4f} "
          f"({len(y_test)} samples; agreement {agree:.4f})")
    return 0 if accuracy >= 0.95 and agree == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
