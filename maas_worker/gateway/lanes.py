"""One `AsyncClient` per tenant, holding no key that opens anything.

The gateway enqueues exactly as the Python client does because it *is* the
Python client: a `TenantLane` is an `AsyncClient` of one tenant that drives
`ClientCore.enqueue_flow` (backpressure, the advisory quota, claim-check
payloads, the kombu message of wire.py, the wake-up token, the queued
markers) with envelopes its caller sealed. Its policy and cancel tokens come
from the gateway keyring (MAC keys only); the lanes share one pair of Redis
connection pools and one message builder.
"""

from __future__ import annotations

import hmac
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from maas_worker.client.aio import AsyncClient
from maas_worker.client.core import Step
from maas_worker.client.jobcore import JobCore
from maas_worker.tenancy.cancellation import LABEL, verify_token
from maas_worker.tenancy.keyring import Keyring, TenantPolicy

if TYPE_CHECKING:
    from maas_worker.gateway.service import Gateway


class TenantLane(AsyncClient):
    """The submit and follow path of one tenant through the gateway."""

    def __init__(self, gateway: Gateway, tenant: str) -> None:
        self._gateway = gateway
        # An empty keyring: nothing here can seal or open; `_check_keys` skips the check.
        super().__init__(settings=replace(gateway.settings, tenant=tenant), keyring=Keyring())
        self._backend = gateway.backend
        self._broker = gateway.brokers[self.shard]
        self._wire = gateway.wire

    def _check_keys(self) -> None:
        """The gateway seals nothing: no primary key to look for."""

    async def _carry_out(self, step: Step) -> Any:
        """The client's I/O steps, but for the queued markers: `Gateway._claim_ids` wrote
        them already, in the round trip of the idempotency records."""
        if step.kind == "markers":
            return None
        return await super()._carry_out(step)

    @property
    def policy(self) -> TenantPolicy:
        """The tenant's policy as the gateway keyring holds it."""
        return self._gateway.keyring.tenants[self.tenant].policy

    def cancel_token(self, job_id: str) -> str:
        """A cancel request signed with the tenant's primary MAC key (all a cancel needs)."""
        kv = self._gateway.keyring.tenants[self.tenant].primary()
        mac = hmac.digest(kv.mac, LABEL + job_id.encode(), "sha256")
        return f"{self.tenant}:{kv.version}:{mac.hex()}"

    async def aclose(self) -> None:
        """Stop this lane's waiter; the shared connections are the gateway's to close."""
        if self._waiter is not None:
            await self._waiter.close()

    def __repr__(self) -> str:
        return f"TenantLane(tenant={self.tenant!r})"


class GatewayJob(JobCore):
    """A job the gateway follows: it learns *that* the job ended, never what it says."""

    client: TenantLane

    def outcome(self, replies: list[Any]) -> tuple[dict[str, Any] | None, bytes | None]:
        """``({}, claim)`` once the job has ended (result, refusal or a genuine cancel of a
        job not running), ``(None, claim)`` while it has not; opens nothing."""
        sealed, rejected, cancel, claim = replies
        if sealed is not None or rejected is not None:
            return {}, claim
        if (
            cancel is not None
            and (claim is None or claim == b"done")
            and verify_token(cancel, self.client._gateway.keyring, self.tenant, self.id)
        ):
            return {}, claim
        return None, claim
