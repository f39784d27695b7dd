"""Following one submitted job: its state, its result, cancelling it.

A `Job` comes from `Client.submit` (or `Client.job` for an id known from
elsewhere). A job is (tenant, job id): a handle reads and writes only its
client's tenant's keys, so it never sees, waits on or cancels another
tenant's job of the same id. Everything it reads from Redis is untrusted: a
result counts only once it opens with this tenant's key and names this job
(and, for a job this client submitted, this exact request).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import redis

from maas_worker.backend import keyspace
from maas_worker.crypto.envelope import now_ms, open_envelope
from maas_worker.errors import (
    InvalidEnvelope,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobRejected,
    ResultTimeout,
    ServiceUnavailable,
    UnknownJob,
    connection_cause,
)
from maas_worker.protocol import JobInfo, JobState, ResultDoc, read_rejected_marker
from maas_worker.settings import Settings, redact_url
from maas_worker.tenancy.cancellation import make_token, verify_token

if TYPE_CHECKING:
    from maas_worker.client.client import Client

#: Longest single blocking wait on Redis while waiting for a result; short so a
#: second waiter whose wake-up was taken still notices the result soon.
_WAIT_SLICE_S = 1.0
#: Bytes an envelope adds around a result's plaintext (header, nonce, tag, MAC).
_ENVELOPE_OVERHEAD = 1024


@contextlib.contextmanager
def backend_errors(settings: Settings) -> Iterator[None]:
    """Turn connection failures of the result backend into `ServiceUnavailable`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(
            f"result backend unavailable ({redact_url(settings.result_backend)}: "
            f"{connection_cause(exc)}); retry later"
        ) from None


class Job:
    """One submitted job: its id, state and (sealed-for-you) result."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        *,
        request_hash: bytes | None = None,
        worker_live: bool | None = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self._request_hash = request_hash
        self.tenant = client.tenant
        #: Whether any worker was live when the job was submitted: False means it
        #: waits in its queue until one starts (None: not known, e.g. `Client.job`).
        self.worker_live = worker_live

    def __repr__(self) -> str:
        return f"Job(id={self.id!r})"

    def _open(self, sealed: bytes) -> ResultDoc:
        s = self.client.settings
        header, body = open_envelope(
            sealed,
            expect="result",
            keyring=self.client.own_keyring(),
            max_bytes=s.max_result_bytes + _ENVELOPE_OVERHEAD,
            skew_ms=s.clock_skew_s * 1000,
            crypto=self.client.crypto,
        )
        if (
            header.job_id != self.id
            or header.tenant != self.client.tenant
            or (self._request_hash is not None and header.request_hash != self._request_hash)
        ):
            raise InvalidEnvelope()
        return ResultDoc.from_json(body)

    def _cancelled(self, token: bytes | None) -> bool:
        return verify_token(token, self.client.keyring, self.client.tenant, self.id)

    def info(self) -> JobInfo:
        """The job's id, `JobState`, ``reason`` (failed and rejected jobs) and ``model``.

        ``model`` is the ``name@version`` that ran the job, from its sealed
        result (None until there is one, and for jobs that never ran).

        States: ``queued``, ``running``, ``succeeded``, ``failed``, ``rejected``,
        ``cancelled``, ``expired``. The reason is a short code, never payload:
        for a failed job its failure code (``timeout``, ``bad_input``,
        ``worker_lost``, ...), for a rejected one the audit reason of its own
        refused message (``policy``, ``rate_limited``, ``unknown_key``, ...;
        None from workers before 0.2); the details are in the audit log only.
        Raises `UnknownJob` for an unknown (or long expired) job id.
        """
        r = self.client.backend
        t, j = self.tenant, self.id
        pipe = r.pipeline(transaction=False)
        for key in (
            keyspace.result(t, j),
            keyspace.rejected(t, j),
            keyspace.cancel(t, j),
            keyspace.claim(t, j),
            keyspace.submitted(t, j),
        ):
            pipe.get(key)
        with backend_errors(self.client.settings):
            sealed, rejected, cancel, claim, submitted = pipe.execute()
        doc = self._open(sealed) if sealed is not None else None
        state, reason = self._state(doc, rejected, cancel, claim, submitted)
        return JobInfo(self.id, state, reason, doc.model if doc is not None else None)

    def _state(
        self,
        doc: ResultDoc | None,
        rejected: bytes | None,
        cancel: bytes | None,
        claim: bytes | None,
        submitted: bytes | None,
    ) -> tuple[JobState, str | None]:
        if doc is not None:
            if doc.ok:
                return JobState.SUCCEEDED, None
            return (JobState.CANCELLED, None) if doc.cancelled else (JobState.FAILED, doc.error)
        if rejected is not None:
            # The worker wrote the state and reason a client sees (claims.JobGuard.mark_rejected).
            return read_rejected_marker(rejected)
        if cancel is not None and self._cancelled(cancel):
            return JobState.CANCELLED, None
        if claim is not None and claim != b"done":
            return JobState.RUNNING, None
        if submitted is not None:
            expires = int(submitted) if submitted.isdigit() else None
            skew_ms = self.client.settings.clock_skew_s * 1000
            if expires is not None and now_ms() > expires + skew_ms:
                return JobState.EXPIRED, None
            return JobState.QUEUED, None
        raise UnknownJob(self.id, "unknown job (never submitted, or expired)")

    def exists(self) -> bool:
        """Whether this tenant has a job of this id (queued, running or finished).

        False for an id never submitted by this tenant (another tenant's job id
        included) or long expired, and also for a message sent without
        `Client.submit` (no queued marker) until a worker takes it.
        """
        t, j = self.tenant, self.id
        with backend_errors(self.client.settings):
            found = self.client.backend.exists(
                keyspace.result(t, j),
                keyspace.rejected(t, j),
                keyspace.cancel(t, j),
                keyspace.claim(t, j),
                keyspace.submitted(t, j),
                # a refused message naming it: `result` says so when its wait ends
                keyspace.suspect(t, j),
            )
        return bool(found)

    def status(self) -> JobState:
        """The job's state (see `info`): a `JobState`, equal to its string (``"queued"``)."""
        return self.info().state

    def cancel(self) -> bool:
        """Ask for the job to be cancelled; False if it had already finished.

        A queued job then never runs; a running one is interrupted within about
        a second (its process is ended if it does not stop within a few more).
        The request is kept in Redis, so it survives worker restarts, and is
        signed with this tenant's key: no other tenant can cancel the job.
        Raises `UnknownJob` if this tenant has no job of this id (another
        tenant's job id is unknown here too: nothing is written).
        """
        token = make_token(self.client.keyring, self.tenant, self.id)
        s = self.client.settings
        default_ms = (s.job_ttl_s + s.result_ttl_s) * 1000
        t, j = self.tenant, self.id
        with backend_errors(s):
            done = int(
                self.client.cancel_script(
                    keys=[
                        keyspace.result(t, j),
                        keyspace.cancel(t, j),
                        keyspace.done(t, j),
                        keyspace.submitted(t, j),
                        keyspace.rejected(t, j),
                        keyspace.claim(t, j),
                        keyspace.pending(t),
                    ],
                    args=[token, default_ms, s.result_ttl_s * 1000, j, keyspace.MAX_TTL_MS],
                )
            )
        if done < 0:
            raise UnknownJob(
                self.id,
                f"unknown job: no job of tenant {self.tenant!r} with this id "
                "(never submitted by this tenant, or expired); nothing cancelled",
            )
        return bool(done)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the result and return the model's output.

        Raises `JobFailed` if the model failed (``reason`` says why: ``timeout``,
        ``bad_input``, ...), `JobCancelled`, `JobExpired`, `JobRejected` if a
        worker refused the job, `ResultTimeout` after ``timeout`` seconds,
        `ServiceUnavailable` if Redis cannot be reached (its message names the
        job), and `InvalidEnvelope` if what is stored is not a genuine result for
        this job. A wait that ends without the result raises `ResultTimeout`,
        saying whether the job is still queued or running and whether any worker
        is live; or `UnknownJob` if by then no key of this tenant's names the job
        (`exists` asks before waiting).
        """
        try:
            with backend_errors(self.client.settings):
                return self._wait(timeout)
        except ServiceUnavailable as exc:
            # Name the job: the caller may have no other record of its id.
            raise ServiceUnavailable(f"job {self.id}: {exc}") from None

    def _wait(self, timeout: float | None) -> dict[str, Any]:
        r = self.client.backend
        t, j = self.tenant, self.id
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Fast path: most results are already there when asked for.
            sealed: Any = r.get(keyspace.result(t, j))
            rejected = cancel = claim = None
            if sealed is None:
                pipe = r.pipeline(transaction=False)
                for key in (
                    keyspace.result(t, j),
                    keyspace.rejected(t, j),
                    keyspace.cancel(t, j),
                    keyspace.claim(t, j),
                ):
                    pipe.get(key)
                sealed, rejected, cancel, claim = pipe.execute()
            if sealed is not None:
                doc = self._open(sealed)
                if doc.ok:
                    output: dict[str, Any] = doc.output
                    return output
                if doc.cancelled:
                    raise JobCancelled(self.id, "cancelled")
                raise JobFailed(self.id, str(doc.error), doc.message)
            if rejected == JobState.EXPIRED.encode():
                raise JobExpired(self.id, "expired in the queue before a worker ran it")
            if rejected is not None:
                _, why = read_rejected_marker(rejected)
                said = f": {why}" if why is not None else ""
                raise JobRejected(
                    self.id, f"rejected by a worker{said} (see `maas-worker audit`)", reason=why
                )
            # A running job still stores a (cancelled) result: wait for it.
            if (
                cancel is not None
                and (claim is None or claim == b"done")
                and self._cancelled(cancel)
            ):
                raise JobCancelled(self.id, "cancelled")
            wait = _WAIT_SLICE_S
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timed_out(timeout, claim)
                wait = min(wait, remaining)
            r.blpop([keyspace.done(t, j)], timeout=max(wait, 0.01))

    def _timed_out(self, timeout: float | None, claim: bytes | None) -> NoReturn:
        """Raise at the end of a wait: `ResultTimeout` (saying where the job stands), or
        `JobRejected` if the job never started and a worker refused a message naming it
        that did not authenticate.

        That message may have been this job's own, altered in Redis or sealed
        with a key version the workers have retired (the job is then gone), or
        a forgery sent to make it look refused (the job is then still queued
        and may yet run): only the wait's end tells them apart.
        """
        suspect = claim is None and self.client.backend.exists(
            keyspace.suspect(self.tenant, self.id)
        )
        if suspect:
            raise JobRejected(
                self.id,
                f"no result within {timeout:g} s; a worker refused a "
                "message carrying this job id that did not authenticate "
                "(altered or forged in Redis, or sealed with a key the "
                "workers do not hold; see `maas-worker audit`); the job has "
                "not started",
            )
        raise ResultTimeout(f"no result within {timeout:g} s: {self.waiting()}")

    def waiting(self) -> str:
        """Where the job stands, for a wait that ends without its result:
        ``job <id> is still queued and no worker is consuming``, ``job <id> is
        still running (1 worker live)``, ... (`UnknownJob` if there is no such job)."""
        state = self.info().state
        if state not in (JobState.QUEUED, JobState.RUNNING):
            return f"job {self.id} is {state}"
        live = self.client.live_workers()
        where = (
            f" ({live} worker{'s' if live != 1 else ''} live)"
            if live
            else " and no worker is consuming"
        )
        return f"job {self.id} is still {state}{where}"
