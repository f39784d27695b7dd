"""The model manifest: what a model version is, byte for byte, as its owner signed it.

A version directory ``<name>/<version>/`` holds the artifact file(s), the
manifest (``manifest.json``) and its detached signature (``manifest.sig``).
The manifest names the model and version (they must match the directory, so
a signed manifest cannot be moved to serve under another name or version),
the runtime, the artifact, the input tensor (name, JSON key, shape, dtype) and
the outputs, the SHA-256 and size of *every* file exactly as stored (for an
encrypted file: of the ciphertext), whether files are encrypted and under which
model key, the signer's key id and the creation time.

The file is canonical JSON (`Manifest.to_bytes`: sorted keys, two-space indent,
ASCII, one final newline). The signature covers those exact bytes; a worker
verifies it *before* parsing (`parse_verified`), then refuses any manifest
that is not in canonical form, so there is one representation per manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from maas_worker.models.base import MODEL_NAME_RE, VERSION_RE

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MANIFEST_FORMAT = 1
RUNTIME_ONNX = "onnx"
#: Tensor element types a manifest may declare, as numpy names.
DTYPES: frozenset[str] = frozenset({"float32", "float64", "int32", "int64"})
#: Largest batch (first dimension) a model accepts unless its manifest says less.
DEFAULT_MAX_BATCH = 1024
#: A file name inside a version directory: no separators, no dot-files.
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Model key ids (hex), see `artifact_crypto`.
KEY_ID_RE = re.compile(r"[0-9a-f]{16,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RESERVED = frozenset({MANIFEST_FILE, SIGNATURE_FILE})


@dataclass(frozen=True)
class InputSpec:
    """The model's one input tensor and where it comes from in the job's JSON.

    ``shape`` uses ``None`` for a free dimension (the batch); ``key`` is the
    member of the job's input object that holds the nested list.
    """

    name: str
    key: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class OutputSpec:
    """One model output (``name`` in the graph) and its key in the result JSON."""

    name: str
    key: str


@dataclass(frozen=True)
class FileEntry:
    """A file of the version as stored: its SHA-256 (hex), size, and whether encrypted."""

    sha256: str
    size: int
    encrypted: bool = False


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. Build one with `Manifest.parse_verified` (after the signature)."""

    name: str
    version: str
    artifact: str
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    files: Mapping[str, FileEntry]
    signer: str
    created_at: str
    runtime: str = RUNTIME_ONNX
    encryption_key_id: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    metadata: Mapping[str, str | int | float] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def encrypted(self) -> bool:
        """True if any file of this version is stored encrypted."""
        return any(f.encrypted for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        """The JSON document (see `to_bytes` for the signed form)."""
        doc: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "artifact": self.artifact,
            "input": {
                "name": self.input.name,
                "key": self.input.key,
                "shape": list(self.input.shape),
                "dtype": self.input.dtype,
            },
            "outputs": [{"name": o.name, "key": o.key} for o in self.outputs],
            "files": {
                n: {"sha256": f.sha256, "size": f.size, "encrypted": f.encrypted}
                for n, f in self.files.items()
            },
            "signer": self.signer,
            "created_at": self.created_at,
            "max_batch": self.max_batch,
            "metadata": dict(self.metadata),
        }
        if self.encryption_key_id is not None:
            doc["encryption_key_id"] = self.encryption_key_id
        return doc

    def to_bytes(self) -> bytes:
        """The canonical bytes: what is written to ``manifest.json`` and signed."""
        return canonical_json(self.to_json())

    @classmethod
    def parse_verified(cls, data: bytes) -> Manifest:
        """Parse manifest bytes whose signature has ALREADY been verified.

        Raises ValueError (one line, no content echoed) if the document is
        malformed or not in canonical form.
        """
        try:
            doc = json.loads(data)
        except ValueError:
            raise ValueError("manifest is not JSON") from None
        manifest = _from_json(doc)
        if manifest.to_bytes() != data:
            raise ValueError("manifest is not in canonical form")
        return manifest


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """Sorted keys, two-space indent, ASCII only, one final newline."""
    return (
        json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode("ascii")


def now_iso() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_file_name(name: object) -> str:
    """``name`` if it is a plain file name allowed in a version directory, else ValueError."""
    if (
        not isinstance(name, str)
        or not FILE_NAME_RE.fullmatch(name)
        or ".." in name
        or name in _RESERVED
    ):
        raise ValueError("invalid file name in manifest")
    return name


def _str(doc: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = doc.get(key)
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 256
        or (pattern is not None and not pattern.fullmatch(value))
    ):
        raise ValueError(f"manifest field {key!r} is missing or invalid")
    return value


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"manifest field {what!r} must be an object")
    return value


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"manifest field {what!r} must be an integer >= {minimum}")
    return value


def _from_json(doc: object) -> Manifest:
    doc = _obj(doc, "manifest")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"unsupported manifest format (expected {MANIFEST_FORMAT})")
    runtime = _str(doc, "runtime")
    if runtime != RUNTIME_ONNX:
        raise ValueError("unsupported model runtime")
    raw_in = _obj(doc.get("input"), "input")
    shape_raw = raw_in.get("shape")
    if not isinstance(shape_raw, list) or not 1 <= len(shape_raw) <= 8:
        raise ValueError("manifest input shape must be a list of 1-8 dimensions")
    shape = tuple(None if d is None else _int(d, "input.shape", 1) for d in shape_raw)
    dtype = _str(raw_in, "dtype")
    if dtype not in DTYPES:
        raise ValueError("unsupported input dtype")
    inp = InputSpec(_str(raw_in, "name"), _str(raw_in, "key"), shape, dtype)
    raw_out = doc.get("outputs")
    if not isinstance(raw_out, list) or not raw_out:
        raise ValueError("manifest outputs must be a non-empty list")
    outputs = tuple(
        OutputSpec(_str(o, "name"), _str(o, "key")) for o in (_obj(o, "outputs") for o in raw_out)
    )
    files: dict[str, FileEntry] = {}
    for name, raw in _obj(doc.get("files"), "files").items():
        entry = _obj(raw, "files")
        encrypted = entry.get("encrypted", False)
        if not isinstance(encrypted, bool):
            raise ValueError("manifest field 'encrypted' must be a boolean")
        files[check_file_name(name)] = FileEntry(
            _str(entry, "sha256", _SHA256_RE), _int(entry.get("size"), "size", 0), encrypted
        )
    artifact = check_file_name(_str(doc, "artifact"))
    if artifact not in files:
        raise ValueError("manifest artifact is not among its files")
    key_id = doc.get("encryption_key_id")
    if key_id is not None and not (isinstance(key_id, str) and KEY_ID_RE.fullmatch(key_id)):
        raise ValueError("manifest field 'encryption_key_id' is invalid")
    if (key_id is None) == any(f.encrypted for f in files.values()):
        raise ValueError("encrypted files need exactly one encryption_key_id")
    metadata = _obj(doc.get("metadata", {}), "metadata")
    if not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in metadata.values()
    ):
        raise ValueError("manifest metadata values must be strings or numbers")
    return Manifest(
        name=_str(doc, "name", MODEL_NAME_RE),
        version=_str(doc, "version", VERSION_RE),
        artifact=artifact,
        input=inp,
        outputs=outputs,
        files=files,
        signer=_str(doc, "signer", KEY_ID_RE),
        created_at=_str(doc, "created_at"),
        runtime=runtime,
        encryption_key_id=key_id,
        max_batch=_int(doc.get("max_batch", DEFAULT_MAX_BATCH), "max_batch", 1),
        metadata=metadata,
    )
