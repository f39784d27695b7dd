"""The shipped `digits` model: released, signed by the bundled key, small, and robust to noise.

Everything goes through the path a worker takes (`build_registry` with the
default settings: the bundled repository, trusted through the bundled public
key; the bare name resolved through the signed release), so what is checked
is what a user's job gets.
"""

from __future__ import annotations

import pytest

from maas_worker.models.onnx_runner import OnnxModel
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.models.release import read_release
from maas_worker.models.signing import TrustedSigners
from maas_worker.settings import Settings
from maas_worker.worker.runtime import build_registry
from tests.modelkit import (
    BUNDLED_DIGITS,
    BUNDLED_DIGITS_VERSION,
    DIGITS_NOISE,
    DIGITS_NOISE_SEED,
    DigitsNoise,
    holdout,
    with_noise,
)

SAMPLES = holdout()
#: digits@1 (StandardScaler + MLP) and the key that signed it, both gone with #15.
OLD_SERIAL = 1
OLD_SIGNER = "14e4784c3d697ba62a57177d09d83fcb"
#: The ONNX file stays a small part of the package (it is about 21 KB).
MAX_MODEL_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def digits() -> OnnxModel:
    model = build_registry(Settings.from_env({})).resolve("digits")
    assert isinstance(model, OnnxModel)
    return model


def accuracy(model: OnnxModel, noise: DigitsNoise) -> float:
    rows = with_noise(SAMPLES["inputs"], noise, DIGITS_NOISE_SEED)
    labels = model.predict({"inputs": rows})["labels"]
    return sum(a == b for a, b in zip(labels, SAMPLES["labels"], strict=True)) / len(labels)


@pytest.mark.parametrize("noise", DIGITS_NOISE, ids=[n.slug for n in DIGITS_NOISE])
def test_shipped_digits_keeps_its_accuracy_under_pixel_noise(
    digits: OnnxModel, noise: DigitsNoise
) -> None:
    acc = accuracy(digits, noise)
    assert acc >= noise.min_accuracy, f"{noise.name}: {acc:.4f} < {noise.min_accuracy}"
    # ...and the figure its signed manifest states is the one measured here.
    key = "held_out_accuracy" if noise.fraction == 0 else f"held_out_accuracy_{noise.slug}"
    assert digits.manifest.metadata[key] == round(acc, 4)


def test_noise_is_seeded_clipped_and_moves_the_stated_share_of_pixels() -> None:
    rows = SAMPLES["inputs"][:50]
    for noise in DIGITS_NOISE:
        a, b = with_noise(rows, noise, 7), with_noise(rows, noise, 7)
        assert a == b  # the same seed, the same noise
        assert (a != with_noise(rows, noise, 8)) == (noise.fraction > 0)
        for old, new in zip(rows, a, strict=True):
            moved = [abs(x - y) for x, y in zip(old, new, strict=True) if x != y]
            assert len(moved) <= round(noise.fraction * 64)  # fewer where clipped at 0 or 16
            assert all(1 <= m <= noise.max_step for m in moved)
            assert all(0 <= v <= 16 for v in new)


def test_bare_name_resolves_to_the_new_release_signed_by_the_one_bundled_key(
    digits: OnnxModel,
) -> None:
    signers = TrustedSigners.from_paths([BUNDLED_SIGNERS_DIR / "maas-worker-models.pub"])
    (signer,) = signers.keys
    # The old owner's key is not trusted any more; the folder holds the digits owner's
    # key and the key of digits-he (scripts/build_digits_he_model.py), nothing else.
    bundled = TrustedSigners.from_paths([BUNDLED_SIGNERS_DIR])
    assert OLD_SIGNER not in bundled.keys
    assert signer in bundled.keys and len(bundled.keys) == 2
    release = read_release(BUNDLED_MODEL_DIR / "digits", signers)
    assert (release.version, release.signer) == (BUNDLED_DIGITS_VERSION, signer)
    assert release.serial > OLD_SERIAL  # above what workers saw for digits@1: no rollback refusal
    assert digits.version == BUNDLED_DIGITS_VERSION and digits.manifest.signer == signer
    # Only the released version ships (digits@1 went with the key that signed it).
    versions = [p.name for p in (BUNDLED_MODEL_DIR / "digits").iterdir() if p.is_dir()]
    assert versions == [BUNDLED_DIGITS_VERSION]


def test_shipped_model_is_small_and_keeps_the_input_output_contract(digits: OnnxModel) -> None:
    assert BUNDLED_DIGITS.stat().st_size <= MAX_MODEL_BYTES
    out = digits.predict({"inputs": SAMPLES["inputs"][:3]})
    assert set(out) == {"labels", "probabilities"}
    assert out["labels"] == SAMPLES["sklearn_predictions"][:3]
    assert all(len(p) == 10 and abs(sum(p) - 1) < 1e-3 for p in out["probabilities"])
