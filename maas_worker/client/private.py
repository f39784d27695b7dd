"""Private inference on the client: the rules of `Client.submit_private` (no I/O here).

The tenant's CKKS key (`maas_worker.private.ckks.SecretContext`) is read from
``MAAS_PRIVATE_KEY_DIR`` (created there on first use); its public context is
registered under the tenant's key `keyspace.ckks_context` before the jobs are sent,
each vector becomes one job whose input is ``{"ckks": {"context": <sha256>,
"vector": <ciphertext>}}``, and each job's output is decrypted here. TenSEAL is
loaded on the first private call only: without the ``private`` extra that call
raises `ConfigError` with one line, and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from maas_worker.backend import keyspace
from maas_worker.errors import ConfigError, JobFailed
from maas_worker.private import params
from maas_worker.private.ckks import SecretContext, softmax
from maas_worker.settings import Settings

#: A context is registered again when it has less than a job's lifetime plus this left.
REGISTER_MARGIN_S = 300


class PrivateJobs:
    """One client's private submissions: its key, its context's key in Redis, the inputs it
    sends and how results are opened."""

    def __init__(
        self, settings: Settings, tenant: str, envelope_version: Callable[[], int]
    ) -> None:
        self.settings = settings
        self.tenant = tenant
        self._envelope_version = envelope_version
        self._key: tuple[int, SecretContext] | None = None

    @property
    def key(self) -> SecretContext:
        """The tenant's CKKS key: loaded, or generated and saved, on first use, and again
        (a new key) once the tenant's primary envelope key is newer than the one it was
        made under: the CKKS key rotates with the envelope keys."""
        version = self._envelope_version()
        if self._key is None or self._key[0] != version:
            key = SecretContext.load_or_generate(
                self.settings.private_key_dir, self.tenant, envelope_version=version
            )
            self._key = (version, key)
        return self._key[1]

    def context_key(self, key: SecretContext) -> str:
        """Where ``key``'s public context is registered (named by its digest)."""
        return keyspace.ckks_context(self.tenant, key.digest)

    def needs_registration(self, ttl_left_s: int, ttl_s: int | None) -> bool:
        """Whether to (re)write the context: missing (``-2``), or expiring before the jobs
        could run."""
        lifetime = self.settings.job_ttl_s if ttl_s is None else ttl_s
        return ttl_left_s != -1 and ttl_left_s < lifetime + REGISTER_MARGIN_S

    def registration(self, key: SecretContext) -> tuple[str, bytes, int]:
        """(Redis key, public context, seconds to keep it): the SET that registers ``key``'s
        public context."""
        return self.context_key(key), key.public_bytes, self.settings.private_context_ttl_s

    def inputs(
        self, key: SecretContext, vectors: Sequence[Sequence[float]]
    ) -> list[dict[str, Any]]:
        """One job input per vector: the vector encrypted under ``key``."""
        if not isinstance(vectors, list | tuple) or not vectors:
            raise ValueError("submit_private takes a non-empty list of vectors")
        out = []
        for i, vector in enumerate(vectors):
            try:
                text = key.encrypt(vector)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"vector {i}: {exc}") from None
            out.append({params.FIELD: {"context": key.digest, "vector": text}})
        return out

    def open(
        self, key: SecretContext, job_ids: Sequence[str], outputs: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        """The results of the jobs, decrypted with ``key`` (the one their inputs were
        encrypted under), in order: ``labels`` (argmax),
        ``probabilities`` (softmax of the logits) and ``logits``."""
        logits: list[list[float]] = []
        for job_id, output in zip(job_ids, outputs, strict=True):
            body = output.get(params.FIELD) if isinstance(output, dict) else None
            if (
                not isinstance(body, dict)
                or not isinstance(body.get("vector"), str)
                or not isinstance(body.get("size"), int)
            ):
                raise JobFailed(job_id, "bad_output", "the model returned no private result")
            try:
                logits.append(key.decrypt(body["vector"], body["size"]))
            except ValueError as exc:
                raise JobFailed(job_id, "bad_output", str(exc)) from None
        probabilities = [softmax(row) for row in logits]
        return {
            "labels": [max(range(len(p)), key=p.__getitem__) for p in probabilities],
            "probabilities": probabilities,
            "logits": logits,
        }


def gateway_refusal() -> ConfigError:
    """Private jobs register their context in Redis, which a gateway client cannot reach."""
    return ConfigError(
        "private jobs go straight to Redis (the context is registered there): "
        "use a Client without gateway_url"
    )
