"""Names of every Redis key maas-worker writes in the result backend, in one place.

A job is the pair (tenant, job id): every key of a job's state lives under
its tenant, ``maas:{<tenant>}:<kind>:<job id>``, so a job id chosen by one
tenant can never close, pre-empt, cancel or read another tenant's job of
the same id. The braces are Redis Cluster's hash tag: all of one tenant's
keys (its jobs and its quota) hash to one slot, as the claim script that
charges the quota needs. The tenant is always the authenticated one (from a
verified header, or the client's own); tenant names are restricted by
`protocol.TENANT_RE`, job ids to canonical UUIDs (`is_job_id`), so the parts
cannot run into each other.

Who writes what (the least-privilege roles of docs/security.md follow it):

* producers: ``job`` (queued marker), ``payload`` (claim check), ``cancel``,
  ``pending`` (advisory quota), ``ckks`` (public CKKS contexts, private
  inference), ``barrier`` (``WAIT`` on a Redis Cluster), and they pop their
  ``done`` list; they read the model catalogue (``catalog``, ``models``) and
  the node list (``nodes``);
* workers: everything else (claims, results, attempts, faults, rejections,
  the quota bucket and in-flight set, the audit stream, the model release
  floor ``releases``).

None of them ever holds plaintext: results are sealed envelopes, the rest
are markers, holder ids and audit records without payload (a ``ckks`` context
is a public key set: no secret key, no input).
"""

from __future__ import annotations

import re

PREFIX = "maas:"
AUDIT_STREAM = PREFIX + "audit"
#: Sorted set: model reference -> last time (unix s) a worker said it serves it.
CATALOG = PREFIX + "catalog"
#: Set: every model reference a worker of this deployment ever advertised (no
#: TTL: a client accepts jobs for these while no worker is live).
MODELS = PREFIX + "models"
#: Sorted set: worker node name -> last heartbeat (unix s).
NODES = PREFIX + "nodes"
#: Sorted set: worker node -> time (unix s) of its latest resource sample.
SAMPLES = PREFIX + "samples"
#: Hash: model name -> highest release serial any worker has seen (the rollback
#: floor of `models.release`); written by workers only, never lowered.
RELEASES = PREFIX + "releases"

#: The only job id form accepted anywhere: a UUID, lowercase, hyphenated.
JOB_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Longest a Redis TTL handed over by us may be (ms): a little over the longest
#: job lifetime (7 days) plus the longest result lifetime we allow.
MAX_TTL_MS = 30 * 24 * 3600 * 1000


_job_id_match = JOB_ID_RE.fullmatch


def is_job_id(value: object) -> bool:
    """True for a canonical UUID string (the only job ids a worker accepts)."""
    return type(value) is str and len(value) == 36 and _job_id_match(value) is not None


def clamp_ttl_ms(ms: float) -> int:
    """A TTL Redis accepts: at least 1 ms, at most `MAX_TTL_MS` (never an error)."""
    return int(min(max(ms, 1), MAX_TTL_MS))


def tenant_prefix(tenant: str) -> str:
    """Every key of ``tenant``'s jobs and quota starts with this (hash tag included)."""
    return f"{PREFIX}{{{tenant}}}:"


def _job(kind: str, tenant: str, job_id: str) -> str:
    return f"{tenant_prefix(tenant)}{kind}:{job_id}"


def claim(tenant: str, job_id: str) -> str:
    """Replay claim and lease: holder id while running, ``done`` once finished."""
    return _job("claim", tenant, job_id)


def attempts(tenant: str, job_id: str) -> str:
    """How many times the job has been started (crash loops end after a few)."""
    return _job("attempts", tenant, job_id)


def faults(tenant: str, job_id: str) -> str:
    """How many times handling the job raised an error (it is dead-lettered after a few)."""
    return _job("faults", tenant, job_id)


def result(tenant: str, job_id: str) -> str:
    """The sealed result envelope (write-once)."""
    return _job("result", tenant, job_id)


def done(tenant: str, job_id: str) -> str:
    """A list a waiting client blocks on; one element is pushed when the job ends."""
    return _job("done", tenant, job_id)


def rejected(tenant: str, job_id: str) -> str:
    """Marker: a worker refused an authenticated message of this job (``rejected``/``expired``)."""
    return _job("rejected", tenant, job_id)


def suspect(tenant: str, job_id: str) -> str:
    """Marker: a worker refused a message naming this job that did NOT authenticate.

    It never changes the job's state (anyone who can write a queue could
    have sent that message); a client whose wait times out says so.
    """
    return _job("suspect", tenant, job_id)


def cancel(tenant: str, job_id: str) -> str:
    """Persisted cancellation request (a MAC by the job's tenant), survives restarts."""
    return _job("cancel", tenant, job_id)


def killed(tenant: str, job_id: str) -> str:
    """Marker: the worker process was ended to stop this job (hard limit, cancel)."""
    return _job("killed", tenant, job_id)


def payload(tenant: str, job_id: str) -> str:
    """A large sealed request, stored raw beside its small Celery message (claim check)."""
    return _job("payload", tenant, job_id)


def ckks_context(tenant: str, digest: str) -> str:
    """A tenant's public CKKS evaluation context (private inference), named by its SHA-256.

    Written by the tenant's client (its producer role), read by workers, which check
    the bytes against the digest the sealed job names (docs/private-inference.md).
    """
    return f"{tenant_prefix(tenant)}ckks:{digest}"


def submitted(tenant: str, job_id: str) -> str:
    """Marker written by the client: the job was enqueued; holds its expiry (Unix ms)."""
    return _job("job", tenant, job_id)


def gateway_seen(tenant: str, job_id: str) -> str:
    """Written by the gateway as it accepts a job: the SHA-256 (hex) of its envelope, so the
    same envelope again is not enqueued twice and another one with its id is refused."""
    return _job("gateway", tenant, job_id)


def bucket(tenant: str) -> str:
    """A tenant's token bucket (hash: tokens, ts), charged by workers only."""
    return f"{tenant_prefix(tenant)}bucket"


def in_flight(tenant: str) -> str:
    """Sorted set of a tenant's jobs running now (charged by a worker), scored by expiry (ms)."""
    return f"{tenant_prefix(tenant)}inflight"


def pending(tenant: str) -> str:
    """Sorted set of a tenant's jobs submitted but not yet started, scored by expiry (ms).

    Written by the tenant's own clients for their advisory quota check; a
    worker removes a job from it when it starts it. Nothing is enforced from it.
    """
    return f"{tenant_prefix(tenant)}pending"


def barrier(tenant: str) -> str:
    """A throwaway write on the tenant's Redis Cluster node (a short ``PX``): the
    durability barrier of ``MAAS_REDIS_WAIT_REPLICAS`` (backend/barrier.py). A node runs
    its commands one at a time, so this write, made after the tenant's others were
    answered, is past them all in the node's replication stream, and the ``WAIT``
    that follows it on its connection vouches for them. Written by producers, the
    gateway and workers; its value means nothing."""
    return f"{tenant_prefix(tenant)}barrier"


def sample(node: str) -> str:
    """A worker node's latest resource sample (JSON, expires a few intervals after)."""
    return f"{PREFIX}sample:{node}"
