"""The producer side: `Client` seals and submits jobs (`Job`, in job.py, follows one).

Everything a client can check is checked before anything is enqueued
(tenant and key, model, policy, JSON input, size), each failure one clear
`SubmitError` line. A worker re-checks all of it: the client is a courtesy,
the worker is the authority.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import BatchPublishError, OperationalError

from maas_worker.backend import functions
from maas_worker.backend.redis import backend_client, redis_client
from maas_worker.broker.app import make_producer_app
from maas_worker.client.core import (
    CATALOG_CACHE_S,
    DEPTH_CACHE_S,
    INLINE_MAX_BYTES,
    PUBLISH_PROBE_CHANNEL,
    QUEUE_FULL_RETRY_S,
    ClientCore,
    Plan,
    Sealed,
    check_inputs,
    check_job_id,
    run_plan,
)
from maas_worker.client.job import Job, backend_errors
from maas_worker.client.wire import send_args
from maas_worker.crypto.envelope import Header
from maas_worker.errors import ServiceUnavailable, connection_cause
from maas_worker.protocol import TASK_NAME, Priority, queue_for
from maas_worker.settings import redact_url
from maas_worker.tenancy.quota import Quotas

log = logging.getLogger(__name__)

__all__ = [
    "CATALOG_CACHE_S",
    "DEPTH_CACHE_S",
    "INLINE_MAX_BYTES",
    "PUBLISH_PROBE_CHANNEL",
    "QUEUE_FULL_RETRY_S",
    "Client",
]


class Client(ClientCore):
    """Submit sealed inference jobs as one tenant.

    Build it with `Client.from_env` or with keywords that override the
    environment::

        client = Client(broker_url="redis://127.0.0.1:6379/0", tenant="acme")
        job = client.submit("echo", {"text": "hi"}, priority="high")
        job.result(timeout=10)

    `AsyncClient` is the same client for asyncio code; both drive the rules of
    `ClientCore` (core.py).
    """

    def __init__(self, **kwargs: Any) -> None:
        # Keyword-only, as `ClientCore`: broker_url, result_backend, tenant, keyring, settings.
        super().__init__(**kwargs)
        self._app: Celery | None = None
        self._backend: redis.Redis | None = None
        self._broker: redis.Redis | None = None
        self._quotas: Quotas | None = None
        self._cancel: Any = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from ``MAAS_*`` variables (see docs/configuration.md)."""
        return cls(**overrides)

    # -- plumbing --------------------------------------------------------------
    @property
    def app(self) -> Celery:
        """The producer's Celery app (created on first use)."""
        if self._app is None:
            app = make_producer_app(self.settings)
            if not self._may_publish():
                # A producer's Redis user may not publish (docs/security.md,
                # Redis roles): no task-sent event, or every submit would fail.
                app.conf.task_send_sent_event = False
            self._app = app
        return self._app

    def _may_publish(self) -> bool:
        """Whether this client's Redis user may publish (its task-sent events).

        Asked once, by publishing nothing to a channel no one listens on.
        """
        try:
            self.broker.publish(PUBLISH_PROBE_CHANNEL, b"")
        except redis.exceptions.NoPermissionError:
            return False
        except redis.RedisError:
            pass  # not reachable now: the send says so, as it always did
        return True

    @property
    def broker(self) -> redis.Redis:
        """Redis client of the broker (queue depths)."""
        if self._broker is None:
            self._broker = redis_client(self.settings.broker_url, tls=self.settings.redis_tls)
        return self._broker

    @property
    def quotas(self) -> Quotas:
        """Tenant quota admission (in the result backend)."""
        if self._quotas is None:
            self._quotas = Quotas(self.backend)
        return self._quotas

    @property
    def cancel_script(self) -> Any:
        """The cancel request script (job.py): ``cancel_script(keys=..., args=...)``.

        It calls the library function `functions.CANCEL` (``FCALL``).
        """
        if self._cancel is None:
            backend = self.backend

            def cancel(keys: Sequence[str], args: Sequence[Any]) -> Any:
                return functions.call(backend, functions.CANCEL, keys, args)

            self._cancel = cancel
        return self._cancel

    @property
    def backend(self) -> redis.Redis:
        """Redis client of the result backend."""
        if self._backend is None:
            self._backend = backend_client(self.settings)
        return self._backend

    def close(self) -> None:
        """Release connections."""
        for conn in (self._backend, self._broker):
            if conn is not None:
                conn.close()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(tenant={self.tenant!r})"

    # -- submitting --------------------------------------------------------------
    def served_models(self) -> set[str]:
        """Model references this deployment serves: what workers advertised within the
        last hour, and every reference a worker of it ever advertised (so a job is
        accepted, and waits in its queue, while no worker is up).

        Before any worker has ever advertised, the models the package ships
        (the bundled ``digits``); plus the diagnostic models when this client
        enables them, so a client can submit before any worker has started.
        """
        with backend_errors(self.settings):
            try:
                return run_plan(self.backend, self.catalog_plan())
            except redis.exceptions.NoPermissionError:
                # A Redis ACL from before the durable catalogue: the live one
                # only, as before (`maas-worker acl --apply` lets producers read it).
                return run_plan(self.backend, self.advertised_plan())

    def live_workers(self) -> int:
        """How many worker nodes are live (sent a heartbeat within `catalog.NODE_LIVE_S`).

        Reused for `CATALOG_CACHE_S` while some are; re-read at each call while none is.
        """
        plan = self.live_plan()
        if plan is None:
            return self.cached_live
        with backend_errors(self.settings):
            return run_plan(self.backend, plan)

    def _sealed(
        self, model: str, inputs: Sequence[Any], priority: str | Priority, ttl_s: int | None
    ) -> list[Sealed]:
        if self.needs_catalog(model, priority):
            self.served_models()
        return self.seal_many(model, inputs, priority=priority, ttl_s=ttl_s)

    def seal(
        self,
        model: str,
        inputs: Any,
        *,
        priority: str = "normal",
        ttl_s: int | None = None,
        job_id: str | None = None,
    ) -> tuple[Header, str]:
        """Validate and seal a job without sending it: (header, base64 envelope)."""
        if self.needs_catalog(model, priority):
            self.served_models()
        header, sealed = self.seal_raw(model, inputs, priority=priority, ttl_s=ttl_s, job_id=job_id)
        return header, base64.b64encode(sealed).decode("ascii")

    def submit(
        self, model: str, inputs: Any, *, priority: str = "normal", ttl_s: int | None = None
    ) -> Job:
        """Seal ``inputs`` for ``model`` and enqueue it; returns the `Job`.

        ``priority`` is a `Priority` or its name (``"high"``, ``"normal"``,
        ``"low"``). ``ttl_s`` bounds how long the job may wait in the queue: a worker
        refuses it (``expired``) after that.
        """
        return self.submit_many(model, [inputs], priority=priority, ttl_s=ttl_s)[0]

    def submit_many(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        priority: str = "normal",
        ttl_s: int | None = None,
    ) -> list[Job]:
        """Seal each of ``inputs`` as its own job and enqueue them all in one go.

        Every job is sealed, audited and acknowledged on its own, exactly as
        with `submit`; only the trip to Redis is shared (one pipeline for the
        messages, one for the markers). All or nothing: if any input fails a
        check (the error names it by its index: ``item 3: input is 2.1 MB
        ...``), or the batch does not fit the tenant's quota or the queue,
        nothing is enqueued.
        """
        check_inputs(inputs)
        if not inputs:
            return []
        sealed = self._sealed(model, inputs, priority, ttl_s)
        priority = sealed[0][0].priority
        self._check_depth(priority, len(sealed))
        self._admit([h for h, _ in sealed])
        payloads = self.payload_commands(sealed)
        if payloads:
            with backend_errors(self.settings):
                run_plan(self.backend, Plan(payloads, lambda replies: None))
        self._send(sealed, queue_for(priority))
        # The jobs are enqueued by now: if the markers cannot be written, they
        # are still accepted (status is unknown until a worker takes them), not
        # reported as failed and submitted twice.
        try:
            run_plan(self.backend, Plan(self.marker_commands(sealed), lambda replies: None))
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning(
                "%d job(s) enqueued, but their queued markers could not be written", len(sealed)
            )
        try:
            live: bool | None = self.live_workers() > 0
        except (ServiceUnavailable, redis.exceptions.NoPermissionError):
            live = None  # not known (Redis gone, or an ACL from before); the jobs are queued
        if live is False:
            log.info("%d job(s) queued; no worker is consuming right now", len(sealed))
        return [Job(self, h.job_id, request_hash=h.digest(), worker_live=live) for h, _ in sealed]

    def _send(self, sealed: list[Sealed], queue: str) -> None:
        """Enqueue the sealed requests with Celery's producer (kombu's Redis transport)."""
        try:
            # kombu's producer batch puts every message (and its task-sent
            # event) into one Redis pipeline: one round trip, not two per job.
            with self.app.producer_or_acquire() as producer, producer.batch():
                for header, raw in sealed:
                    self.app.send_task(
                        TASK_NAME,
                        producer=producer,
                        **send_args(self.tenant, header.job_id, raw, queue),
                    )
        except OperationalError as exc:
            raise ServiceUnavailable(
                f"broker unavailable ({redact_url(self.settings.broker_url)}: "
                f"{connection_cause(exc)}); the jobs were not submitted, retry later"
            ) from None
        except BatchPublishError:
            # The connection broke while the batch was being sent: some jobs
            # may be queued all the same. Say so, and which, rather than
            # invite a blind resubmission that would run them twice.
            raise ServiceUnavailable(
                f"broker connection lost while submitting "
                f"({redact_url(self.settings.broker_url)}); these jobs may or may not have "
                "been enqueued: check their status (ServiceUnavailable.job_ids) once the "
                "broker is back, before submitting them again",
                job_ids=[h.job_id for h, _ in sealed],
            ) from None

    def _check_depth(self, priority: str, adding: int = 1) -> None:
        """Backpressure: refuse while the priority's queue is at its maximum depth."""
        read = None
        if self.depth_needs_read(priority, adding):
            try:
                read = int(self.broker.llen(queue_for(priority)))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ServiceUnavailable(
                    f"broker unavailable ({redact_url(self.settings.broker_url)}: "
                    f"{connection_cause(exc)}); the job was not submitted, retry later"
                ) from None
        self.commit_depth(priority, adding, read)

    def _admit(self, headers: list[Header]) -> None:
        """Check the tenant's quota now, for fast feedback (advisory: workers charge it)."""
        call = self.admit_call(headers)
        if call is None:
            return
        with backend_errors(self.settings):
            reply = functions.call(self.backend, *call)
        self.admit_verdict(headers, reply)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job of this client's tenant, by id (`UnknownJob` if the
        id is not a job id)."""
        check_job_id(job_id)
        return Job(self, job_id)
