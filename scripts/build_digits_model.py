"""Build, sign and release the bundled `digits` model (training needs the `train` extra).

Trains a small neural network on scikit-learn's bundled 8x8 digits (1,797
images; nothing is downloaded) with pixels scaled by 1/16 and noisy copies of
the training rows, picks the candidate that best withstands pixel noise,
refuses to write it unless it reaches every threshold of ``DIGITS_NOISE``
(tests/modelkit.py: held-out accuracy >= 0.95 clean, >= 0.93 with 10% of the
pixels moved by +-1, >= 0.85 with 30% moved by +-1..2), exports it to ONNX
with skl2onnx, signs it with the model owner's Ed25519 key, writes the signed
version into the package and releases it (the signed pointer that makes the
bare name ``digits`` mean it). Fixed seeds: the same ``model.onnx`` every run.

    maas_worker/models/bundled/digits/<version>/   model.onnx, manifest.json, manifest.sig
    maas_worker/models/bundled/digits/release.json the release (serial = previous + 1)
    maas_worker/models/trusted_signers/maas-worker-models.pub   (public key only)
    tests/data/digits_holdout.json                 held-out samples for the tests

The PRIVATE key stays outside the repository (default
~/.config/maas-worker/signing/maas-worker-models.key, mode 0600); if it does
not exist a new one is generated and the bundled public key replaced, and the
bundled versions the new key did not sign are removed (no worker would trust
them). The release's serial continues from the previous release (read under
the previous public key) so workers that saw it accept the new one.

``--resign-only`` trains nothing and needs no extra: it checks the shipped
version under the bundled public key as it is now (every byte, as a worker
loads it), re-signs that same manifest with the owner key if another key
signed it (the artifact is unchanged; only ``manifest.json``/``manifest.sig``
change), replaces the bundled public key and signs a new release (serial + 1).
The maintainer who holds the key uses it to sign a fresh release of the
shipped version; a new owner, to take over when the previous private key is
lost.

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python scripts/build_digits_model.py [--key PATH] [--version 2]
    .venv/bin/python scripts/build_digits_model.py --resign-only [--key PATH] [--version 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from maas_worker.errors import ModelRejected
from maas_worker.models.artifact_crypto import ModelKeys
from maas_worker.models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from maas_worker.models.publish import sign_version
from maas_worker.models.release import Release, read_release, write_release
from maas_worker.models.repository import ModelRepository, load_verified, verify_manifest
from maas_worker.models.signing import SigningKey, TrustedSigners

ROOT = Path(__file__).resolve().parent.parent
# The noise settings and thresholds are the tests' (tests/modelkit.py): one definition.
sys.path.insert(0, str(ROOT))
PACKAGE = ROOT / "maas_worker" / "models"
BUNDLED = PACKAGE / "bundled"
SIGNERS_DIR = PACKAGE / "trusted_signers"
KEY_NAME = "maas-worker-models"
DEFAULT_KEY = Path.home() / ".config" / "maas-worker" / "signing" / f"{KEY_NAME}.key"
SEED = 0
TEST_SIZE = 0.25
#: Noisy copies of each training row added to the training set (see DIGITS_NOISE).
NOISY_COPIES = 3
DEFAULT_VERSION = "2"
#: ONNX opset: old enough for any onnxruntime >= 1.17.
TARGET_OPSET = 17


def owner_key(path: Path) -> SigningKey:
    """The owner's private key at ``path``, generated (mode 0600) if there is none."""
    if path.exists():
        return SigningKey.load(path)
    key = SigningKey.generate()
    key.save(path)
    print(f"generated a new signing key {key.key_id} at {path} (keep it private)")
    return key


def current_release(signers: TrustedSigners) -> Release | None:
    """The shipped release of digits, if one verifies under ``signers``."""
    try:
        return read_release(BUNDLED / "digits", signers)
    except ModelRejected:
        return None


def release(key: SigningKey, manifest: Manifest, previous: Release | None) -> Release:
    """Sign ``digits/release.json`` naming ``manifest``'s version (serial = previous + 1)."""
    rel = write_release(
        BUNDLED / "digits", key, manifest, previous.serial + 1 if previous is not None else 1
    )
    print(f"released {rel.ref} (serial {rel.serial}, signer {rel.signer})")
    return rel


def check_served(key: SigningKey, version: str) -> None:
    """Resolve the bare name as a worker does, trusting only the new public key."""
    signers = TrustedSigners.from_paths([SIGNERS_DIR])
    # The folder also holds the key of digits-he (scripts/build_digits_he_model.py).
    if key.key_id not in signers.keys:
        raise SystemExit(f"{SIGNERS_DIR} does not hold {key.key_id}")
    repo = ModelRepository(BUNDLED, signers=lambda: (signers, False), model_keys=ModelKeys)
    model = repo.get("digits", None)
    if model is None or model.version != version:
        raise SystemExit(f"digits does not resolve to digits@{version}")


def resign(key_path: Path, version: str) -> int:
    """Re-sign the shipped version, unchanged, with the owner key; release it."""
    target = BUNDLED / "digits" / version
    old_signers = TrustedSigners.from_paths([SIGNERS_DIR])
    try:
        manifest = verify_manifest(target, old_signers)
        load_verified(target, manifest, ModelKeys)  # every byte as the old owner signed it
    except ModelRejected as exc:
        print(
            f"digits@{version} does not verify under the bundled public key ({exc}); "
            "refusing to re-sign what nobody signed",
            file=sys.stderr,
        )
        return 1
    previous = current_release(old_signers)
    key = owner_key(key_path)
    if manifest.signer != key.key_id:
        new = dataclasses.replace(manifest, signer=key.key_id)
        # Stage the re-signed version beside the live one (a dot-directory, never
        # taken for a model), check it with the new key, then swap it in.
        with tempfile.TemporaryDirectory(prefix=".resign-", dir=BUNDLED) as tmp:
            stage = Path(tmp) / "digits" / version
            shutil.copytree(target, stage)
            data = new.to_bytes()
            (stage / MANIFEST_FILE).write_bytes(data)
            (stage / SIGNATURE_FILE).write_bytes(key.sign(data))
            mine = TrustedSigners({key.key_id: key.key.public_key()})
            load_verified(stage, verify_manifest(stage, mine), ModelKeys)
            old = Path(tmp) / "old"
            target.rename(old)
            stage.rename(target)
        manifest = new
        print(f"re-signed digits@{version} with {key.key_id} (model.onnx unchanged)")
    (SIGNERS_DIR / f"{KEY_NAME}.pub").write_text(key.public_pem())
    for other in SIGNERS_DIR.iterdir():
        if other.name != f"{KEY_NAME}.pub" and other.suffix in (".pub", ".pem"):
            print(f"note: {other} is trusted too")
    release(key, manifest, previous)
    check_served(key, version)
    return 0


def _accuracies(predict: Any, rows: Any, labels: Any) -> list[float]:
    """Accuracy of ``predict`` on ``rows``, clean and under each of DIGITS_NOISE (seeded)."""
    import numpy as np

    from tests.modelkit import DIGITS_NOISE, DIGITS_NOISE_SEED, with_noise

    out = []
    for noise in DIGITS_NOISE:
        x = with_noise(rows.astype(int).tolist(), noise, DIGITS_NOISE_SEED)
        out.append(float((np.asarray(predict(x)) == labels).mean()))
    return out


def _candidates() -> dict[str, Any]:
    """The classifiers tried, each on pixels / 16 (the fixed pixel range, not fitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    return {
        "LogisticRegression(C=1)": LogisticRegression(C=1.0, max_iter=2000),
        "MLPClassifier(64, alpha=1e-4)": MLPClassifier(
            hidden_layer_sizes=(64,), alpha=1e-4, max_iter=1000, random_state=SEED
        ),
        "MLPClassifier(64, alpha=1e-2)": MLPClassifier(
            hidden_layer_sizes=(64,), alpha=1e-2, max_iter=1000, random_state=SEED
        ),
    }


def _augment(x: Any, y: Any) -> tuple[Any, Any]:
    """The training rows plus NOISY_COPIES copies under the strongest noise (fixed seeds)."""
    import numpy as np

    from tests.modelkit import DIGITS_NOISE, with_noise

    rows = x.astype(int).tolist()
    xs = [x] + [np.array(with_noise(rows, DIGITS_NOISE[-1], 1000 + i)) for i in range(NOISY_COPIES)]
    return np.vstack(xs).astype(float), np.concatenate([y] * (NOISY_COPIES + 1))


def train(key_path: Path, version: str) -> int:
    """Train, pick by a noise test, export, sign, check and release digits@version.

    Pixels are scaled by 1/16 (their fixed range), not by a StandardScaler:
    standardising near-constant pixels (the borders) turns a change of 1 into
    many standard deviations, which is what made the first model brittle.
    Each candidate is trained on the training rows plus noisy copies of them,
    scored on a validation split (clean and under each noise of DIGITS_NOISE)
    and the one whose worst score is highest is refitted on all training rows;
    it must reach every threshold of DIGITS_NOISE on the held-out rows, or
    nothing is written.
    """
    import numpy as np
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import clone
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    from tests.modelkit import DIGITS_NOISE

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_train, y_train, test_size=TEST_SIZE, random_state=SEED, stratify=y_train
    )
    # Fitted on the pixel range itself, so every pixel is divided by 16.
    scale = MinMaxScaler().fit(np.array([[0.0] * 64, [16.0] * 64]))
    scores: dict[str, list[float]] = {}
    x_aug, y_aug = _augment(x_fit, y_fit)
    for name, est in _candidates().items():
        fitted = clone(est).fit(scale.transform(x_aug), y_aug)
        scores[name] = _accuracies(lambda r, f=fitted: f.predict(scale.transform(r)), x_val, y_val)
        print(f"validation {name}: " + ", ".join(f"{a:.4f}" for a in scores[name]))
    best = max(scores, key=lambda n: min(scores[n]))
    x_aug, y_aug = _augment(x_train, y_train)
    clf = Pipeline(
        [
            ("scale", scale),
            ("classify", clone(_candidates()[best]).fit(scale.transform(x_aug), y_aug)),
        ]
    )
    sk_pred = clf.predict(x_test)
    accs = _accuracies(clf.predict, x_test, y_test)
    accuracy = accs[0]
    for noise, acc in zip(DIGITS_NOISE, accs, strict=True):
        print(f"held-out, {noise.name}: {acc:.4f} (threshold {noise.min_accuracy})")
    if any(acc < noise.min_accuracy for noise, acc in zip(DIGITS_NOISE, accs, strict=True)):
        print(f"{best} is below a threshold: nothing written", file=sys.stderr)
        return 1
    onx = to_onnx(
        clf,
        initial_types=[("float_input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=TARGET_OPSET,
    )

    previous = (
        current_release(TrustedSigners.from_paths([SIGNERS_DIR])) if SIGNERS_DIR.is_dir() else None
    )
    key = owner_key(key_path)
    SIGNERS_DIR.mkdir(exist_ok=True)
    (SIGNERS_DIR / f"{KEY_NAME}.pub").write_text(key.public_pem())

    target = BUNDLED / "digits" / version
    BUNDLED.mkdir(exist_ok=True)
    # A dot-directory: never mistaken for a model by a worker scanning meanwhile.
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=BUNDLED) as tmp:
        stage = Path(tmp) / "digits" / version
        stage.mkdir(parents=True)
        (stage / "model.onnx").write_bytes(onx.SerializeToString())
        metadata: dict[str, str | int | float] = {
            "dataset": "scikit-learn digits (8x8, 1797 images)",
            "classifier": f"pixels / 16 + {best}, trained with {NOISY_COPIES} noisy copies",
            "held_out_samples": len(y_test),
            "held_out_accuracy": round(accuracy, 4),
        }
        for noise, acc in zip(DIGITS_NOISE[1:], accs[1:], strict=True):
            metadata[f"held_out_accuracy_{noise.slug}"] = round(acc, 4)
        manifest = sign_version(
            stage,
            key,
            output_keys={"label": "labels", "probabilities": "probabilities"},
            metadata=metadata,
        )
        # Check it the way a worker will, before it replaces anything.
        signers = TrustedSigners.from_paths([SIGNERS_DIR])
        model = load_verified(stage, verify_manifest(stage, signers), ModelKeys)
        ort_pred = model.predict({"inputs": x_test.tolist()})["labels"]
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(target)
    release(key, manifest, previous)
    drop_untrusted_versions(signers)
    check_served(key, version)

    agree = float((np.array(ort_pred) == sk_pred).mean())
    ort_acc = float((np.array(ort_pred) == y_test).mean())
    holdout = ROOT / "tests" / "data" / "digits_holdout.json"
    holdout.parent.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "note": "held-out split of sklearn's digits (test_size=0.25, random_state=0, "
        "stratified); written by scripts/build_digits_model.py",
        "inputs": x_test.astype(int).tolist(),
        "labels": y_test.tolist(),
        "sklearn_predictions": sk_pred.tolist(),
    }
    holdout.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(
        f"digits@{manifest.version}: signer {key.key_id}, {manifest.files['model.onnx'].size} bytes"
    )
    print(
        f"held-out accuracy: scikit-learn {accuracy:.4f}, ONNX Runtime {ort_acc:.4f} "
        f"({len(y_test)} samples; agreement {agree:.4f})"
    )
    return 0 if agree == 1.0 else 1


def drop_untrusted_versions(signers: TrustedSigners) -> None:
    """Remove the bundled versions of digits that the bundled key does not sign.

    After a new owner key replaced the old one they could never be served
    (and every worker would audit them as signed by an untrusted key).
    """
    for path in sorted((BUNDLED / "digits").iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            verify_manifest(path, signers)
        except ModelRejected as exc:
            shutil.rmtree(path)
            print(f"removed digits@{path.name} ({exc})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", type=Path, default=DEFAULT_KEY, help="private signing key")
    p.add_argument("--version", default=DEFAULT_VERSION)
    p.add_argument(
        "--resign-only",
        action="store_true",
        help="re-sign the shipped version with --key and release it; no training",
    )
    args = p.parse_args()
    if args.resign_only:
        return resign(args.key, args.version)
    return train(args.key, args.version)


if __name__ == "__main__":
    sys.exit(main())
