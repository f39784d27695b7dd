"""The model repository: signed (optionally encrypted) ONNX models under ``MAAS_MODEL_DIR``.

Layout: ``<root>/<name>/<version>/`` holds ``manifest.json``, ``manifest.sig`` and the
files the manifest lists. Directory names that are not valid model names or versions
(``.staging``, say) are ignored, so a version can be staged beside the live ones and
renamed into place atomically. docs/models.md ("What is verified, when", "The release
pointer") explains each check.

- **scan** (every `DEFAULT_RESCAN_INTERVAL_S` at most, when models are listed or
  resolved; cheap, so also in the worker's main process for the catalogue): the
  manifest signature, then the manifest, then every listed file's presence and size.
- **load** (once per version per worker process, on first use): the scan again, then
  every file's SHA-256, then AES-GCM decryption chunk by chunk into an anonymous
  in-memory file (``memfd``), then ONNX Runtime builds the session and the graph is
  checked against the manifest.

Invariants:

* the signature is checked before anything in the manifest is read; nothing decrypted
  is used before both the hash and every chunk's tag have verified (the artifact is
  read once, so the hash covers exactly the bytes decrypted); the plaintext never
  touches disk;
* a version that fails is refused with `ModelRejected` and reported through the
  ``on_reject`` hook (the worker audits ``model_rejected``); every other model keeps
  being served; only a replacement that verifies takes the place of a loaded version;
  changing the trusted signers re-verifies everything;
* a name without a version resolves ONLY to the version named by the model's signed
  release pointer (`release`), never to another one: a missing or unverifiable release,
  one naming a missing or refused version or signed by another signer, or one whose
  ``serial`` is below the floor (in memory, and persisted through the optional
  `ReleaseFloor`) makes the bare name unavailable (`ModelRejected`, reported under the
  bare name, once per change). A tenant restricted to some signers sees only releases
  signed by one of them. ``name@version`` is unaffected: the client sealed that choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from maas_worker.errors import ModelRejected
from maas_worker.models.artifact_crypto import ModelKeys, decrypt_stream, is_encrypted
from maas_worker.models.base import MODEL_NAME_RE, VERSION_RE, Model, version_key
from maas_worker.models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from maas_worker.models.release import (
    Release,
    ReleaseFloor,
    manifest_digest,
    mismatch,
    read_release,
    release_stamp,
)
from maas_worker.models.signing import MAX_SIGNATURE_FILE, TrustedSigners

if TYPE_CHECKING:
    from maas_worker.models.onnx_runner import OnnxModel

log = logging.getLogger(__name__)

DEFAULT_RESCAN_INTERVAL_S = 2.0
#: How long to wait before asking an unreachable `ReleaseFloor` again.
FLOOR_RETRY_S = 10.0
MAX_MANIFEST_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024
#: Called with (model reference, why, stage) when a version is refused;
#: stage is "scan" (signature/manifest) or "load" (hashes, decryption, runtime).
#: A bare name made unavailable by its release (missing, refused, rolled back,
#: naming a version that is missing or refused at scan) is reported as
#: (name, why, "scan"), once per change.
RejectHook = Callable[[str, str, str], None]
#: Called with (model reference, seconds) after a version loaded (hashes checked,
#: decrypted, session built); the worker wires it to its load-time metric.
LoadHook = Callable[[str, float], None]
Stamp = tuple[tuple[str, int, int, int], ...]


def _read_small(path: Path, limit: int, missing: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ModelRejected(missing) from None
    except OSError:
        raise ModelRejected(f"{path.name} is unreadable") from None
    if len(data) > limit:
        raise ModelRejected(f"{path.name} is too large")
    return data


def verify_manifest(version_dir: Path, signers: TrustedSigners) -> Manifest:
    """Signature, then manifest, then every file's presence and size; `ModelRejected`."""
    sig = _read_small(
        version_dir / SIGNATURE_FILE, MAX_SIGNATURE_FILE, "unsigned (no manifest.sig)"
    )
    raw = _read_small(version_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES, "no manifest.json")
    signer = signers.verify(raw, sig)
    try:
        manifest = Manifest.parse_verified(raw)
    except ValueError as exc:
        raise ModelRejected(str(exc)) from None
    if manifest.signer != signer:
        raise ModelRejected("the manifest names another signer than the one that signed it")
    if (manifest.name, manifest.version) != (version_dir.parent.name, version_dir.name):
        raise ModelRejected("the manifest is for another model or version than its directory")
    for name, entry in manifest.files.items():
        try:
            st = (version_dir / name).lstat()
        except FileNotFoundError:
            raise ModelRejected(f"file {name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelRejected(f"file {name} is not a regular file")
        if st.st_size != entry.size:
            raise ModelRejected(f"file {name} has the wrong size (truncated or altered)")
    return manifest


class _HashingReader:
    """Reads from a file and hashes every byte read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.digest = hashlib.sha256()

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        return data


def _check_digest(name: str, digest: str, expected: str) -> None:
    if not hmac.compare_digest(digest, expected):
        raise ModelRejected(f"file {name} does not match its hash (altered)")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def load_verified(
    version_dir: Path, manifest: Manifest, model_keys: Callable[[], ModelKeys]
) -> OnnxModel:
    """Hash every file, decrypt the artifact in memory if needed, build the session.

    ``manifest`` must come from `verify_manifest`. Raises `ModelRejected`.
    """
    from maas_worker.models.onnx_runner import OnnxModel, create_session

    for name, entry in manifest.files.items():
        if name != manifest.artifact:
            try:
                _check_digest(name, _hash_file(version_dir / name), entry.sha256)
            except OSError:
                raise ModelRejected(f"file {name} is unreadable") from None
    entry = manifest.files[manifest.artifact]
    try:
        with (version_dir / manifest.artifact).open("rb") as f:
            if not entry.encrypted:
                data = f.read(entry.size + 1)
                if len(data) != entry.size:
                    raise ModelRejected(f"file {manifest.artifact} changed size while read")
                _check_digest(manifest.artifact, hashlib.sha256(data).hexdigest(), entry.sha256)
                return OnnxModel(manifest, create_session(data))
            assert manifest.encryption_key_id is not None
            key = model_keys().get(manifest.encryption_key_id)
            reader = _HashingReader(f)
            with _plaintext_sink() as (sink, source):
                try:
                    decrypt_stream(reader, entry.size, sink, key)
                finally:
                    # Hash what was read even when decryption stopped early: an
                    # altered file is reported as altered, not as undecryptable.
                    while reader.read(READ_CHUNK_BYTES):
                        pass
                    _check_digest(manifest.artifact, reader.digest.hexdigest(), entry.sha256)
                return OnnxModel(manifest, create_session(source()))
    except OSError:
        raise ModelRejected(f"file {manifest.artifact} is unreadable") from None


@contextlib.contextmanager
def _plaintext_sink() -> Iterator[tuple[BinaryIO, Callable[[], bytes | str]]]:
    """Where decrypted bytes go: an anonymous in-memory file, never a file on disk.

    Yields the sink and a function giving what ONNX Runtime should load: the
    memfd's ``/proc/self/fd`` path (no second copy in Python), or the bytes
    where memfd is unavailable.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("maas-model", os.MFD_CLOEXEC)
        with os.fdopen(fd, "w+b") as mem:

            def path() -> str:
                mem.flush()
                return f"/proc/self/fd/{mem.fileno()}"

            yield mem, path
    else:  # pragma: no cover - not Linux
        buf = io.BytesIO()
        yield buf, buf.getvalue


@dataclass
class _Entry:
    """One version directory as last examined."""

    path: Path
    stamp: Stamp
    manifest: Manifest | None  # verified; None: refused, nothing to serve
    rejected: str | None = None
    model: OnnxModel | None = None
    failed: bool = False  # the artifact failed verification at load (for this stamp)
    digest: str | None = None  # SHA-256 of the verified manifest.json

    def __post_init__(self) -> None:
        if self.manifest is not None and self.digest is None:
            self.digest = manifest_digest(self.manifest)


@dataclass
class _ReleaseState:
    """A model's release file as last examined."""

    stamp: tuple[int, int, int, int] | None
    release: Release | None  # signature and name verified; None: refused or missing
    error: str | None = None  # why ``release`` is None
    floor_checked: bool = False  # its serial was compared with the floor
    floor_high: int = 0  # the highest serial known when it was compared
    floor_retry_at: float | None = None  # the persisted floor was unreachable: ask again


def _stamp(version_dir: Path) -> Stamp:
    out = []
    with contextlib.suppress(OSError), os.scandir(version_dir) as it:
        for e in it:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                out.append((e.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


class ModelRepository:
    """The signed models under one folder, verified, loaded lazily and hot-reloaded.

    ``signers`` and ``model_keys`` are called for the current trusted signers
    (with a flag saying whether they changed) and model keys; both may re-read
    files. ``release_floor`` persists the highest release serial seen per
    model (without it, or while it is unreachable, the floor is this
    instance's memory only). Thread-safe: a lock serialises scans and loads.
    """

    def __init__(
        self,
        root: Path,
        *,
        signers: Callable[[], tuple[TrustedSigners, bool]],
        model_keys: Callable[[], ModelKeys],
        on_reject: RejectHook | None = None,
        on_load: LoadHook | None = None,
        rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        release_floor: ReleaseFloor | None = None,
    ) -> None:
        self.root = root
        self._signers = signers
        self._model_keys = model_keys
        self._on_reject = on_reject
        self._on_load = on_load
        self._interval = rescan_interval_s
        self._clock = clock
        self._release_floor = release_floor
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._releases: dict[str, _ReleaseState] = {}
        #: The highest release serial accepted per model (never forgotten).
        self._floor: dict[str, int] = {}
        #: Why each bare name is unavailable (None: served), as last reported.
        self._problems: dict[str, str | None] = {}
        self._scanned_at: float | None = None

    # -- public ---------------------------------------------------------------
    def refs(self) -> list[str]:
        """Every servable ``name`` and ``name@version`` (scans if due; loads nothing).

        A bare ``name`` is listed only when its release makes it servable.
        """
        with self._lock:
            self._maybe_scan()
            by_name: dict[str, list[str]] = {}
            for (name, version), e in self._entries.items():
                if self._servable(e):
                    by_name.setdefault(name, []).append(version)
            released = {name for name in self._releases if self._status(name)[1] is None}
        out = []
        for name in sorted(by_name.keys() | released):
            if name in released:
                out.append(name)
            out.extend(f"{name}@{v}" for v in sorted(by_name.get(name, ()), key=version_key))
        return out

    def get(
        self, name: str, version: str | None, *, signers: Collection[str] | None = None
    ) -> Model | None:
        """The loaded model, None if there is no such (allowed) model.

        Raises `ModelRejected` when the asked-for version fails verification,
        or, for a bare name, when its release does not make it servable.
        """
        with self._lock:
            self._maybe_scan()
            if version is not None:
                entry = self._entries.get((name, version))
                if entry is None:
                    return None
                if not self._allowed(entry, signers):
                    return None
                return self._loaded(name, version, entry)
            state = self._releases.get(name)
            if state is None:
                return None  # no such model folder
            release = state.release
            if signers is not None and (release is None or release.signer not in signers):
                # The tenant sees only releases signed by an allowed signer; a
                # release that does not verify has no authenticated signer.
                return None
            entry, problem = self._status(name)
            if problem is not None or entry is None or release is None:
                raise ModelRejected(f"{name}: {problem or 'unavailable'}")
            try:
                return self._loaded(name, release.version, entry)
            except ModelRejected:
                raise ModelRejected(
                    f"{name}: released version {release.ref} is refused: "
                    f"{entry.rejected or 'refused'}"
                ) from None

    def scan(self) -> None:
        """Rescan now."""
        with self._lock:
            self._scan()

    # -- internals ------------------------------------------------------------
    @staticmethod
    def _allowed(e: _Entry, signers: Collection[str] | None) -> bool:
        # Under a signer restriction, a version whose signer is not verified
        # (refused manifest) is not the tenant's to see, not even as refused.
        return signers is None or (e.manifest is not None and e.manifest.signer in signers)

    @staticmethod
    def _servable(e: _Entry) -> bool:
        return e.manifest is not None and not e.failed

    def _maybe_scan(self) -> None:
        now = self._clock()
        if self._scanned_at is None or now - self._scanned_at >= self._interval:
            self._scan()

    def _reject(self, ref: str, why: str, stage: str) -> None:
        log.warning("model %s refused: %s", ref, why)
        if self._on_reject is not None:
            try:
                self._on_reject(ref, why, stage)
            except Exception:
                log.exception("model rejection hook failed")

    def _load(self, ref: str, path: Path, manifest: Manifest) -> OnnxModel:
        """`load_verified`, timed for ``on_load`` (only a load that succeeded is reported)."""
        start = time.perf_counter()
        model = load_verified(path, manifest, self._model_keys)
        if self._on_load is not None:
            try:
                self._on_load(ref, time.perf_counter() - start)
            except Exception:
                log.exception("model load hook failed")
        return model

    def _loaded(self, name: str, version: str, entry: _Entry) -> Model:
        ref = f"{name}@{version}"
        if entry.manifest is None or entry.failed:
            raise ModelRejected(f"{ref}: {entry.rejected or 'refused'}")
        if entry.model is None:
            try:
                entry.model = self._load(ref, entry.path, entry.manifest)
            except ModelRejected as exc:
                entry.failed, entry.rejected = True, str(exc)
                self._reject(ref, str(exc), "load")
                raise ModelRejected(f"{ref}: {exc}") from None
            log.info(
                "model %s loaded (signer %s%s)",
                ref,
                entry.manifest.signer,
                ", encrypted" if entry.manifest.encrypted else "",
            )
        return entry.model

    def _status(self, name: str) -> tuple[_Entry | None, str | None]:
        """The entry a bare ``name`` resolves to, and why it is unavailable (None: it is not).

        Compares the release's serial with the floor the first time the
        release is found consistent with the version it names.
        """
        state = self._releases.get(name)
        if state is None or state.release is None:
            return None, state.error if state is not None else "no signed release"
        release = state.release
        entry = self._entries.get((name, release.version))
        if entry is None:
            return None, f"released version {release.ref} is missing"
        if entry.manifest is None:
            return None, f"released version {release.ref} is refused: {entry.rejected}"
        wrong = mismatch(release, entry.manifest, entry.digest)
        if wrong is not None:
            return None, wrong
        self._check_floor(name, state)
        if release.serial < state.floor_high:
            return None, (
                f"release serial {release.serial} is below the highest seen "
                f"({state.floor_high}): rollback refused"
            )
        if entry.failed:
            return entry, f"released version {release.ref} is refused: {entry.rejected}"
        return entry, None

    def _check_floor(self, name: str, state: _ReleaseState) -> None:
        assert state.release is not None
        now = self._clock()
        if state.floor_checked and (state.floor_retry_at is None or now < state.floor_retry_at):
            return
        serial = state.release.serial
        persisted: int | None = None
        if self._release_floor is not None:
            try:
                persisted = self._release_floor.record(name, serial)
            except Exception:
                log.exception("could not record the release serial of %s", name)
            state.floor_retry_at = now + FLOOR_RETRY_S if persisted is None else None
            if persisted is None:
                log.warning(
                    "release floor unreachable: %s checked against this process's "
                    "memory only, for now",
                    name,
                )
        high = max(self._floor.get(name, 0), persisted or 0, serial)
        state.floor_checked, state.floor_high = True, high
        if serial >= high:
            self._floor[name] = serial

    def _scan(self) -> None:
        self._scanned_at = self._clock()
        signers, changed = self._signers()
        if changed:
            # Re-verify everything under the new set (revocation); the floor stays.
            self._entries.clear()
            self._releases.clear()
        seen: set[tuple[str, str]] = set()
        layout = self._layout()
        for version_dir in (v for _, versions in layout.values() for v in versions):
            key = (version_dir.parent.name, version_dir.name)
            seen.add(key)
            stamp = _stamp(version_dir)
            old = self._entries.get(key)
            if old is not None and old.stamp == stamp:
                continue
            ref = f"{key[0]}@{key[1]}"
            try:
                manifest = verify_manifest(version_dir, signers)
            except ModelRejected as exc:
                self._reject(ref, str(exc), "scan")
                if old is not None and old.model is not None:
                    old.stamp = stamp  # keep serving what was verified before
                else:
                    self._entries[key] = _Entry(version_dir, stamp, None, str(exc))
                continue
            new = _Entry(version_dir, stamp, manifest)
            if old is not None and old.model is not None:
                # Loaded and changed on disk: swap only to a replacement that verifies.
                try:
                    new.model = self._load(ref, version_dir, manifest)
                except ModelRejected as exc:
                    self._reject(ref, str(exc), "load")
                    old.stamp = stamp
                    continue
            self._entries[key] = new
        for key in set(self._entries) - seen:
            del self._entries[key]
        self._scan_releases(layout, signers)

    def _scan_releases(
        self, layout: dict[str, tuple[Path, list[Path]]], signers: TrustedSigners
    ) -> None:
        names = {
            name
            for name, (model_dir, versions) in layout.items()
            if versions or release_stamp(model_dir) is not None
        }
        for name in set(self._releases) - names:
            del self._releases[name]
        for name in sorted(names):
            model_dir = layout[name][0]
            stamp = release_stamp(model_dir)  # before reading: a later change is seen next time
            old = self._releases.get(name)
            if old is None or old.stamp != stamp:
                if stamp is None:
                    state = _ReleaseState(None, None, "no signed release (release.json)")
                else:
                    try:
                        state = _ReleaseState(stamp, read_release(model_dir, signers))
                    except ModelRejected as exc:
                        state = _ReleaseState(stamp, None, str(exc))
                self._releases[name] = state
            problem = self._status(name)[1]
            if problem != self._problems.get(name):
                self._problems[name] = problem
                if problem is not None:
                    self._reject(name, problem, "scan")
                elif (release := self._releases[name].release) is not None:
                    log.info("model %s released: %s (serial %d)", name, release.ref, release.serial)
        for name in set(self._problems) - names:
            del self._problems[name]

    def _layout(self) -> dict[str, tuple[Path, list[Path]]]:
        """Every model folder: its path and its version directories."""
        out: dict[str, tuple[Path, list[Path]]] = {}
        try:
            names = sorted(self.root.iterdir())
        except OSError:
            return out
        for name_dir in names:
            if not MODEL_NAME_RE.fullmatch(name_dir.name) or not name_dir.is_dir():
                continue
            versions: list[Path] = []
            with contextlib.suppress(OSError):
                versions = [
                    v
                    for v in sorted(name_dir.iterdir())
                    if VERSION_RE.fullmatch(v.name) and v.is_dir()
                ]
            out[name_dir.name] = (name_dir, versions)
        return out


def is_encrypted_file(path: Path) -> bool:
    """True if the file at ``path`` is an encrypted artifact (by its magic)."""
    with path.open("rb") as f:
        return is_encrypted(f.read(16))
