"""The model owner's side: encrypt an artifact, build its manifest, sign a version.

Used by ``maas-worker models encrypt|sign`` and by the build script of the
bundled ``digits`` model. Runs where the signing key lives, never on a worker.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.files import write_atomic
from maas_worker.models.artifact_crypto import (
    DEFAULT_CHUNK_BYTES,
    ModelKey,
    ModelKeys,
    decrypt_stream,
    encrypt_stream,
    is_encrypted,
    key_id_of,
)
from maas_worker.models.base import MODEL_NAME_RE, VERSION_RE
from maas_worker.models.manifest import (
    DEFAULT_MAX_BATCH,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    FileEntry,
    InputSpec,
    Manifest,
    OutputSpec,
    check_file_name,
    now_iso,
)
from maas_worker.models.signing import SigningKey

#: ONNX Runtime's type names back to numpy dtype names.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
ARTIFACT_SUFFIXES = (".onnx", ".onnx.enc")


def encrypt_file(
    src: Path, dst: Path, key: ModelKey, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Encrypt the file ``src`` to ``dst`` (streamed; written atomically); bytes written."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}")
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            written = encrypt_stream(fin, fout, key, chunk_bytes=chunk_bytes)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_model_bytes(path: Path, model_keys: ModelKeys | None) -> bytes:
    with path.open("rb") as f:
        head = f.read(64)
    if not is_encrypted(head):
        return path.read_bytes()
    if model_keys is None:
        raise ConfigError(
            f"{path.name} is encrypted: no model keys to read its inputs and outputs "
            "(MAAS_MODEL_KEYS or --keys: the file `models encrypt` used)"
        )
    key = model_keys.get(key_id_of(head))
    sink = io.BytesIO()
    with path.open("rb") as f:
        decrypt_stream(f, path.stat().st_size, sink, key)
    return sink.getvalue()


def introspect(model_bytes: bytes) -> tuple[InputSpec, list[str]]:
    """The model's single input (key ``inputs``) and its output names, from the graph."""
    from maas_worker.models.onnx_runner import create_session

    try:
        session = create_session(model_bytes)
    except ModelRejected:
        raise ConfigError("not a loadable ONNX model") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type not in _DTYPES:
        raise ConfigError("the model must have exactly one float or integer tensor input")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape)
    return (
        InputSpec(inputs[0].name, "inputs", shape, _DTYPES[inputs[0].type]),
        [o.name for o in session.get_outputs()],
    )


def _find_artifact(version_dir: Path, files: list[str]) -> str:
    found = [f for f in files if f.endswith(ARTIFACT_SUFFIXES)]
    if len(found) != 1:
        raise ConfigError(
            f"{version_dir}: expected exactly one *.onnx or *.onnx.enc file, "
            f"found {len(found)}; name it with --artifact"
        )
    return found[0]


def build_manifest(
    version_dir: Path,
    signer: str,
    *,
    artifact: str | None = None,
    input_key: str = "inputs",
    output_keys: Mapping[str, str] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    metadata: Mapping[str, str | int | float] | None = None,
    model_keys: ModelKeys | None = None,
) -> Manifest:
    """The manifest for the files now in ``version_dir`` (``<name>/<version>/``).

    Input and outputs are read from the ONNX graph (an encrypted artifact is
    decrypted in memory with ``model_keys``); ``output_keys`` maps graph output
    names to result keys and, when given, selects which outputs are returned.
    """
    name, version = version_dir.resolve().parent.name, version_dir.resolve().name
    if not MODEL_NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise ConfigError(f"{version_dir} is not <model name>/<version>/ (e.g. digits/2)")
    names = sorted(
        p.name
        for p in version_dir.iterdir()
        if p.is_file()
        and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
        and not p.name.startswith(".")
    )
    for n in names:
        try:
            check_file_name(n)
        except ValueError:
            raise ConfigError(f"{version_dir}: file name {n!r} is not allowed") from None
    artifact = artifact or _find_artifact(version_dir, names)
    if artifact not in names:
        raise ConfigError(f"{version_dir}: no file {artifact}")
    files: dict[str, FileEntry] = {}
    key_ids = set()
    for n in names:
        path = version_dir / n
        with path.open("rb") as f:
            head = f.read(64)
        encrypted = is_encrypted(head)
        if encrypted:
            key_ids.add(key_id_of(head))
        files[n] = FileEntry(_sha256(path), path.stat().st_size, encrypted)
    if len(key_ids) > 1:
        raise ConfigError(f"{version_dir}: files are encrypted under different model keys")
    spec, outputs = introspect(_plain_model_bytes(version_dir / artifact, model_keys))
    keys = dict(output_keys) if output_keys else {o: o for o in outputs}
    missing = set(keys) - set(outputs)
    if missing:
        raise ConfigError(
            f"the model has no output(s) {', '.join(sorted(missing))} (it has {', '.join(outputs)})"
        )
    return Manifest(
        name=name,
        version=version,
        artifact=artifact,
        input=InputSpec(spec.name, input_key, spec.shape, spec.dtype),
        outputs=tuple(OutputSpec(o, keys[o]) for o in outputs if o in keys),
        files=files,
        signer=signer,
        created_at=now_iso(),
        encryption_key_id=next(iter(key_ids)) if key_ids else None,
        max_batch=max_batch,
        metadata=dict(metadata or {}),
    )


def sign_version(version_dir: Path, key: SigningKey, **spec: Any) -> Manifest:
    """Write ``manifest.json`` and ``manifest.sig`` for ``version_dir``; returns the manifest.

    ``spec`` is passed to `build_manifest`. Deploy the signed directory by
    renaming it into the repository, so workers never see it half-written.
    """
    manifest = build_manifest(version_dir, key.key_id, **spec)
    data = manifest.to_bytes()
    write_atomic(version_dir / MANIFEST_FILE, data, private=False)
    write_atomic(version_dir / SIGNATURE_FILE, key.sign(data), private=False)
    return manifest
