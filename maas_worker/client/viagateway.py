"""`Client(gateway_url=...)`: the same client, talking HTTP to `maas-worker gateway`.

It seals and opens exactly as `Client` does, with the tenant's keyring; what
changes is the carrier: ``POST /v1/jobs:batch`` instead of Redis, and
``GET /v1/jobs/{id}?wait=S`` / ``DELETE`` instead of the result backend
(docs/gateway.md). The bearer token is derived from the tenant's primary root
secret. The standard library's ``urllib`` only: no dependency is added.
The gateway is the one that checks the catalogue, quota and backpressure, so
their errors arrive as its answers, mapped to the same exceptions.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from maas_worker.client.client import Client
from maas_worker.client.job import Job
from maas_worker.client.private import gateway_refusal
from maas_worker.crypto.envelope import sealed_header_digest
from maas_worker.errors import (
    ConfigError,
    InputTooLarge,
    InvalidEnvelope,
    JobCancelled,
    JobExpired,
    JobRejected,
    PolicyDenied,
    QueueFull,
    RateLimited,
    ResultTimeout,
    ServiceUnavailable,
    SubmitError,
    UnknownJob,
    UnknownModel,
)
from maas_worker.protocol import JobInfo, JobState, Priority
from maas_worker.tenancy.gatekeys import bearer_token

#: The longest one long-poll asks the gateway to hold (a result wait loops over them).
WAIT_SLICE_S = 20.0
#: Socket timeout beyond a long-poll's own wait.
HTTP_SLACK_S = 10.0


class GatewayClient(Client):
    """A `Client` whose jobs travel through the HTTP gateway at ``gateway_url``."""

    def __init__(self, *, gateway_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not gateway_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"gateway_url must be an http:// or https:// URL, not {gateway_url!r}"
            )
        self.gateway_url = gateway_url.rstrip("/")

    def __repr__(self) -> str:
        return f"Client(tenant={self.tenant!r}, gateway_url={self.gateway_url!r})"

    # -- HTTP ------------------------------------------------------------------------------
    def _token(self) -> str:
        kv = self.keyring.tenant(self.tenant).primary()
        return bearer_token(kv.secret, self.tenant, kv.version)

    def request(
        self, method: str, path: str, *, body: bytes | None = None, wait_s: float = 0.0
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One call: (status, JSON body, headers); `ServiceUnavailable` if it cannot be made."""
        headers = {"Authorization": f"Bearer {self._token()}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        # An http(s) URL only: checked in __init__.
        url = self.gateway_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=wait_s + HTTP_SLACK_S) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read() or b"{}"), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                doc = json.loads(raw) if raw else {}
            except ValueError:
                doc = {"error": "http", "message": raw[:200].decode(errors="replace")}
            return exc.code, doc, dict(exc.headers)
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceUnavailable(
                f"gateway unavailable ({self.gateway_url}: {exc}); retry later"
            ) from None

    # -- submitting ------------------------------------------------------------------------
    def check(self, model: str, priority: str) -> None:
        """The checks needing no Redis (model name, priority, policy); the gateway checks
        the catalogue."""
        self._check_local(model, priority)

    def needs_catalog(self, model: str, priority: str | Priority) -> bool:
        """Never: the gateway reads the catalogue."""
        return False

    def submit_private(
        self,
        model: str,
        vectors: Sequence[Sequence[float]],
        *,
        priority: str = "normal",
        ttl_s: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Not through a gateway: `ConfigError` (the context is registered in Redis)."""
        raise gateway_refusal()

    def submit_many(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        priority: str | Priority = "normal",
        ttl_s: int | None = None,
    ) -> list[Job]:
        """Seal each input and submit them in one ``POST /v1/jobs:batch``; all or nothing
        as far as the checks before sending go, then the gateway answers per job (the
        first refusal is raised, the jobs it accepted stay queued)."""
        if not inputs:
            return []
        sealed = self.seal_many(model, inputs, priority=priority, ttl_s=ttl_s)
        doc = {"envelopes": [base64.b64encode(raw).decode("ascii") for _, raw in sealed]}
        status, body, _ = self.request("POST", "/v1/jobs:batch", body=json.dumps(doc).encode())
        if status != 200:
            raise _submit_error(status, body, None)
        for item in body["items"]:
            if item["status"] != 202:
                raise _submit_error(item["status"], item, item.get("retry_after"))
        return [
            GatewayJob(self, h.job_id, request_hash=sealed_header_digest(raw)) for h, raw in sealed
        ]

    def job(self, job_id: str) -> Job:
        """A handle on an existing job of this client's tenant, by id."""
        from maas_worker.client.core import check_job_id

        check_job_id(job_id)
        return GatewayJob(self, job_id)


def _submit_error(status: int, body: dict[str, Any], retry: float | None) -> Exception:
    message = f"gateway: {body.get('message', status)}"
    code = body.get("error")
    if status == 403:
        return PolicyDenied(message)
    if status == 413:
        return InputTooLarge(message)
    if status == 422 and code == "unknown_model":
        return UnknownModel(message)
    if status == 429:
        return RateLimited(message, retry)
    if status == 503 and code == "queue_full":
        return QueueFull(message, retry or 1.0)
    if status == 503:
        return ServiceUnavailable(message)
    if status == 401 and code != "unauthorized":
        return InvalidEnvelope()
    return SubmitError(f"{message} (HTTP {status})")


class GatewayJob(Job):
    """A `Job` followed through the gateway: the same states, results and errors."""

    client: GatewayClient

    def _get(self, wait_s: float = 0.0) -> dict[str, Any]:
        path = f"/v1/jobs/{self.id}" + (f"?wait={wait_s:g}" if wait_s > 0 else "")
        status, body, _ = self.client.request("GET", path, wait_s=wait_s)
        if status == 404:
            raise UnknownJob(self.id, "unknown job (never submitted, or expired)")
        if status != 200:
            raise ServiceUnavailable(f"job {self.id}: gateway answered {status}: {body}")
        return body

    def _info(self, body: dict[str, Any]) -> JobInfo:
        state = body["state"]
        if state == "completed":
            doc = self._open(base64.b64decode(body["result"]))
            if doc.ok:
                return JobInfo(self.id, JobState.SUCCEEDED, None, doc.model)
            if doc.cancelled:
                return JobInfo(self.id, JobState.CANCELLED, None, doc.model)
            return JobInfo(self.id, JobState.FAILED, doc.error, doc.model)
        return JobInfo(self.id, JobState(state), body.get("reason"), None)

    def info(self) -> JobInfo:
        """The job's `JobInfo` (its result opened here when there is one)."""
        return self._info(self._get())

    def exists(self) -> bool:
        """Whether this tenant has a job of this id."""
        try:
            self._get()
        except UnknownJob:
            return False
        return True

    def cancel(self) -> bool:
        """Cancel through ``DELETE /v1/jobs/{id}``; False if it had already finished."""
        status, body, _ = self.client.request("DELETE", f"/v1/jobs/{self.id}")
        if status == 404:
            raise UnknownJob(self.id, "unknown job: no job of this tenant with this id")
        if status != 200:
            raise ServiceUnavailable(f"job {self.id}: gateway answered {status}: {body}")
        return bool(body["cancel_requested"])

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Long-poll until the job ends; returns or raises as `Job.result`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = WAIT_SLICE_S
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            body = self._get(wait)
            state = body["state"]
            if state == "completed":
                sealed = base64.b64decode(body["result"])
                output, _ = self.outcome([sealed, None, None, None])
                assert output is not None  # a result either has output or raises
                return output
            if state == JobState.REJECTED:
                why = body.get("reason")
                said = f": {why}" if why else ""
                raise JobRejected(self.id, f"rejected by a worker{said}", reason=why)
            if state == JobState.EXPIRED:
                raise JobExpired(self.id, "expired in the queue before a worker ran it")
            if state == JobState.CANCELLED:
                raise JobCancelled(self.id, "cancelled")
            if state == JobState.FAILED:
                raise InvalidEnvelope()  # the stored result does not authenticate
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"no result within {timeout:g} s: job {self.id} is {state}")
