"""TenSEAL, loaded on first use: the client's secret context and the worker's public one.

The client's `SecretContext` holds the tenant's CKKS secret key; its files live on
the client only (mode 0600). What leaves the client is `SecretContext.public_bytes`
(the context serialized without the secret key: public, relinearization and Galois
keys) and ciphertexts. A worker builds its context with `load_public`, which checks
the bytes against the digest the sealed job names, refuses a context that carries a
secret key and one below the minimum (`params.weakness`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maas_worker.errors import ConfigError
from maas_worker.files import write_atomic
from maas_worker.private import params

#: The version the extra pins and the tests run against.
TENSEAL_VERSION = "0.3.18"
MISSING = "private inference needs the private extra: pip install 'maas-worker[private]'"
#: The files of a tenant's key, in the folder `Settings.private_key_dir` names.
SECRET_SUFFIX = ".ckks"  # noqa: S105 (a file name)
PUBLIC_SUFFIX = ".ckks.pub"


def tenseal() -> Any:
    """The ``tenseal`` module, or `ConfigError` with one line saying which extra to install."""
    try:
        import tenseal as ts
    except ImportError:
        raise ConfigError(MISSING) from None
    return ts


class ContextRefused(Exception):
    """A public context a worker will not use; ``why`` goes to the audit record only."""

    def __init__(self, why: str, *, weak: bool = False) -> None:
        super().__init__(why)
        self.why = why
        #: True when the parameters are below the minimum (the job is refused ``policy``).
        self.weak = weak


def parameters(ctx: Any) -> tuple[int, int]:
    """(poly_modulus_degree, total coefficient modulus bits) of a TenSEAL context."""
    data = ctx.seal_context().data.key_context_data()
    return int(data.parms().poly_modulus_degree()), int(data.total_coeff_modulus_bit_count())


def digest(public: bytes) -> str:
    """The name of a public context: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(public).hexdigest()


class SecretContext:
    """A tenant's CKKS key, on the client: encrypts inputs, decrypts results.

    ``public_bytes`` is what the tenant registers; ``digest`` names it in each job.
    """

    def __init__(self, ctx: Any, public: bytes) -> None:
        self._ctx = ctx
        self.public_bytes = public
        self.digest = digest(public)

    @classmethod
    def generate(cls) -> SecretContext:
        """A new key with the documented parameters (`params.DEFAULT_*`)."""
        ts = tenseal()
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.DEFAULT_POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(params.DEFAULT_COEFF_BITS),
        )
        ctx.global_scale = 2**params.DEFAULT_SCALE_BITS
        # Rotations: an affine layer sums the products of a row inside one ciphertext.
        ctx.generate_galois_keys()
        public = ctx.copy()
        public.make_context_public()
        return cls(ctx, public.serialize())

    @classmethod
    def load(cls, folder: Path, tenant: str) -> SecretContext:
        """The tenant's key from ``folder``; `ConfigError` if there is none."""
        secret, public = _paths(folder, tenant)
        ts = tenseal()
        try:
            ctx = ts.context_from(secret.read_bytes())
            pub = public.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"no private-inference key for tenant {tenant!r} in {folder}: "
                "run `maas-worker private keygen`"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"private-inference key {secret} is unreadable: {exc}") from None
        return cls(ctx, pub)

    @classmethod
    def load_or_generate(
        cls, folder: Path, tenant: str, *, envelope_version: int = 0
    ) -> SecretContext:
        """The tenant's key from ``folder``; a new one (saved there) if it has none, or if
        its key was made under an envelope key version older than ``envelope_version``:
        the CKKS key rotates with the tenant's envelope keys."""
        if not _paths(folder, tenant)[0].exists() or (
            key_version(folder, tenant) < envelope_version
        ):
            key = cls.generate()
            key.save(folder, tenant, envelope_version=envelope_version)
            return key
        return cls.load(folder, tenant)

    def save(self, folder: Path, tenant: str, *, envelope_version: int = 0) -> None:
        """Write the key (secret part mode 0600, folder 0700), its public context and the
        envelope key version it follows (`key_version`)."""
        secret, public = _paths(folder, tenant)
        # Without the Galois keys (tens of MB): the public file holds them.
        data = self._ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False
        )
        write_atomic(secret, data, private=True)
        write_atomic(public, self.public_bytes, private=True)
        write_atomic(_version_path(folder, tenant), b"%d\n" % envelope_version, private=True)

    @property
    def parameters(self) -> tuple[int, int]:
        """(poly_modulus_degree, coefficient modulus bits) of this key."""
        return parameters(self._ctx)

    def encrypt(self, vector: Sequence[float]) -> str:
        """One input vector as a base64 CKKS ciphertext."""
        values = [float(v) for v in vector]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError("a private input must be a non-empty vector of finite numbers")
        slots = params.DEFAULT_POLY_MODULUS_DEGREE // 2
        if len(values) > slots:
            raise ValueError(f"a private input has at most {slots} values")
        ts = tenseal()
        return base64.b64encode(ts.ckks_vector(self._ctx, values).serialize()).decode("ascii")

    def decrypt(self, text: str, size: int) -> list[float]:
        """The first ``size`` values of a base64 CKKS result; `ValueError` if it is not one."""
        ts = tenseal()
        try:
            vec = ts.ckks_vector_from(self._ctx, base64.b64decode(text, validate=True))
            values = vec.decrypt()
        except (binascii.Error, ValueError, TypeError, RuntimeError):
            raise ValueError("the private result is not a ciphertext of this key") from None
        return [float(v) for v in values[:size]]


def _paths(folder: Path, tenant: str) -> tuple[Path, Path]:
    return folder / f"{tenant}{SECRET_SUFFIX}", folder / f"{tenant}{PUBLIC_SUFFIX}"


def _version_path(folder: Path, tenant: str) -> Path:
    return folder / f"{tenant}{SECRET_SUFFIX}.version"


def key_version(folder: Path, tenant: str) -> int:
    """The envelope key version the tenant's CKKS key was made under (0 if not recorded)."""
    try:
        return int(_version_path(folder, tenant).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def load_public(data: bytes, expected_digest: str) -> Any:
    """A worker's context from registered bytes; `ContextRefused` if it may not be used.

    Checks, in order: the bytes are the ones the sealed job names (SHA-256), they
    parse as a CKKS context, it holds no secret key (the tenant's must never reach a
    worker), its parameters are not below the minimum, it has the Galois keys an
    affine layer needs.
    """
    if not params.is_digest(expected_digest) or digest(data) != expected_digest:
        raise ContextRefused("the registered context does not match its digest")
    ts = tenseal()
    try:
        # One thread: a pool process is one core's worth of work, as for every other
        # model (MAAS concurrency scales it); TenSEAL would otherwise start a thread
        # per core in every pool process.
        ctx = ts.context_from(data, n_threads=1)
    except (ValueError, TypeError, RuntimeError) as exc:
        # SEAL re-checks 128-bit security while loading, so an over-sized modulus
        # usually stops here.
        raise ContextRefused(f"unreadable context ({type(exc).__name__})", weak=True) from None
    if not ctx.is_public():
        raise ContextRefused("the context holds a secret key")
    n, bits = parameters(ctx)
    why = params.weakness(n, bits)
    if why is not None:
        raise ContextRefused(why, weak=True)
    if not ctx.has_galois_keys():
        raise ContextRefused("the context has no Galois keys")
    return ctx


def softmax(logits: Sequence[float]) -> list[float]:
    """Probabilities from logits, in plain Python (the client loads no numpy of its own)."""
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]
