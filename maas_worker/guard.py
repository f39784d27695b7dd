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
from typing import Literal

import redis

from . import keyspace

log = logging.getLogger(__name__)

ClaimOutcome = Literal["claimed", "busy", "replayed", "exhausted"]

#: Runs a job may start before it is failed with ``worker_lost`` instead: a
#: job that kills its worker every time must not be redelivered forever.
DEFAULT_MAX_ATTEMPTS = 3
#: How long the attempt count is remembered when the caller gives no window.
DEFAULT_ATTEMPTS_WINDOW_MS = 24 * 3600 * 1000

# KEYS: claim, result, attempts. ARGV: holder, lease ms, attempts window ms, max attempts.
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'replayed' end
local cur = redis.call('GET', KEYS[1])
if cur == 'done' then return 'replayed' end
if cur then return 'busy' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if n > tonumber(ARGV[4]) then return 'exhausted' end
return 'claimed'
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
# the claim is closed too, so the job cannot run later.
_REJECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local cur = redis.call('GET', KEYS[4])
if cur and cur ~= 'done' and cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[4], 'done', 'PX', ARGV[1]) end
return 1
"""


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
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def claim(self, job_id: str, *,
              window_ms: int = DEFAULT_ATTEMPTS_WINDOW_MS) -> ClaimOutcome:
        """Try to take the job (see the module docstring for the outcomes).

        ``exhausted`` means this process now holds the claim, but the job has
        already started `max_attempts` times (each ended by a dead worker): the
        caller must fail it without running it. ``window_ms`` is how long the
        attempt count is kept (the request's remaining lifetime).
        """
        out = self._claim(
            keys=[keyspace.claim(job_id), keyspace.result(job_id), keyspace.attempts(job_id)],
            args=[self.holder, self.lease_ms, max(window_ms, 1), self.max_attempts])
        outcome = out.decode() if isinstance(out, bytes) else str(out)
        if outcome in ("claimed", "exhausted"):
            with self._held_lock:
                self._held.add(job_id)
        return outcome  # type: ignore[return-value]

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
        keep_ms = max(replay_window_ms, result_ttl_s * 1000, 1)
        stored = self._store(
            keys=[keyspace.result(job_id), keyspace.claim(job_id), keyspace.done(job_id)],
            args=[sealed, result_ttl_s * 1000, keep_ms])
        return bool(stored)

    def mark_rejected(self, job_id: str, *, ttl_s: int, authenticated: bool) -> None:
        """Record that a message with this job id was refused (never over a result)."""
        self._forget(job_id)
        self._reject(
            keys=[keyspace.result(job_id), keyspace.rejected(job_id), keyspace.done(job_id),
                  keyspace.claim(job_id)],
            args=[ttl_s * 1000, "1" if authenticated else "0", self.holder])

    def _forget(self, job_id: str) -> None:
        with self._held_lock:
            self._held.discard(job_id)


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
