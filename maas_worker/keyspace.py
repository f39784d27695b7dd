"""Names of every Redis key maas-worker writes in the result backend, in one place.

None of them ever holds plaintext: results are sealed envelopes, the rest
are markers, holder ids and audit records without payload.
"""

from __future__ import annotations

PREFIX = "maas:"
AUDIT_STREAM = PREFIX + "audit"
#: Sorted set: model reference -> last time (unix s) a worker said it serves it.
CATALOG = PREFIX + "catalog"
#: Sorted set: worker node name -> last heartbeat (unix s).
NODES = PREFIX + "nodes"


def claim(job_id: str) -> str:
    """Replay claim and lease: holder id while running, ``done`` once finished."""
    return f"{PREFIX}claim:{job_id}"


def attempts(job_id: str) -> str:
    """How many times the job has been started (crash loops end after a few)."""
    return f"{PREFIX}attempts:{job_id}"


def result(job_id: str) -> str:
    """The sealed result envelope (write-once)."""
    return f"{PREFIX}result:{job_id}"


def done(job_id: str) -> str:
    """A list a waiting client blocks on; one element is pushed when the job ends."""
    return f"{PREFIX}done:{job_id}"


def rejected(job_id: str) -> str:
    """Marker: a worker refused a message carrying this job id."""
    return f"{PREFIX}rejected:{job_id}"


def cancel(job_id: str) -> str:
    """Persisted cancellation request (a MAC by the job's tenant), survives restarts."""
    return f"{PREFIX}cancel:{job_id}"


def admitted(job_id: str) -> str:
    """Marker: the job has been charged against its tenant's quota (once)."""
    return f"{PREFIX}admit:{job_id}"


def bucket(tenant: str) -> str:
    """A tenant's token bucket (hash: tokens, ts)."""
    return f"{PREFIX}bucket:{tenant}"


def in_flight(tenant: str) -> str:
    """Sorted set of a tenant's jobs queued or running, scored by expiry (ms)."""
    return f"{PREFIX}inflight:{tenant}"


def killed(job_id: str) -> str:
    """Marker: the worker process was ended to stop this job (hard limit, cancel)."""
    return f"{PREFIX}killed:{job_id}"


def payload(job_id: str) -> str:
    """A large sealed request, stored raw beside its small Celery message (claim check)."""
    return f"{PREFIX}payload:{job_id}"


def submitted(job_id: str) -> str:
    """Marker written by the client: the job was enqueued (status ``queued``)."""
    return f"{PREFIX}job:{job_id}"


#: Sorted set: worker node -> time (unix s) of its latest resource sample.
SAMPLES = PREFIX + "samples"


def sample(node: str) -> str:
    """A worker node's latest resource sample (JSON, expires a few intervals after)."""
    return f"{PREFIX}sample:{node}"
