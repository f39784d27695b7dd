"""The producer side: `Client` seals and submits jobs; `Job` follows one to its result.

Everything a client can check is checked before anything is enqueued
(tenant and key, model, policy, JSON input, size), each failure one clear
`SubmitError` line. A worker re-checks all of it: the client is a courtesy,
the worker is the authority.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from . import keyspace
from .app import TASK_NAME, make_app
from .envelope import Header, now_ms, open_envelope, seal
from .errors import (
    InputTooLarge,
    InvalidEnvelope,
    JobFailed,
    JobRejected,
    PolicyDenied,
    ResultTimeout,
    ServiceUnavailable,
    SubmitError,
    UnknownJob,
    UnknownModel,
)
from .keys import Keyring, KeyringSource
from .models.base import parse_model_ref
from .runtime import CATALOG_TTL_S, backend_client, diagnostic_refs
from .settings import MAX_JOB_TTL_S, PRIORITIES, Settings, queue_for, redact_url

#: Longest single blocking wait on Redis while waiting for a result; short so a
#: second waiter whose wake-up was taken still notices the result soon.
_WAIT_SLICE_S = 1.0
#: Bytes an envelope adds around a result's plaintext (header, nonce, tag, MAC).
_ENVELOPE_OVERHEAD = 1024


class Client:
    """Submit sealed inference jobs as one tenant.

    Build it with `Client.from_env` or with keywords that override the
    environment::

        client = Client(broker_url="redis://127.0.0.1:6379/0", tenant="acme")
        job = client.submit("echo", {"text": "hi"}, priority="high")
        job.result(timeout=10)
    """

    def __init__(self, *, broker_url: str | None = None, result_backend: str | None = None,
                 tenant: str | None = None, keyring: Keyring | str | Path | None = None,
                 settings: Settings | None = None) -> None:
        base = settings or Settings.from_env()
        overrides: dict[str, Any] = {"broker_url": broker_url, "tenant": tenant}
        if result_backend is not None or broker_url is not None:
            overrides["result_backend"] = result_backend or broker_url
        if isinstance(keyring, str | Path):
            overrides["keyring_path"] = Path(keyring)
        self.settings = Settings.from_env({}, **{**_fields(base), **{
            k: v for k, v in overrides.items() if v is not None}})
        if self.settings.tenant is None:
            raise SubmitError("no tenant: set MAAS_TENANT or pass tenant=")
        self.tenant = self.settings.tenant
        self._static_ring = keyring if isinstance(keyring, Keyring) else None
        self._ring_source = None if self._static_ring else KeyringSource(
            self.settings.keyring_path)
        self.keyring.tenant(self.tenant).primary()  # fail now, not at the first submit
        self._app: Celery | None = None
        self._backend: redis.Redis | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from ``MAAS_*`` variables (see docs/configuration.md)."""
        return cls(**overrides)

    # -- plumbing --------------------------------------------------------------
    @property
    def keyring(self) -> Keyring:
        """The keyring in force (re-read when its file changes)."""
        if self._static_ring is not None:
            return self._static_ring
        assert self._ring_source is not None
        return self._ring_source.get()

    @property
    def app(self) -> Celery:
        """The producer's Celery app (created on first use)."""
        if self._app is None:
            self._app = make_app(self.settings, include_tasks=False)
        return self._app

    @property
    def backend(self) -> redis.Redis:
        """Redis client of the result backend."""
        if self._backend is None:
            self._backend = backend_client(self.settings)
        return self._backend

    def close(self) -> None:
        """Release connections."""
        if self._backend is not None:
            self._backend.close()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(tenant={self.tenant!r})"

    # -- submitting --------------------------------------------------------------
    def served_models(self) -> set[str]:
        """Model references that workers advertised within the last hour.

        Plus the diagnostic models when this client enables them, so a client
        can submit before any worker has started in a test or the demo.
        """
        since = time.time() - CATALOG_TTL_S
        with _backend_errors(self.settings):
            rows: list[bytes] = self.backend.zrangebyscore(keyspace.CATALOG, since, "+inf")  # type: ignore[assignment]
        refs = {r.decode() for r in rows}
        return refs | set(diagnostic_refs(self.settings))

    def _check(self, model: str, priority: str) -> None:
        try:
            parse_model_ref(model)
        except ValueError as exc:
            raise UnknownModel(str(exc)) from None
        if priority not in PRIORITIES:
            raise SubmitError(f"invalid priority {priority!r}: use high, normal or low")
        policy = self.keyring.tenant(self.tenant).policy
        if not policy.allows_model(model):
            raise PolicyDenied(f"tenant {self.tenant!r} may not use model {model!r}")
        if not policy.allows_priority(priority):
            raise PolicyDenied(f"tenant {self.tenant!r} may not submit at priority {priority!r}"
                               f" (highest allowed: {policy.max_priority})")
        served = self.served_models()
        if model not in served:
            offer = ", ".join(sorted(r for r in served if "@" not in r)) or "none"
            raise UnknownModel(f"unknown model {model!r} (served: {offer})")

    def seal(self, model: str, inputs: Any, *, priority: str = "normal",
             ttl_s: int | None = None, job_id: str | None = None) -> tuple[Header, str]:
        """Validate and seal a job without sending it: (header, base64 envelope)."""
        self._check(model, priority)
        try:
            body = json.dumps(inputs, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SubmitError(f"inputs are not JSON-serialisable: {exc}") from None
        if len(body) > self.settings.max_input_bytes:
            raise InputTooLarge(f"input is {len(body)} bytes; the limit is "
                                f"{self.settings.max_input_bytes} (MAAS_MAX_INPUT_BYTES)")
        ttl = self.settings.job_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= MAX_JOB_TTL_S:
            raise SubmitError(f"ttl_s must be in 1..{MAX_JOB_TTL_S}")
        kv = self.keyring.tenant(self.tenant).primary()
        issued = now_ms()
        header = Header("request", kv.version, issued, issued + ttl * 1000, priority,
                        self.tenant, job_id or str(uuid.uuid4()), TASK_NAME, model)
        sealed = seal(kv.keys(self.tenant), header, body)
        return header, base64.b64encode(sealed).decode("ascii")

    def submit(self, model: str, inputs: Any, *, priority: str = "normal",
               ttl_s: int | None = None) -> Job:
        """Seal ``inputs`` for ``model`` and enqueue it; returns the `Job`.

        ``ttl_s`` bounds how long the job may wait in the queue: a worker
        refuses it (``expired``) after that.
        """
        header, envelope = self.seal(model, inputs, priority=priority, ttl_s=ttl_s)
        try:
            self.app.send_task(
                TASK_NAME, args=[envelope], task_id=header.job_id, queue=queue_for(priority),
                # Celery copies args into message headers and events for display;
                # say what it is instead of repeating the ciphertext.
                argsrepr="('<sealed envelope>',)", kwargsrepr="{}",
            )
        except OperationalError:
            raise ServiceUnavailable(
                f"broker unavailable ({redact_url(self.settings.broker_url)}); "
                "the job was not submitted, retry later") from None
        # After the send: a marker for a job that never got enqueued would
        # report it "queued" forever. A result, if one is already there, wins.
        with _backend_errors(self.settings):
            self.backend.set(keyspace.submitted(header.job_id), "1",
                             ex=(header.expires_at_ms - header.issued_at_ms) // 1000
                             + self.settings.result_ttl_s)
        return Job(self, header.job_id, request_hash=header.digest())

    def job(self, job_id: str) -> Job:
        """A handle on an existing job, by id."""
        return Job(self, job_id)


@contextlib.contextmanager
def _backend_errors(settings: Settings) -> Iterator[None]:
    """Turn connection failures of the result backend into `ServiceUnavailable`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError):
        raise ServiceUnavailable(
            f"result backend unavailable ({redact_url(settings.result_backend)}); "
            "retry later") from None


def _fields(s: Settings) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


class Job:
    """One submitted job: its id, status and (sealed-for-you) result."""

    def __init__(self, client: Client, job_id: str, *, request_hash: bytes | None = None) -> None:
        self.client = client
        self.id = job_id
        self._request_hash = request_hash

    def __repr__(self) -> str:
        return f"Job(id={self.id!r})"

    def _open(self, sealed: bytes) -> dict[str, Any]:
        s = self.client.settings
        header, body = open_envelope(
            sealed, expect="result", keyring=self.client.keyring.only(self.client.tenant),
            max_bytes=s.max_result_bytes + _ENVELOPE_OVERHEAD, skew_ms=s.clock_skew_s * 1000)
        if header.job_id != self.id or header.tenant != self.client.tenant or (
                self._request_hash is not None and header.request_hash != self._request_hash):
            raise InvalidEnvelope()
        doc: dict[str, Any] = json.loads(body)
        return doc

    def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed`` or ``rejected``.

        Raises `UnknownJob` if no such job is known (or it has expired).
        """
        r = self.client.backend
        pipe = r.pipeline(transaction=False)
        pipe.get(keyspace.result(self.id))
        pipe.exists(keyspace.rejected(self.id))
        pipe.get(keyspace.claim(self.id))
        pipe.exists(keyspace.submitted(self.id))
        with _backend_errors(self.client.settings):
            sealed, rejected, claim, submitted = pipe.execute()
        if sealed is not None:
            return "succeeded" if self._open(sealed).get("ok") else "failed"
        if rejected:
            return "rejected"
        if claim is not None and claim != b"done":
            return "running"
        if submitted:
            return "queued"
        raise UnknownJob(self.id, "unknown job (never submitted, or expired)")

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the result and return the model's output.

        Raises `JobFailed` if the model failed, `JobRejected` if a worker
        refused the job, `ResultTimeout` after ``timeout`` seconds,
        `ServiceUnavailable` if Redis cannot be reached, and `InvalidEnvelope`
        if what is stored is not a genuine result for this job.
        """
        with _backend_errors(self.client.settings):
            return self._wait(timeout)

    def _wait(self, timeout: float | None) -> dict[str, Any]:
        r = self.client.backend
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.get(keyspace.result(self.id))
            pipe.exists(keyspace.rejected(self.id))
            sealed, rejected = pipe.execute()
            if sealed is not None:
                doc = self._open(sealed)
                if doc.get("ok"):
                    output: dict[str, Any] = doc.get("output", {})
                    return output
                raise JobFailed(self.id, str(doc.get("error", "error")),
                                str(doc.get("message", "")))
            if rejected:
                raise JobRejected(self.id, "rejected by a worker (see `maas-worker audit`)")
            wait = _WAIT_SLICE_S
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(f"job {self.id}: no result within {timeout:g} s")
                wait = min(wait, remaining)
            r.blpop([keyspace.done(self.id)], timeout=max(wait, 0.01))
