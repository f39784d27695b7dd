"""The producer side: `Client` seals and submits jobs (`Job`, in job.py, follows one).

Everything a client can check is checked before anything is enqueued
(tenant and key, model, policy, JSON input, size), each failure one clear
`SubmitError` line. A worker re-checks all of it: the client is a courtesy,
the worker is the authority.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from celery import Celery

from maas_worker.backend import barrier, functions, keyspace
from maas_worker.backend.cluster import mget_many
from maas_worker.backend.redis import backend_client
from maas_worker.broker import fetch, shards
from maas_worker.broker.app import make_producer_app
from maas_worker.client import markers
from maas_worker.client.core import (
    CATALOG_CACHE_S,
    DEPTH_CACHE_S,
    INLINE_MAX_BYTES,
    PUBLISH_PROBE_CHANNEL,
    QUEUE_FULL_RETRY_S,
    ClientCore,
    Plan,
    Sealed,
    Step,
    broker_unavailable,
    check_job_id,
    check_shard,
    drive,
    run_plan,
    send_interrupted,
)
from maas_worker.client.job import WAIT_SLICE_S, Job, backend_errors
from maas_worker.client.jobcore import wait_keys
from maas_worker.client.private import PrivateJobs
from maas_worker.client.waiter import LANE_KEYS
from maas_worker.client.wire import MessageBuilder, sent_event_fields
from maas_worker.crypto.envelope import Header, sealed_header_digest
from maas_worker.errors import InvalidEnvelope, JobError, ResultTimeout
from maas_worker.tenancy.quota import Quotas

log = logging.getLogger(__name__)

#: Jobs whose keys one ``MGET`` of `Client.as_completed` reads (4 keys each).
READ_CHUNK = 1024
#: Longest a batch's task-sent events may wait on the broker (seconds).
EVENTS_TIMEOUT_S = 1.0

# Names of maas_worker.client from before 0.2 (its module is now this one), kept.
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

    def __new__(cls, **kwargs: Any) -> Client:
        # Client(gateway_url=...) submits and follows jobs through the HTTP gateway
        # (viagateway.py): the same sealing, the same jobs and errors, another carrier.
        if cls is Client and kwargs.get("gateway_url") is not None:
            from maas_worker.client.viagateway import GatewayClient

            return super().__new__(GatewayClient)
        return super().__new__(cls)

    def __init__(self, **kwargs: Any) -> None:
        # Keyword-only, as `ClientCore`: broker_url, result_backend, tenant, keyring, settings;
        # and gateway_url (docs/gateway.md: then `GatewayClient` is what is built).
        kwargs.pop("gateway_url", None)
        super().__init__(**kwargs)
        self._app: Celery | None = None
        self._backend: redis.Redis | None = None
        self._broker: redis.Redis | None = None
        self._quotas: Quotas | None = None
        self._cancel: Any = None
        self._private: PrivateJobs | None = None
        self._wire = MessageBuilder()
        self._events: Any = None  # Celery's event dispatcher, for task-sent (`_send_events`)
        self._events_conn: Any = None
        self._events_warned = False

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from ``MAAS_*`` variables (see docs/configuration.md)."""
        return cls(**overrides)

    # -- plumbing --------------------------------------------------------------
    @property
    def app(self) -> Celery:
        """The producer's Celery app (created on first use): its task-sent events."""
        if self._app is None:
            app = make_producer_app(self.settings, self.shard)
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
        """Redis client of the broker (queue depths): of the tenant's queue shard."""
        if self._broker is None:
            self._broker = shards.broker_client(self.settings, self.shard)
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
        self._close_events()
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
        flow = self.submit_flow(model, inputs, priority=priority, ttl_s=ttl_s)
        sealed, live = drive(flow, self._carry_out)
        return [
            Job(self, h.job_id, request_hash=sealed_header_digest(raw), worker_live=live)
            for h, raw in sealed
        ]

    def submit_private(
        self,
        model: str,
        vectors: Sequence[Sequence[float]],
        *,
        priority: str = "normal",
        ttl_s: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``model`` on ``vectors`` without any worker seeing them; the decrypted results.

        Private inference (docs/private-inference.md, the ``private`` extra): each
        vector is encrypted under the tenant's own CKKS key (``MAAS_PRIVATE_KEY_DIR``,
        created on first use; the secret key never leaves this machine) and sent as
        its own job; the worker evaluates the model on the ciphertext. Returns
        ``{"labels": [...], "probabilities": [[...]], "logits": [[...]]}``, one row per
        vector. ``timeout`` bounds each job's wait. Raises `ConfigError` if the extra is
        not installed, and what `submit_many` and `Job.result` raise.
        """
        private = self._private_jobs()
        key = private.key  # one key for the whole call: its jobs' results open with it
        inputs = private.inputs(key, vectors)
        with backend_errors(self.settings):
            if private.needs_registration(int(self.backend.ttl(private.context_key(key))), ttl_s):
                name, data, keep_s = private.registration(key)
                self.backend.set(name, data, ex=keep_s)
        jobs = self.submit_many(model, inputs, priority=priority, ttl_s=ttl_s)
        outputs = [job.result(timeout=timeout) for job in jobs]
        return private.open(key, [job.id for job in jobs], outputs)

    def _private_jobs(self) -> PrivateJobs:
        if self._private is None:
            self._private = PrivateJobs(self.settings, self.tenant, self.envelope_version)
        return self._private

    def _carry_out(self, step: Step) -> Any:
        """Do one I/O step of `submit_flow` (core.py) on redis-py and kombu."""
        if step.kind == "catalog":
            return self.served_models()
        if step.kind == "depth":
            try:
                return int(self.broker.llen(self.depth_key(step.arg)))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise broker_unavailable(self.settings, exc) from None
        if step.kind == "admit":
            with backend_errors(self.settings):
                return functions.call(self.backend, *step.arg)
        if step.kind == "payloads":
            with backend_errors(self.settings):
                return run_plan(self.backend, Plan(step.arg, lambda replies: None))
        if step.kind == "send":
            return self._send(*step.arg)
        if step.kind == "markers":
            return markers.write(self.backend, step.arg)
        if step.kind == "pin":
            return barrier.pin(self.backend, [self.tenant]), shards.epoch(self.broker)
        if step.kind == "replicate":
            commands, (pinned, epoch) = step.arg
            replies = run_plan(self.broker, Plan(commands, lambda replies: replies))
            check_shard(self.broker, epoch)
            # The payloads and markers: on the tenant's node of a cluster result store.
            barrier.confirm(self.backend, pinned, self.settings.redis_ha, "submit")
            return replies
        assert step.kind == "live", step
        return self.live_workers()

    def _send(self, sealed: list[Sealed], queue: str) -> None:
        """Push the batch's queue entries (wire.py) with the tenant's arrival and the
        wake-up tokens in one transaction (`fetch.push`), then its task-sent events."""
        entries = self._wire.messages(self.tenant, sealed, queue)
        # One transaction: the jobs and their tenant's arrival (fetch.push) together.
        pipe = self.broker.pipeline(transaction=True)
        fetch.push(pipe, queue, self.tenant, entries, self.key_prefix)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            # One pipeline: whether it reached Redis before the connection broke is
            # not known (the broker was reachable a moment ago, or the depth check
            # would have said so).
            raise send_interrupted(self.settings, sealed) from None
        self._send_events(sealed, queue)

    def _send_events(self, sealed: list[Sealed], queue: str) -> None:
        """Celery's task-sent event of each job (Flower lists a job from the moment it is
        queued), buffered and published as one message per batch, as the batch consumer
        does its own; when this client's Redis user may publish. Best effort, as in
        Celery: a failure is logged once and never touches the jobs, already queued."""
        if not self.app.conf.task_send_sent_event:
            return
        try:
            if self._events is None:
                # A short socket timeout: the events are best effort, and a broker
                # that stopped answering just after the push must not hold the
                # submit for a full timeout here and another for the markers.
                self._events_conn = self.app.connection_for_write(
                    transport_options={
                        "socket_timeout": EVENTS_TIMEOUT_S,
                        "socket_connect_timeout": EVENTS_TIMEOUT_S,
                    }
                )
                self._events = self.app.events.Dispatcher(
                    self._events_conn,
                    buffer_group=["task"],
                    buffer_limit=1_000_000,  # flushed once per batch, below
                    buffer_while_offline=False,
                )
            for header, _ in sealed:
                self._events.send("task-sent", **sent_event_fields(header.job_id, queue))
            self._events.flush()
        except Exception as exc:
            if not self._events_warned:
                log.warning(
                    "task-sent events not sent (%s); Flower may miss jobs", type(exc).__name__
                )
                self._events_warned = True
            self._close_events()

    def _close_events(self) -> None:
        events, conn, self._events, self._events_conn = self._events, self._events_conn, None, None
        try:
            if events is not None:
                events.close()
            if conn is not None:
                conn.release()
        except Exception:
            log.debug("closing the event connection failed", exc_info=False)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job of this client's tenant, by id (`UnknownJob` if the
        id is not a job id)."""
        check_job_id(job_id)
        return Job(self, job_id)

    # -- waiting for many jobs --------------------------------------------------------------
    def as_completed(self, jobs: Iterable[Job], *, timeout: float | None = None) -> Iterator[Job]:
        """Yield each of ``jobs`` (this client's) once it has ended, about in the order
        they end; ``job.result()`` on a yielded job then returns (or raises) at once.

        Round trips go by batch, not by job: the jobs' keys are read with ``MGET``
        (`jobcore.wait_keys`), and the wait is one ``BLPOP`` over the ``done`` lists
        of the oldest `LANE_KEYS` pending jobs, newest first; the list it pops is
        the newest that ended, and that job and every one awaited before it are
        read together (a tenant's queue is first in, first out, so they have most
        likely ended too). A ``BLPOP`` that hears nothing for a second re-reads
        every pending job (a job after the lane may have ended first, or another
        waiter taken a wake-up). The same rules as `AsyncClient`'s `as_completed`
        (waiter.py). Raises `ResultTimeout` if ``timeout`` seconds pass before all
        have ended, `ServiceUnavailable` if Redis cannot be reached.
        """
        jobs = list(jobs)
        if any(job.client is not self for job in jobs):
            raise ValueError("as_completed takes jobs of this client only")
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(j for j in jobs if j._outcome is None))
        yield from (j for j in jobs if j._outcome is not None)
        to_read = pending
        with backend_errors(self.settings):
            while pending:
                ended = self._read_outcomes(to_read)
                yield from ended
                if ended:
                    pending = [j for j in pending if j._outcome is None]
                if not pending:
                    return
                wait = WAIT_SLICE_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise ResultTimeout(
                            f"{len(pending)} of {len(jobs)} jobs had not ended within "
                            f"{timeout:g} s (the first: "
                            f"{pending[0].waiting() if pending else ''})"
                        )
                lane = pending[:LANE_KEYS]
                keys = {keyspace.done(j.tenant, j.id): n for n, j in enumerate(lane)}
                popped = self.backend.blpop(list(reversed(keys)), timeout=max(wait, 0.01))
                if popped is None:
                    to_read = pending  # recheck every pending job
                else:
                    key = popped[0].decode() if isinstance(popped[0], bytes) else popped[0]
                    to_read = lane[: keys[key] + 1]

    def _read_outcomes(self, jobs: list[Job]) -> list[Job]:
        """Read the outcome of each of ``jobs`` (one round trip: an ``MGET`` per
        `READ_CHUNK` jobs, pipelined); record it in the ended ones, which it returns."""
        keys = [k for j in jobs for k in wait_keys(j.tenant, j.id)]
        replies = mget_many(self.backend, keys, chunk=4 * READ_CHUNK)
        ended = []
        for n, job in enumerate(jobs):
            try:
                output, _ = job.outcome(replies[4 * n : 4 * n + 4])
            except (JobError, InvalidEnvelope) as exc:
                job._outcome = exc
            else:
                if output is None:
                    continue
                job._outcome = output
            ended.append(job)
        return ended

    def results(self, jobs: Iterable[Job], *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The output of each of ``jobs``, in their order, waited for together
        (`as_completed`: round trips by batch, not by job). Raises what `Job.result`
        raises for the first job, in that order, that did not succeed; each job's
        own `result` still says its outcome."""
        jobs = list(jobs)
        for _ in self.as_completed(jobs, timeout=timeout):
            pass
        return [job.result() for job in jobs]
