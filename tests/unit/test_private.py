"""Private inference pieces without Redis: the parameter minimum, the worker's context
checks, the affine layer read from a signed model, the context cache, the client's key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from maas_worker.errors import ModelRejected
from maas_worker.private import params
from maas_worker.private.evaluate import PrivateCache, affine_of


@pytest.mark.parametrize(
    ("n", "bits", "refused"),
    [
        (8192, 160, None),
        (8192, 218, None),
        (8192, 219, "exceeds 218"),
        (16384, 438, None),
        (16384, 439, "exceeds 438"),
        (32768, 881, None),
        (4096, 100, "below 8192"),
        (2048, 54, "below 8192"),
        (12288, 200, "not in the 128-bit table"),
    ],
)
def test_the_minimum_is_the_standards_128_bit_table_and_n_8192(
    n: int, bits: int, refused: str | None
) -> None:
    why = params.weakness(n, bits)
    assert (why is None) == (refused is None)
    if refused is not None:
        assert why is not None and refused in why


def test_the_client_defaults_meet_the_minimum() -> None:
    assert (
        params.weakness(params.DEFAULT_POLY_MODULUS_DEGREE, sum(params.DEFAULT_COEFF_BITS)) is None
    )


@pytest.mark.parametrize(
    ("inputs", "parsed"),
    [
        ({"inputs": [[1.0]]}, None),
        ([1, 2], None),
        ({"ckks": {"context": "ab", "vector": "Zm9v"}}, ("ab", "Zm9v")),
        ({"ckks": "nope"}, ("", "")),
        ({"ckks": {"context": 1, "vector": None}}, ("", "")),
    ],
)
def test_a_private_request_is_told_apart_from_a_plaintext_one(
    inputs: Any, parsed: tuple[str, str] | None
) -> None:
    assert params.private_request(inputs) == parsed


def _linear(x_rows: list[list[float]]) -> dict[str, Any]:
    w = [[(i + 1) * (j - 1) / 10 for j in range(3)] for i in range(4)]
    b = [0.5, -1.0, 2.0]
    out = [[b[j] + sum(x[i] * w[i][j] for i in range(4)) for j in range(3)] for x in x_rows]
    return {"logits": out}


def test_the_affine_layer_is_read_from_the_model_and_checked() -> None:
    layer = affine_of(lambda inp: _linear(inp["inputs"]), "inputs", "logits", 4)
    assert layer.bias == [0.5, -1.0, 2.0]
    assert layer.apply([1.0, 2.0, 3.0, 4.0]) == pytest.approx(_linear([[1, 2, 3, 4]])["logits"][0])

    def squared(inp: dict[str, Any]) -> dict[str, Any]:
        out = _linear(inp["inputs"])["logits"]
        return {"logits": [[v * v for v in row] for row in out]}

    with pytest.raises(ModelRejected, match="not affine"):
        affine_of(squared, "inputs", "logits", 4)


def test_the_context_cache_is_bounded_and_loads_once() -> None:
    cache = PrivateCache(max_contexts=2)
    loads: list[str] = []

    def loader(name: str) -> Any:
        def load() -> str:
            loads.append(name)
            return f"ctx-{name}"

        return load

    assert cache.context("acme", "a", loader("a")) == "ctx-a"
    assert cache.context("acme", "a", loader("a")) == "ctx-a"
    cache.context("acme", "b", loader("b"))
    cache.context("acme", "a", loader("a"))  # a is the most recent now
    cache.context("acme", "c", loader("c"))  # b goes
    cache.context("acme", "a", loader("a"))
    cache.context("globex", "a", loader("globex-a"))  # another tenant: its own entry
    assert loads == ["a", "b", "c", "globex-a"]


# -- with TenSEAL --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key() -> Any:
    pytest.importorskip("tenseal", reason="the private extra is not installed")
    from maas_worker.private.ckks import SecretContext

    return SecretContext.generate()


def test_a_worker_loads_the_public_context_only_by_its_digest(key: Any) -> None:
    from maas_worker.private.ckks import ContextRefused, load_public

    ctx = load_public(key.public_bytes, key.digest)
    assert ctx.is_public() and ctx.has_galois_keys()
    with pytest.raises(ContextRefused, match="does not match its digest") as err:
        load_public(key.public_bytes + b"x", key.digest)
    assert not err.value.weak
    with pytest.raises(ContextRefused, match="does not match its digest"):
        load_public(key.public_bytes, "not a digest")


def test_a_context_with_its_secret_key_is_refused(key: Any) -> None:
    from maas_worker.private.ckks import ContextRefused, load_public

    leaked = key._ctx.serialize(save_secret_key=True)
    with pytest.raises(ContextRefused, match="secret key"):
        load_public(leaked, hashlib.sha256(leaked).hexdigest())


def test_a_context_below_the_minimum_is_refused_as_weak() -> None:
    ts = pytest.importorskip("tenseal", reason="the private extra is not installed")
    from maas_worker.private.ckks import ContextRefused, load_public

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    ctx.generate_galois_keys()
    ctx.make_context_public()
    data = ctx.serialize()
    with pytest.raises(ContextRefused, match="ring dimension 4096") as err:
        load_public(data, hashlib.sha256(data).hexdigest())
    assert err.value.weak


def test_the_client_key_round_trips_and_its_secret_file_is_private(
    key: Any, tmp_path: Path
) -> None:
    from maas_worker.private.ckks import SecretContext

    folder = tmp_path / "private"
    key.save(folder, "acme")
    assert (folder / "acme.ckks").stat().st_mode & 0o077 == 0
    again = SecretContext.load(folder, "acme")
    assert again.digest == key.digest
    text = key.encrypt([1.5, -2.0, 3.25])
    assert again.decrypt(text, 3) == pytest.approx([1.5, -2.0, 3.25], abs=1e-4)
    with pytest.raises(ValueError, match="finite"):
        key.encrypt([float("nan")])
    with pytest.raises(ValueError, match="not a ciphertext"):
        key.decrypt("AAAA", 3)


def test_the_client_key_follows_the_envelope_key_version(key: Any, tmp_path: Path) -> None:
    from maas_worker.private.ckks import SecretContext, key_version

    key.save(tmp_path, "acme", envelope_version=2)
    assert key_version(tmp_path, "acme") == 2
    assert SecretContext.load_or_generate(tmp_path, "acme", envelope_version=2).digest == (
        key.digest
    )
    newer = SecretContext.load_or_generate(tmp_path, "acme", envelope_version=3)
    assert newer.digest != key.digest and key_version(tmp_path, "acme") == 3
    assert SecretContext.load(tmp_path, "acme").digest == newer.digest
