"""``maas-worker models keygen|sign|release|encrypt|verify|list``: owners' and operators' tools.

keygen
    an Ed25519 signing key pair (private key 0600, ``.pub`` beside it), or
    with ``--encryption`` a model encryption key added to the model keys file;
sign
    write ``manifest.json`` (hashes of every file, input and outputs read from
    the ONNX graph) and ``manifest.sig`` for a ``<name>/<version>/`` directory,
    then release that version (``<name>/release.json``, serial + 1) unless
    ``--no-release`` stages it;
release
    sign a new release pointer: the bare model name then means that version
    (serial = the current release's + 1, or ``--serial``); the version must
    exist, verify under the trusted signers and be signed by the same key;
encrypt
    encrypt an artifact (AES-256-GCM, chunked) for a version directory;
verify
    check versions exactly as a worker loads them (signature, hashes,
    decryption, ONNX Runtime); exit 1 if any is refused;
list
    every version in the repository: signer, encrypted or not, verifies or
    not, and which one the model's release names (with its serial).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from maas_worker.cli.context import Group, json_option, pass_settings
from maas_worker.errors import ConfigError, ModelRejected
from maas_worker.models.artifact_crypto import DEFAULT_CHUNK_BYTES, ModelKey, ModelKeys
from maas_worker.models.base import MODEL_NAME_RE, VERSION_RE
from maas_worker.models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from maas_worker.models.release import (
    MAX_SERIAL,
    RELEASE_FILE,
    Release,
    mismatch,
    read_release,
    write_release,
)
from maas_worker.models.signing import SigningKey, TrustedSigners
from maas_worker.settings import Settings


def _serial(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """``--serial``: an integer from 1 to `MAX_SERIAL`."""
    if value is not None and not 1 <= value <= MAX_SERIAL:
        raise click.BadParameter(f"must be from 1 to {MAX_SERIAL}")
    return value


def _is_version_dir(path: Path) -> bool:
    return path.is_dir() and (
        any((path / f).exists() for f in (MANIFEST_FILE, SIGNATURE_FILE))
        or any(path.glob("*.onnx*"))
    )


def _version_dirs(path: Path) -> list[Path]:
    """The version directories ``path`` is, holds (a model) or holds two levels down."""
    if _is_version_dir(path):
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    children = [c for c in sorted(path.iterdir()) if c.is_dir()]
    if any(_is_version_dir(c) for c in children):
        return [c for c in children if VERSION_RE.fullmatch(c.name)]
    return [
        v
        for c in children
        if MODEL_NAME_RE.fullmatch(c.name)
        for v in sorted(c.iterdir())
        if v.is_dir() and VERSION_RE.fullmatch(v.name)
    ]


def inspect_version(version_dir: Path, signers: TrustedSigners, keys_path: Path) -> dict[str, Any]:
    """Verify one version as a worker loads it; a row for ``list``/``verify``."""
    from maas_worker.models.repository import load_verified, verify_manifest

    row: dict[str, Any] = {
        "name": version_dir.parent.name,
        "version": version_dir.name,
        "signer": None,
        "encrypted": None,
        "verifies": False,
        "error": None,
    }

    def keys() -> ModelKeys:
        try:
            return ModelKeys.load(keys_path)
        except ConfigError:
            raise ModelRejected("the model keys are unavailable (MAAS_MODEL_KEYS)") from None

    try:
        manifest = verify_manifest(version_dir, signers)
        row.update(signer=manifest.signer, encrypted=manifest.encrypted)
        load_verified(version_dir, manifest, keys)
        row["verifies"] = True
    except ModelRejected as exc:
        row["error"] = str(exc)
    return row


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'MODEL':<24} {'VERSION':<10} {'SIGNER':<34} {'ENCRYPTED':<10} VERIFIES")
    for r in rows:
        enc = "-" if r["encrypted"] is None else ("yes" if r["encrypted"] else "no")
        ok = "yes" if r["verifies"] else f"NO: {r['error']}"
        print(f"{r['name']:<24} {r['version']:<10} {r['signer'] or '-':<34} {enc:<10} {ok}")


def _print_listing(rows: list[dict[str, Any]], as_json: bool) -> None:
    """``list``: the version rows with the release of each model."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'MODEL':<24} {'VERSION':<10} {'SIGNER':<34} {'ENCRYPTED':<10} {'RELEASED':<10} VERIFIES"
    )
    for r in rows:
        if r["version"] is None:
            continue
        enc = "-" if r["encrypted"] is None else ("yes" if r["encrypted"] else "no")
        rel = f"serial {r['serial']}" if r["released"] else "-"
        ok = "yes" if r["verifies"] else f"NO: {r['error']}"
        print(
            f"{r['name']:<24} {r['version']:<10} {r['signer'] or '-':<34} {enc:<10} {rel:<10} {ok}"
        )
    problems = {r["name"]: r["release_error"] for r in rows if r["release_error"]}
    for name, why in sorted(problems.items()):
        print(f"{name}: the bare name is NOT served: {why}")


def release_status(
    model_dir: Path, signers: TrustedSigners, rows: list[dict[str, Any]]
) -> tuple[Release | None, str | None]:
    """The model's release and why its bare name would not be served (None: it would).

    ``rows`` are the model's `inspect_version` rows. Checks what a worker
    checks, except the floor of serials workers have seen (kept in Redis).
    """
    from maas_worker.models.repository import verify_manifest

    try:
        release = read_release(model_dir, signers)
    except ModelRejected as exc:
        return None, str(exc)
    row = next((r for r in rows if r["version"] == release.version), None)
    if row is None:
        return release, f"released version {release.ref} is missing"
    if not row["verifies"]:
        return release, f"released version {release.ref} is refused: {row['error']}"
    try:
        manifest = verify_manifest(model_dir / release.version, signers)
    except ModelRejected as exc:
        return release, f"released version {release.ref} is refused: {exc}"
    return release, mismatch(release, manifest)


def _with_key(signers: TrustedSigners, key: SigningKey) -> TrustedSigners:
    return TrustedSigners({**signers.keys, key.key_id: key.key.public_key()})


def _trusted_or_none(settings: Settings) -> TrustedSigners:
    try:
        return TrustedSigners.from_paths(settings.trusted_signers)
    except ConfigError:
        return TrustedSigners()


def next_serial(model_dir: Path, signers: TrustedSigners, given: int | None) -> int:
    """The serial of a new release in ``model_dir``: ``given``, or the current one's + 1.

    Only a release that verifies under ``signers`` counts as current (an
    unverified file could claim any serial); if one is there but does not
    verify, ``given`` is required.
    """
    current = None
    if (model_dir / RELEASE_FILE).exists() or (model_dir / RELEASE_FILE).is_symlink():
        try:
            current = read_release(model_dir, signers)
        except ModelRejected as exc:
            if given is None:
                raise ConfigError(
                    f"{model_dir / RELEASE_FILE} does not verify ({exc}); pass --serial N "
                    "above the highest serial workers have seen (their model_rejected "
                    "audit records name it)"
                ) from None
    if given is None:
        return current.serial + 1 if current is not None else 1
    if current is not None and given <= current.serial:
        raise ConfigError(
            f"--serial {given} is not above the current release's serial "
            f"{current.serial}: workers would refuse it as a rollback"
        )
    return given


def _release(
    model_dir: Path,
    key: SigningKey,
    manifest: Manifest,
    signers: TrustedSigners,
    serial: int | None,
) -> Release:
    release = write_release(
        model_dir, key, manifest, next_serial(model_dir, _with_key(signers, key), serial)
    )
    print(
        f"released {release.ref} (serial {release.serial}, signer {release.signer}): "
        f"{model_dir / RELEASE_FILE}"
    )
    return release


def _output_key(text: str) -> tuple[str, str]:
    """``--output NAME[=KEY]`` as (graph output, key in the result)."""
    name, sep, key = text.partition("=")
    return (name, key) if sep else (name, name)


@click.group(cls=Group, no_args_is_help=False, short_help="sign, encrypt, verify and list models")
def models() -> None:
    """Sign, encrypt, verify and list models."""


@models.command(short_help="new signing key pair, or (--encryption) model key")
@click.option("--out", type=Path, help="private signing key file to create (0600)")
@click.option(
    "--encryption", is_flag=True, help="add a model encryption key to the model keys file instead"
)
@click.option("--keys", type=Path, help="model keys file (default: $MAAS_MODEL_KEYS)")
@pass_settings
def keygen(settings: Settings, out: Path | None, encryption: bool, keys: Path | None) -> int:
    """A new Ed25519 signing key pair (private key 0600, .pub beside it), or with
    --encryption a model encryption key added to the model keys file."""
    if encryption:
        path = keys or settings.model_keys_path
        ring = ModelKeys.load(path) if path.exists() else ModelKeys()
        key = ModelKey.generate()
        ring.with_key(key).save(path)
        print(f"model key {key.key_id} added to {path} (mode 0600)")
        return 0
    if out is None:
        raise ConfigError(
            "keygen needs --out PATH for the private signing key (keep it off the workers)"
        )
    signing = SigningKey.generate()
    pub = signing.save(out)
    print(f"signing key {signing.key_id}: private {out} (mode 0600), public {pub}")
    return 0


@models.command(short_help="write and sign the manifest of <name>/<version>/")
@click.argument("version_dir", type=Path)
@click.option("--key", type=Path, required=True, help="private signing key")
@click.option("--artifact", help="the model file (default: the one *.onnx[.enc])")
@click.option(
    "--input-key",
    default="inputs",
    help="member of the job's JSON input holding the tensor (default inputs)",
)
@click.option(
    "--output",
    multiple=True,
    metavar="NAME[=KEY]",
    help="graph output to return, under KEY (repeat; default all, by name)",
)
@click.option(
    "--max-batch",
    type=int,
    default=1024,
    help="the most inputs one model call takes (default 1024)",
)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="signed metadata (repeat)")
@click.option(
    "--keys",
    type=Path,
    help="model keys, to read an encrypted artifact (default: $MAAS_MODEL_KEYS)",
)
@click.option(
    "--no-release", is_flag=True, help="stage the version: do not point the bare model name at it"
)
@click.option("--serial", type=int, callback=_serial, help="release serial (default: current + 1)")
@pass_settings
def sign(
    settings: Settings,
    *,
    version_dir: Path,
    key: Path,
    artifact: str | None,
    input_key: str,
    output: tuple[str, ...],
    max_batch: int,
    meta: tuple[str, ...],
    keys: Path | None,
    no_release: bool,
    serial: int | None,
) -> int:
    """Write manifest.json (hashes of every file, input and outputs read from the ONNX
    graph) and manifest.sig for a <name>/<version>/ directory, then release that version
    (<name>/release.json, serial + 1) unless --no-release stages it."""
    from maas_worker.models.publish import sign_version

    outputs = dict(_output_key(o) for o in output)
    metadata = dict(m.split("=", 1) for m in meta if "=" in m)
    # The keys `encrypt` used and `verify` and the workers read: --keys, else
    # $MAAS_MODEL_KEYS (or its default) when there is one; only an encrypted
    # artifact needs them.
    keys_path = keys or settings.model_keys_path
    model_keys = ModelKeys.load(keys_path) if keys or keys_path.exists() else None
    signing = SigningKey.load(key)
    manifest = sign_version(
        version_dir,
        signing,
        artifact=artifact,
        input_key=input_key,
        output_keys=outputs or None,
        max_batch=max_batch,
        metadata=metadata,
        model_keys=model_keys,
    )
    print(
        f"signed {manifest.ref} ({len(manifest.files)} file(s), signer "
        f"{manifest.signer}{', encrypted' if manifest.encrypted else ''})"
    )
    if no_release:
        print(f"staged, not released: the bare name {manifest.name} is unchanged")
    else:
        _release(
            version_dir.resolve().parent, signing, manifest, _trusted_or_none(settings), serial
        )
    return 0


@models.command(short_help="point the bare model name at a version (signed)")
@click.argument("name")
@click.argument("version")
@click.option("--key", type=Path, required=True, help="private signing key (the version's signer)")
@click.option("--model-dir", type=Path, help="the repository (default: $MAAS_MODEL_DIR)")
@click.option("--serial", type=int, callback=_serial, help="release serial (default: current + 1)")
@pass_settings
def release(
    settings: Settings,
    *,
    name: str,
    version: str,
    key: Path,
    model_dir: Path | None,
    serial: int | None,
) -> int:
    """Sign a new release pointer: the bare model NAME then means VERSION.

    The version must exist, verify under the trusted signers and be signed by
    the same key; the serial is the current release's + 1 unless --serial.
    """
    from maas_worker.models.repository import verify_manifest

    root = model_dir or settings.model_dir
    if not MODEL_NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise ConfigError(f"invalid model name or version {name}@{version}")
    ref = f"{name}@{version}"
    version_dir = root / name / version
    if not version_dir.is_dir():
        raise ConfigError(f"no version {ref} in {root}; nothing released")
    signing = SigningKey.load(key)
    signers = TrustedSigners.from_paths(settings.trusted_signers)
    row = inspect_version(version_dir, signers, settings.model_keys_path)
    if not row["verifies"]:
        raise ConfigError(f"{ref} does not verify ({row['error']}); nothing released")
    manifest = verify_manifest(version_dir, signers)
    if manifest.signer != signing.key_id:
        raise ConfigError(
            f"{ref} is signed by {manifest.signer}, not by this key "
            f"({signing.key_id}): a release is signed by the version's own signer"
        )
    _release(root / name, signing, manifest, signers, serial)
    return 0


@models.command(short_help="encrypt a model file (AES-256-GCM, chunked)")
@click.argument("src", type=Path)
@click.argument("dst", type=Path)
@click.option("--keys", type=Path, help="model keys file (default: $MAAS_MODEL_KEYS)")
@click.option("--key-id", help="which model key (default: the only one)")
@click.option(
    "--chunk-bytes",
    type=int,
    default=DEFAULT_CHUNK_BYTES,
    help=f"plaintext bytes per sealed chunk (default {DEFAULT_CHUNK_BYTES})",
)
@pass_settings
def encrypt(
    settings: Settings,
    *,
    src: Path,
    dst: Path,
    keys: Path | None,
    key_id: str | None,
    chunk_bytes: int,
) -> int:
    """Encrypt the model file SRC to DST (AES-256-GCM, chunked) for a version directory."""
    from maas_worker.models.publish import encrypt_file

    keys_path = keys or settings.model_keys_path
    ring = ModelKeys.load(keys_path)
    if key_id is None and len(ring.keys) != 1:
        raise ConfigError("the model keys file holds several keys: choose one with --key-id")
    key_id = key_id or next(iter(ring.keys))
    try:
        key = ring.get(key_id)
    except ModelRejected:
        raise ConfigError(f"no model key {key_id}") from None
    written = encrypt_file(src, dst, key, chunk_bytes=chunk_bytes)
    print(f"encrypted {src} -> {dst} ({written} bytes, model key {key_id} of {keys_path})")
    return 0


@models.command(short_help="verify versions as a worker would load them")
@click.argument("paths", type=Path, nargs=-1)
@json_option("one JSON object per version instead of a table")
@pass_settings
def verify(settings: Settings, paths: tuple[Path, ...], as_json: bool) -> int:
    """Check versions exactly as a worker loads them (signature, hashes, decryption,
    ONNX Runtime); exit 1 if any is refused.

    PATHS are version dirs, model dirs or repositories (default: $MAAS_MODEL_DIR).
    """
    signers = TrustedSigners.from_paths(settings.trusted_signers)
    dirs = [d for p in (paths or (settings.model_dir,)) for d in _version_dirs(p)]
    rows = [inspect_version(d, signers, settings.model_keys_path) for d in dirs]
    _print_rows(rows, as_json)
    if not rows:
        raise ConfigError("no model versions found")
    return 0 if all(r["verifies"] for r in rows) else 1


@models.command("list", short_help="every version: signer, encrypted, verifies")
@json_option("one JSON object per version instead of a table")
@pass_settings
def list_models(settings: Settings, as_json: bool) -> int:
    """Every version in the repository: signer, encrypted or not, verifies or not, and
    which one the model's release names (with its serial)."""
    signers = TrustedSigners.from_paths(settings.trusted_signers)
    model_dir = settings.model_dir
    dirs = _version_dirs(model_dir) if model_dir.is_dir() else []
    rows = [inspect_version(d, signers, settings.model_keys_path) for d in dirs]
    names = sorted(
        {r["name"] for r in rows}
        | {
            d.name
            for d in (model_dir.iterdir() if model_dir.is_dir() else ())
            if MODEL_NAME_RE.fullmatch(d.name) and (d / RELEASE_FILE).exists()
        }
    )
    for name in names:
        own = [r for r in rows if r["name"] == name]
        current, problem = release_status(model_dir / name, signers, own)
        for r in own:
            is_it = current is not None and r["version"] == current.version
            r.update(
                released=is_it,
                serial=current.serial if is_it and current else None,
                release_error=problem,
            )
        if not own:  # a release but no version at all
            rows.append(
                {
                    "name": name,
                    "version": None,
                    "signer": None,
                    "encrypted": None,
                    "verifies": False,
                    "error": None,
                    "released": False,
                    "serial": None,
                    "release_error": problem,
                }
            )
    _print_listing(rows, as_json)
    return 0
