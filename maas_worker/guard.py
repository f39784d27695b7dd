"""Replay protection, the job lease, and the write-once result store.

A job's claim key is both the replay cache and a lease:

* absent, no result     -> ``claimed``: this worker runs the job;
* holds a live holder   -> ``busy``: another worker is running it right now;
  the message is retried later rather than dropped, so if that worker dies the
  job is not lost;
* holds ``done``, or a result is stored -> ``replayed``: never run again;
* a job that has already started `DEFAULT_MAX_ATTEMPTS` times, each run ended
  by a dead worker -> ``exhausted``: failed (``worker_lost``), not run again.

While a job runs, its holder renews the claim's short TTL (the lease) from a
heartbeat thread. A worker killed mid-job stops renewing; once the lease lapses
the redelivered message finds no claim and no result and runs the job again, so
a crash loses nothing. Each transition is one Lua script, so two workers can
never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from . import keyspace
from .quota import ADMIT_FUNCTION

log = logging.getLogger(__name__)

ClaimOutcome = Literal["claimed", "busy", "replayed", "exhausted", "cancelled",
                       "rate_limited"]

#: Runs a job may start before it is failed with ``worker_lost`` instead: a
#: job that kills its worker every time must not be redelivered forever.
DEFAULT_MAX_ATTEMPTS = 3
#: How long the attempt count is remembered when the caller gives no window.
DEFAULT_ATTEMPTS_WINDOW_MS = 24 * 3600 * 1000

# KEYS: claim, result, attempts, cancel [, bucket, in-flight, admitted].
# ARGV: holder, lease ms, attempts window ms, max attempts, ignore cancel
#       [, job, rate, burst, max in flight, expiry ms].
# Replies {outcome, detail}: the cancel token for 'cancelled', the wait in ms
# for 'rate_limited' ('' when over the in-flight cap).
_CLAIM = ADMIT_FUNCTION + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'replayed', ''} end
local cur = redis.call('GET', KEYS[1])
if cur == 'done' then return {'replayed', ''} end
if cur then return {'busy', ''} end
if ARGV[5] ~= '1' then
  local c = redis.call('GET', KEYS[4])
  if c then return {'cancelled', c} end
end
if #KEYS > 4 then
  local v = admit(KEYS[5], KEYS[6], KEYS[7], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]),
                  tonumber(ARGV[9]), tonumber(ARGV[10]))
  if v[1] == 0 then return {'rate_limited', tostring(v[2])} end
  if v[1] == -1 then return {'rate_limited', ''} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if n > tonumber(ARGV[4]) then return {'exhausted', ''} end
return {'claimed', ''}
"""

# Read a claim-checked request without pulling an oversized one over the wire.
_FETCH = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return false end
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return -1 end
return redis.call('GET', KEYS[1])
"""

# Close a job that will never run (cancelled before it started): replays of it
# are recognised, and a waiting client wakes up.
_CLOSE = """
redis.call('DEL', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], 'done', 'PX', ARGV[1])
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Store once; mark the claim done for as long as the request could be replayed;
# wake a waiting client. Returns 1 if this call stored the result, 0 if one was
# already there (the first result is kept unchanged).
_STORE = """
local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('SET', KEYS[2], 'done', 'PX', ARGV[3])
redis.call('DEL', KEYS[4])
if stored then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return 1
end
return 0
"""

# A rejection never touches a stored result, nor a job another live holder is
# running (that run decides the outcome: a stale or forged copy must not make
# its client give up). ARGV[2] = '1' when the message was authenticated: then
# the claim is closed too, so the job cannot run later. ARGV[4] is the state a
# client sees: 'expired' or 'rejected'.
_REJECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local cur = redis.call('GET', KEYS[4])
if cur and cur ~= 'done' and cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[1])
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[1])
if ARGV[2] == '1' then
  redis.call('SET', KEYS[4], 'done', 'PX', ARGV[1])
  redis.call('DEL', KEYS[5])
end
return 1
"""


@dataclass(frozen=True)
class ClaimRequest:
    """One job of `JobGuard.claim_many`: its id, replay window and quota admission."""

    job_id: str
    window_ms: int
    admission: tuple[list[str], list[str | float]] | None = None


@dataclass(frozen=True)
class Claim:
    """What `JobGuard.claim_job` decided, with its detail.

    ``cancel_token`` is the (unverified) cancellation request for
    ``cancelled``; ``retry_after_s`` the wait for ``rate_limited`` (None when
    the tenant is over its in-flight cap rather than its rate).
    """

    outcome: ClaimOutcome
    cancel_token: str | None = None
    retry_after_s: float | None = None


def new_holder_id() -> str:
    """A claim holder id unique to this process (host, pid and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobGuard:
    """Claims, leases and write-once results for one process."""

    def __init__(self, client: redis.Redis, *, lease_s: int, holder: str | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self._r = client
        self.lease_ms = lease_s * 1000
        self.max_attempts = max_attempts
        self.holder = holder or new_holder_id()
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._store = client.register_script(_STORE)
        self._reject = client.register_script(_REJECT)
        self._close = client.register_script(_CLOSE)
        self._fetch = client.register_script(_FETCH)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def claim(self, job_id: str, *,
              window_ms: int = DEFAULT_ATTEMPTS_WINDOW_MS) -> ClaimOutcome:
        """`claim_job` without quotas, returning only the outcome."""
        return self.claim_job(job_id, window_ms=window_ms).outcome

    def claim_job(self, job_id: str, *, window_ms: int = DEFAULT_ATTEMPTS_WINDOW_MS,
                  admission: tuple[list[str], list[str | float]] | None = None,
                  ignore_cancel: bool = False) -> Claim:
        """Try to take the job (see the module docstring), in one round trip.

        ``exhausted`` means this process now holds the claim, but the job has
        already started `max_attempts` times (each ended by a dead worker): the
        caller must fail it without running it. ``window_ms`` is how long the
        attempt count is kept (the request's remaining lifetime). ``admission``
        (keys and args from `quota`) charges the tenant's quota unless the
        client already did; ``cancelled`` returns the cancel request for the
        caller to verify (the job is not claimed).
        """
        keys, args = self._claim_call(ClaimRequest(job_id, window_ms, admission),
                                      ignore_cancel=ignore_cancel)
        return self._claimed(job_id, self._claim(keys=keys, args=args))

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Claim]:
        """`claim_job` for many jobs in ONE round trip (the same script, pipelined)."""
        replies = self._eval_many(self._claim, [self._claim_call(req) for req in requests])
        return [self._claimed(req.job_id, reply) for req, reply in zip(requests, replies,
                                                                        strict=True)]

    def _claim_call(self, req: ClaimRequest, *,
                    ignore_cancel: bool = False) -> tuple[list[str], list[Any]]:
        """The claim script's keys and arguments for one job."""
        keys = [keyspace.claim(req.job_id), keyspace.result(req.job_id),
                keyspace.attempts(req.job_id), keyspace.cancel(req.job_id)]
        args: list[Any] = [self.holder, self.lease_ms, max(req.window_ms, 1),
                           self.max_attempts, "1" if ignore_cancel else "0"]
        if req.admission is not None:
            keys += req.admission[0]
            args += req.admission[1]
        return keys, args

    def _claimed(self, job_id: str, reply: Any) -> Claim:
        raw_outcome, raw_detail = reply
        outcome = _text(raw_outcome)
        detail = _text(raw_detail)
        if outcome in ("claimed", "exhausted"):
            with self._held_lock:
                self._held.add(job_id)
        if outcome == "cancelled":
            return Claim("cancelled", cancel_token=detail)
        if outcome == "rate_limited":
            return Claim("rate_limited", retry_after_s=int(detail) / 1000 if detail else None)
        return Claim(outcome)  # type: ignore[arg-type]

    def close(self, job_id: str, *, window_ms: int) -> None:
        """Close a job that will never run (cancelled): replays are recognised as such."""
        self._close(keys=[keyspace.result(job_id), keyspace.claim(job_id),
                          keyspace.done(job_id), keyspace.payload(job_id)],
                    args=[max(window_ms, 1)])

    def held(self) -> list[str]:
        """Jobs this process is running now."""
        with self._held_lock:
            return list(self._held)

    def renew_all(self) -> None:
        """Extend the lease of every job this process holds (heartbeat thread)."""
        with self._held_lock:
            held = list(self._held)
        for job_id in held:
            self._renew(keys=[keyspace.claim(job_id)], args=[self.holder, self.lease_ms])

    def release(self, job_id: str) -> None:
        """Give a claim back without a result (the job will be retried)."""
        self._forget(job_id)
        self._release(keys=[keyspace.claim(job_id)], args=[self.holder])

    def store_result(self, job_id: str, sealed: bytes, *, result_ttl_s: int,
                     replay_window_ms: int) -> bool:
        """Store the sealed result once; False if a result was already stored."""
        self._forget(job_id)
        keys, args = _store_call(job_id, sealed, replay_window_ms, result_ttl_s)
        return bool(self._store(keys=keys, args=args))

    def store_many(self, results: Sequence[tuple[str, bytes, int]], *,
                   result_ttl_s: int) -> list[bool]:
        """`store_result` for many ``(job id, sealed, replay window ms)`` in ONE round trip."""
        for job_id, _, _ in results:
            self._forget(job_id)
        replies = self._eval_many(self._store, [_store_call(job_id, sealed, window, result_ttl_s)
                                                for job_id, sealed, window in results])
        return [bool(r) for r in replies]

    def fetch_payloads(self, job_ids: Sequence[str],
                       max_bytes: int) -> list[bytes | int | None]:
        """`fetch_payload` for many jobs in ONE round trip."""
        replies = self._eval_many(self._fetch, [([keyspace.payload(j)], [max_bytes])
                                                for j in job_ids])
        return [-1 if r == -1 else r if isinstance(r, bytes) and r else None for r in replies]

    def _eval_many(self, script: Script,
                   calls: Sequence[tuple[list[str], Sequence[Any]]]) -> list[Any]:
        """Run ``script`` once per call in one pipeline; the replies, in order.

        EVALSHA directly: a pipeline given redis-py Script objects checks
        ``SCRIPT EXISTS`` first, a second round trip every time. After a Redis
        restart (empty script cache) the script is loaded and the calls rerun:
        a NOSCRIPT reply means the call did nothing.
        """
        if not calls:
            return []
        for attempt in range(2):
            pipe = self._r.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            if attempt == 0:
                script.sha = self._r.script_load(script.script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    def fetch_payload(self, job_id: str, max_bytes: int) -> bytes | int | None:
        """The job's claim-checked request; None if absent, -1 if over ``max_bytes``."""
        data = self._fetch(keys=[keyspace.payload(job_id)], args=[max_bytes])
        if data == -1:
            return -1
        return data if isinstance(data, bytes) and data else None

    def mark_rejected(self, job_id: str, *, ttl_s: int, authenticated: bool,
                      state: str = "rejected") -> None:
        """Record that a message with this job id was refused (never over a result).

        ``state`` is what the client's status shows: ``rejected`` or ``expired``.
        """
        self._forget(job_id)
        self._reject(
            keys=[keyspace.result(job_id), keyspace.rejected(job_id), keyspace.done(job_id),
                  keyspace.claim(job_id), keyspace.payload(job_id)],
            args=[ttl_s * 1000, "1" if authenticated else "0", self.holder, state])

    def _forget(self, job_id: str) -> None:
        with self._held_lock:
            self._held.discard(job_id)


def _store_call(job_id: str, sealed: bytes, replay_window_ms: int,
                result_ttl_s: int) -> tuple[list[str], list[Any]]:
    """The store script's keys and arguments for one result."""
    keep_ms = max(replay_window_ms, result_ttl_s * 1000, 1)
    return ([keyspace.result(job_id), keyspace.claim(job_id), keyspace.done(job_id),
             keyspace.payload(job_id)], [sealed, result_ttl_s * 1000, keep_ms])


def _text(value: bytes | str | int | None) -> str:
    if isinstance(value, bytes):
        # The cancel request comes back as the detail: whatever a Redis writer
        # stored there, it must fail verification, not the decoding.
        return value.decode(errors="replace")
    return "" if value is None else str(value)


class LeaseKeeper:
    """Daemon thread renewing this process's leases every third of the lease."""

    def __init__(self, guard: JobGuard) -> None:
        self._guard = guard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maas-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (leases then lapse on their own)."""
        self._stop.set()

    def _run(self) -> None:
        interval = self._guard.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                self._guard.renew_all()
            except redis.RedisError:
                log.warning("lease renewal failed; retrying", exc_info=False)
