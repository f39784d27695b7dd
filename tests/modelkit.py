"""Test helpers: a model repository signed with a throw-away key, built from the bundled digits.

No private key of the project is needed: tests generate their own signer and
trust only it. Plaintext model bytes given to `ModelKit.publish` with
``encrypt=True`` are encrypted from memory and never written to disk.
`ModelKit.publish` also releases the version (signs ``<name>/release.json``,
serial + 1) unless told ``release=False``, as ``maas-worker models sign`` does.
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_worker.models.artifact_crypto import ModelKey, ModelKeys, encrypt_stream
from maas_worker.models.paths import BUNDLED_MODEL_DIR
from maas_worker.models.publish import sign_version
from maas_worker.models.release import Release, write_release
from maas_worker.models.repository import verify_manifest
from maas_worker.models.signing import SigningKey, TrustedSigners

#: The version of digits the package ships (its release names it).
BUNDLED_DIGITS_VERSION = "2"
BUNDLED_DIGITS = BUNDLED_MODEL_DIR / "digits" / BUNDLED_DIGITS_VERSION / "model.onnx"
DIGITS_OUTPUTS = {"label": "labels", "probabilities": "probabilities"}
HOLDOUT = Path(__file__).parent / "data" / "digits_holdout.json"


@dataclass(frozen=True)
class DigitsNoise:
    """Pixel noise the shipped digits model must withstand, and the accuracy it must keep.

    ``fraction`` of each row's 64 pixels (chosen at random) move by 1 to
    ``max_step`` up or down, clipped to the pixel range 0..16. The build script
    (scripts/build_digits_model.py) refuses to write a model below ``min_accuracy``
    on the held-out rows, and tests/unit/test_digits_model.py checks the shipped one.
    """

    name: str
    slug: str
    fraction: float
    max_step: int
    min_accuracy: float


#: Clean rows, then issue #15's two settings (digits@1, the previous model: 0.9733, 0.8689, 0.7156).
DIGITS_NOISE = (
    DigitsNoise("clean", "clean", 0.0, 0, 0.95),
    DigitsNoise("10% of pixels +-1", "10pct_pixels_pm1", 0.10, 1, 0.93),
    DigitsNoise("30% of pixels +-1..2", "30pct_pixels_pm2", 0.30, 2, 0.85),
)
#: The seed of the noise the thresholds are checked with (fixed: the same rows every run).
DIGITS_NOISE_SEED = 15


def with_noise(rows: list[list[int]], noise: DigitsNoise, seed: int) -> list[list[int]]:
    """``rows`` (64 pixels, 0..16) with ``noise`` applied; the same ``seed``, the same rows."""
    rng = random.Random(seed)
    moved = round(noise.fraction * 64)
    out = []
    for row in rows:
        new = list(row)
        for i in rng.sample(range(64), moved):
            step = rng.choice((-1, 1)) * rng.randint(1, noise.max_step)
            new[i] = min(16, max(0, new[i] + step))
        out.append(new)
    return out


def holdout() -> dict[str, Any]:
    """Held-out digits: ``inputs`` (64 ints each), true ``labels``, ``sklearn_predictions``."""
    data: dict[str, Any] = json.loads(HOLDOUT.read_text())
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def with_marker(model: bytes, marker: bytes) -> bytes:
    """``model`` plus an unknown protobuf field holding ``marker`` (ONNX Runtime ignores it).

    Makes a model whose bytes exist nowhere else, to look for on disk.
    """
    return model + _varint((1000 << 3) | 2) + _varint(len(marker)) + marker


@dataclass
class ModelKit:
    """A repository folder, its trusted signer folder and model keys file."""

    tmp: Path
    root: Path
    key: SigningKey
    signers_dir: Path
    keys_path: Path
    model_key: ModelKey
    #: The last release serial this kit signed, per model.
    serials: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The ``MAAS_*`` variables that make a worker serve this repository."""
        return {
            "MAAS_MODEL_DIR": str(self.root),
            "MAAS_TRUSTED_SIGNERS": str(self.signers_dir),
            "MAAS_MODEL_KEYS": str(self.keys_path),
        }

    def publish(
        self,
        name: str,
        version: str,
        *,
        model: bytes | None = None,
        encrypt: bool = False,
        key: SigningKey | None = None,
        extra_files: dict[str, bytes] | None = None,
        chunk_bytes: int = 4096,
        max_batch: int = 1024,
        release: bool = True,
    ) -> Path:
        """Stage, sign and rename ``<name>/<version>`` into the repository; its path.

        Small chunks by default, so that even the 21 KB digits model spans
        several. Then releases it (signed by the same key) unless ``release``
        is False.
        """
        stage_root = self.tmp / f".stage-{secrets.token_hex(4)}"
        stage = stage_root / name / version
        stage.mkdir(parents=True)
        data = model if model is not None else BUNDLED_DIGITS.read_bytes()
        if encrypt:
            with (stage / "model.onnx.enc").open("wb") as f:
                encrypt_stream(io.BytesIO(data), f, self.model_key, chunk_bytes=chunk_bytes)
        else:
            (stage / "model.onnx").write_bytes(data)
        for fname, content in (extra_files or {}).items():
            (stage / fname).write_bytes(content)
        sign_version(
            stage,
            key or self.key,
            output_keys=DIGITS_OUTPUTS,
            max_batch=max_batch,
            model_keys=ModelKeys().with_key(self.model_key),
        )
        target = self.root / name / version
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(target)
        if release:
            self.release(name, version, key=key)
        return target

    def release(
        self, name: str, version: str, *, key: SigningKey | None = None, serial: int | None = None
    ) -> Release:
        """Sign ``<name>/release.json`` naming ``version`` (serial: the kit's last + 1)."""
        key = key or self.key
        signers = TrustedSigners({key.key_id: key.key.public_key()})
        manifest = verify_manifest(self.root / name / version, signers)
        serial = serial or self.serials.get(name, 0) + 1
        self.serials[name] = max(serial, self.serials.get(name, 0))
        return write_release(self.root / name, key, manifest, serial)


class Clock:
    """A repository's rescan clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, s: float = 60.0) -> None:
        self.now += s


#: What a repository's ``on_reject`` hook was called with: (reference, why, stage).
Rejections = list[tuple[str, str, str]]


def make_kit(tmp: Path) -> ModelKit:
    """A fresh signer (trusted), model key and empty repository under ``tmp``."""
    key = SigningKey.generate()
    signers = tmp / "signers"
    key_file = tmp / "owner" / "owner.key"
    pub = key.save(key_file)
    signers.mkdir()
    (signers / "owner.pub").write_text(pub.read_text())
    model_key = ModelKey.generate()
    keys_path = tmp / "model-keys.json"
    ModelKeys().with_key(model_key).save(keys_path)
    root = tmp / "models"
    root.mkdir()
    return ModelKit(tmp, root, key, signers, keys_path, model_key)


def files_containing(needle: bytes, roots: list[Path], since: float = 0.0) -> list[str]:
    """Regular files under ``roots`` changed after ``since`` that contain ``needle``.

    Stays on each root's filesystem: /tmp of a shared machine may hold other
    mounts (a container's overlay, a chroot's /proc), whose special files can
    block a read forever (/proc/kmsg) and which nothing under test wrote.
    """
    found = []
    for root in roots:
        try:
            device = root.stat().st_dev
        except OSError:
            continue
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if _on_device(Path(dirpath) / d, device)]
            for name in files:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                    if (
                        stat.S_ISREG(st.st_mode)
                        and st.st_dev == device
                        and st.st_mtime >= since
                        and st.st_size < 64 * 1024 * 1024
                        and needle in path.read_bytes()
                    ):
                        found.append(str(path))
                except OSError:
                    continue
    return found


def _on_device(path: Path, device: int) -> bool:
    try:
        return path.lstat().st_dev == device
    except OSError:
        return False
