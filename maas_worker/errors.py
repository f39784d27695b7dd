"""Every error maas-worker raises, under one root.

::

    MaasError
    ├── ConfigError            bad settings, flags or environment
    ├── KeyringError           keyring missing, unreadable, unsafe or inconsistent
    │   └── UnknownTenant      no such tenant, or it has no usable key
    ├── InvalidEnvelope        ANY failure to open untrusted bytes (one opaque error)
    │   └── EnvelopeRejected   the same, carrying the audit reason (worker side only)
    ├── SubmitError            a job refused at the client before anything was enqueued
    │   ├── UnknownModel       no worker serves that model
    │   ├── PolicyDenied       the tenant may not use that model or priority
    │   ├── InputTooLarge      the sealed job would exceed the size limit
    │   ├── RateLimited        the tenant is over its rate or in-flight quota (retry_after_s)
    │   └── QueueFull          the priority's queue is at its maximum depth (retry_after_s)
    ├── JobError               a submitted job did not produce a result
    │   ├── JobRejected        a worker refused the job (reason: policy, expired, ...)
    │   │   └── JobExpired     ...because it waited in the queue past its expiry
    │   ├── JobFailed          the model ran and failed (reason: timeout, bad_input, ...)
    │   ├── JobCancelled       the job was cancelled
    │   └── UnknownJob         no such job (never submitted, or expired)
    ├── ResultTimeout          no result within the timeout (also a TimeoutError)
    ├── ServiceUnavailable     Redis (broker or result backend) unreachable: retry later
    ├── JobNotSucceeded        a job's delivery did not succeed (worker side: Flower shows it)
    └── ModelError             a model could not run an input (becomes JobFailed)
        └── ModelRejected      a model artifact failed verification and is not served

Untrusted input never gets a specific error: opening an envelope fails with
`InvalidEnvelope` whatever went wrong, and the reason goes to the audit log.
`ValueError`/`TypeError` are kept for programmer mistakes.
"""

from __future__ import annotations


class MaasError(Exception):
    """Root of every maas-worker error."""


class ConfigError(MaasError):
    """Raised when settings, flags or environment variables are invalid."""


class KeyringError(MaasError):
    """Raised when the keyring is missing, unreadable, unsafe or inconsistent."""


class UnknownTenant(KeyringError):
    """Raised when a tenant is not in the keyring or has no usable key."""


class InvalidEnvelope(MaasError):
    """Raised for every failure to open an envelope; deliberately carries no reason."""

    def __init__(self) -> None:
        super().__init__("invalid envelope")


class SubmitError(MaasError):
    """Raised when a job is refused at the client, before anything is enqueued."""


class UnknownModel(SubmitError):
    """Raised when no worker serves the requested model."""


class PolicyDenied(SubmitError):
    """Raised when the tenant's policy forbids the model or the priority."""


class InputTooLarge(SubmitError):
    """Raised when a job's sealed size exceeds the configured limit."""


class RateLimited(SubmitError):
    """Raised when the tenant is over its rate limit or its cap on jobs in flight.

    ``retry_after_s`` says when a token will be available (None when the cap on
    jobs in flight is the limit: retry once one of them has finished).
    """

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(SubmitError):
    """Raised when the priority's queue is at its maximum depth (backpressure)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobError(MaasError):
    """Raised when a submitted job did not produce a result."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(f"job {job_id}: {message}")
        self.job_id = job_id


class JobRejected(JobError):
    """Raised when a worker refused the job.

    ``reason`` is the audit reason word when the worker recorded one for this
    tenant's own authenticated message (``policy``, ``rate_limited``,
    ``unknown_key``, ...); None when it is not known (an older worker, or a
    message that did not authenticate). The details are in the audit log only.
    """

    def __init__(self, job_id: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(job_id, message)
        self.reason = reason


class JobFailed(JobError):
    """Raised when the model ran and failed; `reason` is a short code, never payload."""

    def __init__(self, job_id: str, reason: str, message: str) -> None:
        super().__init__(job_id, f"failed ({reason}): {message}")
        self.reason = reason


class JobCancelled(JobError):
    """Raised when the job was cancelled before it produced a result."""


class JobExpired(JobRejected):
    """Raised when the job waited in the queue past its expiry and was not run."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(job_id, message, reason="expired")


class UnknownJob(JobError):
    """Raised when no job with this id is known (never submitted, or expired)."""


class ResultTimeout(MaasError, TimeoutError):
    """Raised when a result did not arrive within the timeout."""


class ServiceUnavailable(MaasError):
    """Raised when the broker or result backend cannot be reached; safe to retry.

    ``job_ids`` is set when a submit lost its connection while sending: those
    jobs may have been enqueued all the same, so check their status once the
    broker is back before submitting them again.
    """

    def __init__(self, message: str, *, job_ids: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.job_ids = tuple(job_ids)


class JobNotSucceeded(MaasError):
    """Raised by the ``maas.infer`` task for a job that did not succeed, so Celery reports
    FAILURE (and Flower shows it); its text is outcome and reason words only.

    Worker side only: the message is acknowledged as for any finished job and Celery's
    result backend is not written (worker/task_state.py).
    """


class ModelError(MaasError):
    """Raised by a model that cannot run an input; the message must not echo payload."""

    def __init__(self, message: str, reason: str = "model_error") -> None:
        super().__init__(message)
        self.reason = reason


class ModelRejected(ModelError):
    """Raised when a model artifact fails verification (signature, signer, hash, decryption).

    The message names the check that failed, never a path or key material.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="model_rejected")


class EnvelopeRejected(InvalidEnvelope):
    """Raised inside the worker with the audit reason; still prints as "invalid envelope".

    ``reason`` is for the audit log only; ``unverified_header`` is whatever
    header could be parsed, which is untrusted unless ``authenticated``.
    """

    def __init__(
        self, reason: str, unverified_header: object | None = None, *, authenticated: bool = False
    ) -> None:
        super().__init__()
        self.reason = reason
        self.unverified_header = unverified_header
        self.authenticated = authenticated


def connection_cause(exc: BaseException) -> str:
    """Why a connection to Redis failed, in a few words that carry no data.

    Looks through the exception chain (redis-py and kombu wrap the socket or
    TLS error) for what an operator can act on: a certificate that does not
    verify, a refused or timed-out connection, a wrong password, an unknown
    host, a database the server does not have. Never the exception text of
    the outer errors, which can quote a URL, nor an exception's class name
    when there are words for it.
    """
    import socket
    import ssl

    import redis

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return "TLS: certificate verify failed" + (
                f": {e.verify_message}" if e.verify_message else ""
            )
        if isinstance(e, ssl.SSLEOFError):
            return "TLS: the server ended the handshake (does it require a client certificate?)"
        if isinstance(e, ssl.SSLError):
            reason = e.reason or type(e).__name__
            if "CERTIFICATE_REQUIRED" in reason:
                return "TLS: the server requires a client certificate"
            return f"TLS: {reason.lower().replace('_', ' ')}"
    for e in chain:
        if isinstance(e, redis.AuthenticationError) or "WRONGPASS" in str(e)[:64]:
            return "authentication failed"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, TimeoutError | socket.timeout | redis.TimeoutError):
            return "timed out"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(e, socket.gaierror):
            return f"unknown host ({e.strerror})" if e.strerror else "unknown host"
        if isinstance(e, redis.ResponseError):
            # The server's own words, of which only the error code is repeated:
            # a command's error can quote its arguments.
            text = str(e)
            if "DB index is out of range" in text:
                return "no such database on the server (DB index is out of range)"
            code = text.split(" ", 1)[0]
            if code == "NOPERM":
                return "the Redis user may not run that command (NOPERM)"
            return f"the server refused a command ({code})" if code.isupper() else "server error"
    last = chain[-1]
    if isinstance(last, OSError) and last.strerror:
        return last.strerror
    return type(last).__name__
