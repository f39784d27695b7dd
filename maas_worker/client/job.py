"""Following one submitted job: its state, its result, cancelling it.

A `Job` comes from `Client.submit` (or `Client.job` for an id known from
elsewhere). A job is (tenant, job id): a handle reads and writes only its
client's tenant's keys, so it never sees, waits on or cancels another
tenant's job of the same id. Everything it reads from Redis is untrusted: a
result counts only once it opens with this tenant's key and names this job
(and, for a job this client submitted, this exact request). The rules are
`JobCore`'s (jobcore.py), shared with `AsyncJob`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import redis

from maas_worker.backend import keyspace
from maas_worker.client.core import run_plan
from maas_worker.client.jobcore import JobCore
from maas_worker.errors import ServiceUnavailable, connection_cause
from maas_worker.protocol import JobInfo, JobState
from maas_worker.settings import Settings, redact_url

if TYPE_CHECKING:
    from maas_worker.client.client import Client

#: Longest single blocking wait on Redis while waiting for a result; short so a
#: second waiter whose wake-up was taken still notices the result soon.
WAIT_SLICE_S = 1.0


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


class Job(JobCore):
    """One submitted job: its id, state and (sealed-for-you) result."""

    client: Client
    #: The outcome `Client.as_completed` learnt (the output, or the error `result`
    #: raises), so `result` needs no further round trip.
    _outcome: dict[str, Any] | BaseException | None = None

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
        with backend_errors(self.client.settings):
            return run_plan(self.client.backend, self.info_plan())

    def exists(self) -> bool:
        """Whether this tenant has a job of this id (queued, running or finished).

        False for an id never submitted by this tenant (another tenant's job id
        included) or long expired, and also for a message sent without
        `Client.submit` (no queued marker) until a worker takes it.
        """
        with backend_errors(self.client.settings):
            return run_plan(self.client.backend, self.exists_plan())

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
        _, keys, args = self.cancel_call()
        with backend_errors(self.client.settings):
            reply = self.client.cancel_script(keys=keys, args=args)
        return self.cancel_reply(reply)

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
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        if self._outcome is not None:
            return self._outcome
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
            if sealed is not None:
                output, claim = self.outcome([sealed, None, None, None])
            else:
                output, claim = run_plan(r, self.wait_plan())
            if output is not None:
                return output
            wait = WAIT_SLICE_S
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timed_out(timeout, claim)
                wait = min(wait, remaining)
            r.blpop([keyspace.done(t, j)], timeout=max(wait, 0.01))

    def _timed_out(self, timeout: float | None, claim: bytes | None) -> NoReturn:
        suspect = claim is None and bool(self.client.backend.exists(self.suspect_key()))
        self.timed_out(timeout, suspect, "" if suspect else self.waiting())

    def waiting(self) -> str:
        """Where the job stands, for a wait that ends without its result:
        ``job <id> is still queued and no worker is consuming``, ``job <id> is
        still running (1 worker live)``, ... (`UnknownJob` if there is no such job)."""
        state = self.info().state
        live = self.client.live_workers() if state in (JobState.QUEUED, JobState.RUNNING) else None
        return self.waiting_text(state, live)
