"""Cancellation requests that only the job's own tenant can make.

A request is a marker in the result backend under the job's tenant,
``maas:{<tenant>}:cancel:<job>``, holding ``tenant:key_version:HMAC`` where
the HMAC (SHA-256, under the tenant's MAC key) covers a fixed label and the
job id. Workers honour it only if it verifies for the tenant in the job's
authenticated header, so neither another tenant nor someone who can merely
write Redis can cancel a job; a request that does not verify is audited
under whoever really made it (`token_actor`) and deleted, so it blocks
nothing. Because it lives in Redis, not in a worker's memory (as Celery's
revoke list does), it survives worker restarts.
"""

from __future__ import annotations

import hmac

from maas_worker.crypto.envelope import KeyLookup
from maas_worker.tenancy.keyring import Keyring

LABEL = b"maas-worker/v1/cancel\x00"


def make_token(keyring: Keyring, tenant: str, job_id: str) -> str:
    """A cancel request for ``job_id`` signed with the tenant's primary key."""
    kv = keyring.tenant(tenant).primary()
    mac = hmac.digest(kv.keys(tenant).mac, LABEL + job_id.encode(), "sha256")
    return f"{tenant}:{kv.version}:{mac.hex()}"


def verify_token(token: str | bytes | None, keyring: KeyLookup, tenant: str, job_id: str) -> bool:
    """True if ``token`` is a genuine cancel request by ``tenant`` for ``job_id``."""
    if token is None:
        return False
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    claimed_tenant, _, rest = token.partition(":")
    version, _, mac_hex = rest.partition(":")
    # Untrusted text from Redis: ASCII digits only (str.isdigit also accepts
    # "²" or "①", which int() refuses) and short enough for int() to parse.
    if (
        claimed_tenant != tenant
        or not (version.isascii() and version.isdigit())
        or len(version) > 10
        or len(mac_hex) != 64
    ):
        return False
    kv = keyring.usable(tenant, int(version))
    if kv is None:
        return False
    try:
        mac = bytes.fromhex(mac_hex)
    except ValueError:
        return False
    expected = hmac.digest(kv.keys(tenant).mac, LABEL + job_id.encode(), "sha256")
    return hmac.compare_digest(expected, mac)


def token_actor(token: str | bytes | None, keyring: Keyring, job_id: str) -> tuple[str, bool]:
    """Who made a cancel request for ``job_id``: (tenant, True) if that tenant's key signed
    it, else (the tenant it claims, cut and unverified, False)."""
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    claimed = (token or "").partition(":")[0][:64]
    if claimed not in keyring.tenants:
        return claimed, False
    return claimed, verify_token(token, keyring, claimed, job_id)
