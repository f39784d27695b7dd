"""The private job's wire format and the CKKS parameter minimum (no TenSEAL here).

The minimum is the HomomorphicEncryption.org security standard (Albrecht et al.,
"Homomorphic Encryption Security Standard", November 2018), Table 1, the
**classical** 128-bit column for a uniform ternary secret: for each ring dimension
N (``poly_modulus_degree``) the largest total coefficient modulus, in bits, that
still gives 128-bit security. Microsoft SEAL's default ``sec_level_type.tc128``
uses the same numbers. A context whose N is below `MIN_POLY_MODULUS_DEGREE`, not in
the table, or whose modulus exceeds the table's bound is refused, whatever else it
offers.
"""

from __future__ import annotations

import re
from typing import Any

#: HE standard Table 1, classical 128-bit security, ternary secret: N -> max log2(q).
MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
#: The smallest ring dimension a worker accepts. N = 4096 is 128-bit secure with at most
#: 109 bits, too few for a 40-bit scale and the primes around it: a 64 -> 10 layer's
#: error reaches 0.1 there, which can change a prediction. So the minimum is
#: 128-bit security (the table) *and* N >= 8192.
MIN_POLY_MODULUS_DEGREE = 8192
#: What the client creates: N = 8192, primes of 60, 40, 60 bits (160 <= 218), scale
#: 2^40. One multiplication level, which an affine layer needs.
DEFAULT_POLY_MODULUS_DEGREE = 8192
DEFAULT_COEFF_BITS: tuple[int, ...] = (60, 40, 60)
DEFAULT_SCALE_BITS = 40

#: The job's input object: ``{"ckks": {"context": <sha256 hex>, "vector": <base64>}}``;
#: the result's output: ``{"ckks": {"vector": <base64>, "size": <int>}}``.
FIELD = "ckks"
#: What a manifest's metadata says for a model with an affine output a worker may
#: evaluate on ciphertexts (``"private": "ckks-affine"``), and which output that is
#: (``"private_output": "logits"``: the graph output's result key).
MANIFEST_PRIVATE = "private"
MANIFEST_PRIVATE_OUTPUT = "private_output"
PRIVATE_AFFINE = "ckks-affine"

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def weakness(poly_modulus_degree: int, coeff_bits: int) -> str | None:
    """Why a context with these parameters is below the minimum, or None if it is not.

    The reason is for the audit record and the operator; the client of a refused job
    is only told ``policy``.
    """
    if poly_modulus_degree < MIN_POLY_MODULUS_DEGREE:
        return f"ring dimension {poly_modulus_degree} is below {MIN_POLY_MODULUS_DEGREE}"
    bound = MAX_COEFF_BITS_128.get(poly_modulus_degree)
    if bound is None:
        return f"ring dimension {poly_modulus_degree} is not in the 128-bit table"
    if coeff_bits > bound:
        return (
            f"coefficient modulus of {coeff_bits} bits exceeds {bound} for N = "
            f"{poly_modulus_degree} (below 128-bit security)"
        )
    return None


def is_digest(value: object) -> bool:
    """Whether ``value`` is a SHA-256 in lower-case hex (a context's name)."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def private_request(inputs: Any) -> tuple[str, str] | None:
    """(context digest, base64 ciphertext) if ``inputs`` is a private job's input, else None.

    A dict with the `FIELD` key is a private request; whether its members are right is
    the caller's to check (`is_digest`, then the ciphertext itself).
    """
    if not isinstance(inputs, dict) or FIELD not in inputs:
        return None
    body = inputs[FIELD]
    if not isinstance(body, dict):
        return ("", "")
    digest, vector = body.get("context"), body.get("vector")
    return (
        digest if isinstance(digest, str) else "",
        vector if isinstance(vector, str) else "",
    )
