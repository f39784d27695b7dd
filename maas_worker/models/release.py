"""The signed release pointer: which version a bare model name means.

``<root>/<name>/release.json`` is one small, self-contained file (canonical JSON,
`canonical_json`), so that it is replaced atomically with one rename; docs/models.md,
"The release pointer", gives its format and rules. The signature is Ed25519 by the
model's owner over ``"maas-worker model release v1\0" || canonical_json(release)``.

Invariants:

* its own signing label: a manifest signature never verifies as a release, nor the
  reverse;
* the release names the model (it must equal its folder), the version a bare name
  resolves to, the exact manifest of that version (so a different build signed under
  the same version number is not it) and the signer, who must also be the signer of
  the version it names;
* its ``serial`` only ever grows: workers keep the highest serial they have seen per
  model (`ReleaseFloor`, persisted in Redis) and refuse an older release, so an old,
  validly signed release copied back is a refused rollback. The owner rolls back on
  purpose by signing a NEW release (higher serial) that names the older version;
* it is a file, not a directory: the repository's scan only considers directories as
  versions, so ``release.json`` is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from maas_worker.errors import ModelRejected
from maas_worker.files import write_atomic
from maas_worker.models.base import MODEL_NAME_RE, VERSION_RE
from maas_worker.models.manifest import KEY_ID_RE, Manifest, canonical_json, now_iso
from maas_worker.models.signing import SigningKey, TrustedSigners

RELEASE_FILE = "release.json"
RELEASE_FORMAT = 1
#: Prefixed to the release bytes before signing (domain separation from manifests).
RELEASE_CONTEXT = b"maas-worker model release v1\x00"
#: Largest ``release.json`` read (it is a few hundred bytes).
MAX_RELEASE_BYTES = 4096
#: Serials stay exact as Lua numbers (doubles) in the Redis floor script.
MAX_SERIAL = 2**53 - 1
_SHA256_RE_LEN = 64


class ReleaseFloor(Protocol):
    """Where a worker persists the highest release serial seen per model.

    ``record`` stores ``serial`` for ``name`` if it is higher than the one
    stored, and returns the highest now stored (``serial`` or more); None if
    the store cannot be reached (the repository then relies on its in-memory
    floor and asks again later). It must not block for long.
    """

    def record(self, name: str, serial: int) -> int | None:
        """Record ``serial`` for model ``name``; the highest serial stored for it."""
        ...


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 (hex) of a manifest's canonical bytes, i.e. of its ``manifest.json``."""
    return hashlib.sha256(manifest.to_bytes()).hexdigest()


@dataclass(frozen=True)
class Release:
    """A verified release: ``name`` resolves to ``name@version``."""

    name: str
    version: str
    serial: int
    manifest_sha256: str
    signer: str
    issued_at: str

    @property
    def ref(self) -> str:
        """``name@version`` of the released version."""
        return f"{self.name}@{self.version}"

    def body(self) -> dict[str, Any]:
        """The signed document."""
        return {
            "format": RELEASE_FORMAT,
            "name": self.name,
            "version": self.version,
            "serial": self.serial,
            "manifest_sha256": self.manifest_sha256,
            "signer": self.signer,
            "issued_at": self.issued_at,
        }

    def signed_bytes(self) -> bytes:
        """What the signature covers (after `RELEASE_CONTEXT`)."""
        return canonical_json(self.body())

    def to_file(self, key: SigningKey) -> bytes:
        """The ``release.json`` content, signed with ``key`` (whose id must be ``signer``)."""
        if key.key_id != self.signer:
            raise ValueError("a release must be signed by the key it names as signer")
        sig = json.loads(key.sign(self.signed_bytes(), context=RELEASE_CONTEXT))
        return canonical_json({"release": self.body(), "signature": sig})

    @classmethod
    def verify(cls, data: bytes, signers: TrustedSigners) -> Release:
        """Check a ``release.json``'s signature, then its fields; `ModelRejected`.

        The file is parsed as JSON to find the signed part (it is at most
        `MAX_RELEASE_BYTES`); no field of the release is used before the
        signature has verified, and the file must be in canonical form.
        """
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise ModelRejected("release.json is not JSON") from None
        if (
            not isinstance(doc, dict)
            or set(doc) != {"release", "signature"}
            or not isinstance(doc["release"], dict)
            or not isinstance(doc["signature"], dict)
            or set(doc["signature"]) != {"key_id", "signature"}
        ):
            raise ModelRejected("release.json is malformed")
        try:
            body_bytes = canonical_json(doc["release"])
        except ValueError:
            raise ModelRejected("release.json is malformed") from None
        try:
            signer = signers.verify(
                body_bytes, canonical_json(doc["signature"]), context=RELEASE_CONTEXT
            )
        except ModelRejected as exc:
            raise ModelRejected(f"release {exc}") from None
        try:
            release = _from_json(doc["release"])
        except ValueError as exc:
            raise ModelRejected(str(exc)) from None
        if release.signer != signer:
            raise ModelRejected("the release names another signer than the one that signed it")
        if canonical_json(doc) != data:
            raise ModelRejected("release.json is not in canonical form")
        return release


def _from_json(doc: Mapping[str, Any]) -> Release:
    if doc.get("format") != RELEASE_FORMAT:
        raise ValueError(f"unsupported release format (expected {RELEASE_FORMAT})")
    if set(doc) != {
        "format",
        "name",
        "version",
        "serial",
        "manifest_sha256",
        "signer",
        "issued_at",
    }:
        raise ValueError("release fields are missing or unknown")

    def text(key: str) -> str:
        value = doc[key]
        if not isinstance(value, str) or not value or len(value) > 256:
            raise ValueError(f"release field {key!r} is invalid")
        return value

    name, version, signer, digest = (
        text("name"),
        text("version"),
        text("signer"),
        text("manifest_sha256"),
    )
    serial = doc["serial"]
    if not MODEL_NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise ValueError("release names an invalid model or version")
    if not KEY_ID_RE.fullmatch(signer):
        raise ValueError("release field 'signer' is invalid")
    if len(digest) != _SHA256_RE_LEN or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("release field 'manifest_sha256' is invalid")
    if isinstance(serial, bool) or not isinstance(serial, int) or not 1 <= serial <= MAX_SERIAL:
        raise ValueError(f"release serial must be an integer from 1 to {MAX_SERIAL}")
    return Release(name, version, serial, digest, signer, text("issued_at"))


def mismatch(release: Release, manifest: Manifest, digest: str | None = None) -> str | None:
    """Why the verified ``manifest`` is not what ``release`` names; None if it is.

    The release must be signed by the version's own signer (the model's
    owner) and name that exact manifest (``digest``: its SHA-256, if known).
    """
    if manifest.signer != release.signer:
        return (
            f"the release is signed by {release.signer}, not by the signer of "
            f"{release.ref} (the model's owner)"
        )
    if (digest or manifest_digest(manifest)) != release.manifest_sha256:
        return f"{release.ref} is not the build the release names (its manifest differs)"
    return None


def release_stamp(model_dir: Path) -> tuple[int, int, int, int] | None:
    """What identifies the release file as it is now (None: there is none)."""
    try:
        st = (model_dir / RELEASE_FILE).lstat()
    except OSError:
        return None
    return (st.st_mode, st.st_ino, st.st_mtime_ns, st.st_size)


def read_release(model_dir: Path, signers: TrustedSigners) -> Release:
    """The verified release of the model folder ``model_dir``; `ModelRejected`.

    The file must be a regular file (not a symlink), verify under ``signers``
    and name this folder's model.
    """
    path = model_dir / RELEASE_FILE
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ModelRejected("no signed release (release.json)") from None
    except OSError:
        raise ModelRejected("release.json is unreadable") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelRejected("release.json is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RELEASE_BYTES + 1)
    except OSError:
        raise ModelRejected("release.json is unreadable") from None
    if len(data) > MAX_RELEASE_BYTES:
        raise ModelRejected("release.json is too large")
    release = Release.verify(data, signers)
    if release.name != model_dir.name:
        raise ModelRejected("the release is for another model than its folder")
    return release


def write_release(model_dir: Path, key: SigningKey, manifest: Manifest, serial: int) -> Release:
    """Sign a release of ``manifest``'s version and write ``model_dir/release.json`` atomically.

    The owner's side (where the signing key lives). ``manifest`` must be the
    version's verified manifest and signed by ``key``.
    """
    if manifest.signer != key.key_id:
        raise ValueError("a release must be signed by the signer of the version it names")
    if manifest.name != model_dir.name:
        raise ValueError("the manifest is for another model than this folder")
    if isinstance(serial, bool) or not 1 <= serial <= MAX_SERIAL:
        raise ValueError(f"serial must be from 1 to {MAX_SERIAL}")
    release = Release(
        manifest.name, manifest.version, serial, manifest_digest(manifest), key.key_id, now_iso()
    )
    write_atomic(model_dir / RELEASE_FILE, release.to_file(key), private=False)
    return release
