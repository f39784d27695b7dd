"""The rules of following a job, without I/O: what `Job` and `AsyncJob` share.

Which keys say where a job stands, how their values are read (a result
counts only once it opens with this tenant's key and names this job and,
for a job this client submitted, this exact request), what a wait ends with,
and the cancel request. `Job` (job.py) and `AsyncJob` (aio.py) only send the
commands and hand the replies back here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from maas_worker.backend import functions, keyspace
from maas_worker.client.core import Plan
from maas_worker.crypto.envelope import now_ms, open_envelope
from maas_worker.errors import (
    InvalidEnvelope,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobRejected,
    ResultTimeout,
    UnknownJob,
)
from maas_worker.protocol import JobInfo, JobState, ResultDoc, read_rejected_marker
from maas_worker.tenancy.cancellation import verify_token

if TYPE_CHECKING:
    from maas_worker.client.core import ClientCore

#: Bytes an envelope adds around a result's plaintext (header, nonce, tag, MAC).
_ENVELOPE_OVERHEAD = 1024


def wait_keys(tenant: str, job_id: str) -> list[str]:
    """The keys whose values end a wait: result, rejected marker, cancel request, claim."""
    return [
        keyspace.result(tenant, job_id),
        keyspace.rejected(tenant, job_id),
        keyspace.cancel(tenant, job_id),
        keyspace.claim(tenant, job_id),
    ]


class JobCore:
    """One submitted job of a client's tenant: its id and the rules that read its keys."""

    def __init__(
        self,
        client: ClientCore,
        job_id: str,
        *,
        request_hash: bytes | None = None,
        worker_live: bool | None = None,
    ) -> None:
        self.id = job_id
        #: The client this handle reads and writes through.
        self.client = client
        self._core = client
        self._request_hash = request_hash
        self.tenant = client.tenant
        #: Whether any worker was live when the job was submitted: False means it
        #: waits in its queue until one starts (None: not known, e.g. `Client.job`).
        self.worker_live = worker_live

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"

    # -- reading what Redis holds (untrusted) -------------------------------------
    def _open(self, sealed: bytes) -> ResultDoc:
        s = self._core.settings
        header, body = open_envelope(
            sealed,
            expect="result",
            keyring=self._core.own_keyring(),
            max_bytes=s.max_result_bytes + _ENVELOPE_OVERHEAD,
            skew_ms=s.clock_skew_s * 1000,
            crypto=self._core.crypto,
        )
        if (
            header.job_id != self.id
            or header.tenant != self._core.tenant
            or (self._request_hash is not None and header.request_hash != self._request_hash)
        ):
            raise InvalidEnvelope()
        return ResultDoc.from_json(body)

    def _cancelled(self, token: bytes | None) -> bool:
        return verify_token(token, self._core.keyring, self._core.tenant, self.id)

    def info_plan(self) -> Plan[JobInfo]:
        """Read the job's `JobInfo` (see `Job.info`) in one round trip."""
        keys = [*wait_keys(self.tenant, self.id), keyspace.submitted(self.tenant, self.id)]

        def parse(replies: list[Any]) -> JobInfo:
            sealed, rejected, cancel, claim, submitted = replies
            doc = self._open(sealed) if sealed is not None else None
            state, reason = self._state(doc, rejected, cancel, claim, submitted)
            return JobInfo(self.id, state, reason, doc.model if doc is not None else None)

        return Plan([("GET", k) for k in keys], parse)

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
            skew_ms = self._core.settings.clock_skew_s * 1000
            if expires is not None and now_ms() > expires + skew_ms:
                return JobState.EXPIRED, None
            return JobState.QUEUED, None
        raise UnknownJob(self.id, "unknown job (never submitted, or expired)")

    def exists_plan(self) -> Plan[bool]:
        """Whether this tenant has a job of this id (see `Job.exists`)."""
        t, j = self.tenant, self.id
        keys = [
            *wait_keys(t, j),
            keyspace.submitted(t, j),
            # a refused message naming it: `result` says so when its wait ends
            keyspace.suspect(t, j),
        ]
        return Plan([("EXISTS", *keys)], lambda replies: bool(replies[0]))

    def wait_plan(self) -> Plan[tuple[dict[str, Any] | None, bytes | None]]:
        """Read the keys that end a wait: ``(output, claim)`` with ``output`` None while the
        job is pending; raises as `Job.result` does once it has ended without output."""
        return Plan([("GET", k) for k in wait_keys(self.tenant, self.id)], self.outcome)

    def outcome(self, replies: list[Any]) -> tuple[dict[str, Any] | None, bytes | None]:
        """What the values of `wait_keys` say: ``(output, claim)``, output None while the
        job has not ended; raises `JobFailed`, `JobCancelled`, `JobExpired`,
        `JobRejected` or `InvalidEnvelope` for an ended job without output."""
        sealed, rejected, cancel, claim = replies
        if sealed is not None:
            doc = self._open(sealed)
            if doc.ok:
                output: dict[str, Any] = doc.output
                return output, claim
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
        if cancel is not None and (claim is None or claim == b"done") and self._cancelled(cancel):
            raise JobCancelled(self.id, "cancelled")
        return None, claim

    def timed_out(self, timeout: float | None, suspect: bool, where: str) -> NoReturn:
        """Raise at the end of a wait: `ResultTimeout` saying ``where`` the job stands
        (`waiting_text`), or `JobRejected` if it never started (no claim) and a worker
        refused a message naming it that did not authenticate (``suspect``).

        That message may have been this job's own, altered in Redis or sealed
        with a key version the workers have retired (the job is then gone), or
        a forgery sent to make it look refused (the job is then still queued
        and may yet run): only the wait's end tells them apart.
        """
        if suspect:
            raise JobRejected(
                self.id,
                f"no result within {timeout:g} s; a worker refused a "
                "message carrying this job id that did not authenticate "
                "(altered or forged in Redis, or sealed with a key the "
                "workers do not hold; see `maas-worker audit`); the job has "
                "not started",
            )
        raise ResultTimeout(f"no result within {timeout:g} s: {where}")

    def claim_key(self) -> str:
        """The job's claim: its holder while it runs, ``done`` once it has."""
        return keyspace.claim(self.tenant, self.id)

    def suspect_key(self) -> str:
        """The marker of a refused message naming this job that did not authenticate."""
        return keyspace.suspect(self.tenant, self.id)

    def waiting_text(self, state: JobState, live: int | None) -> str:
        """Where the job stands at the end of a wait (``live``: worker count, read only
        for a queued or running job)."""
        if state not in (JobState.QUEUED, JobState.RUNNING) or live is None:
            return f"job {self.id} is {state}"
        where = (
            f" ({live} worker{'s' if live != 1 else ''} live)"
            if live
            else " and no worker is consuming"
        )
        return f"job {self.id} is still {state}{where}"

    def cancel_call(self) -> tuple[str, list[str], list[Any]]:
        """The cancel request as (library function, keys, args) for ``FCALL``."""
        token = self._core.cancel_token(self.id)
        s = self._core.settings
        default_ms = (s.job_ttl_s + s.result_ttl_s) * 1000
        t, j = self.tenant, self.id
        keys = [
            keyspace.result(t, j),
            keyspace.cancel(t, j),
            keyspace.done(t, j),
            keyspace.submitted(t, j),
            keyspace.rejected(t, j),
            keyspace.claim(t, j),
            keyspace.pending(t),
        ]
        args = [token, default_ms, s.result_ttl_s * 1000, j, keyspace.MAX_TTL_MS]
        return functions.CANCEL, keys, args

    def cancel_reply(self, reply: Any) -> bool:
        """Read the cancel function's reply: False if the job had finished; `UnknownJob`
        if this tenant has no job of this id."""
        if int(reply) < 0:
            raise UnknownJob(
                self.id,
                f"unknown job: no job of tenant {self.tenant!r} with this id "
                "(never submitted by this tenant, or expired); nothing cancelled",
            )
        return bool(int(reply))
