"""The producer side: `Client` seals and submits jobs (`Job`, in job.py, follows one).

Everything a client can check is checked before anything is enqueued
(tenant and key, model, policy, JSON input, size), each failure one clear
`SubmitError` line. A worker re-checks all of it: the client is a courtesy,
the worker is the authority.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import BatchPublishError, OperationalError

from maas_worker import jsonlimits
from maas_worker.backend import catalog, functions, keyspace
from maas_worker.backend.redis import backend_client, redis_client
from maas_worker.broker.app import make_producer_app
from maas_worker.client.job import Job, backend_errors
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.crypto.primitives import CryptoBackend, crypto_backend
from maas_worker.errors import (
    ConfigError,
    InputTooLarge,
    PolicyDenied,
    QueueFull,
    RateLimited,
    ServiceUnavailable,
    SubmitError,
    UnknownJob,
    UnknownModel,
    connection_cause,
)
from maas_worker.models.base import parse_model_ref
from maas_worker.models.diagnostic import diagnostic_refs
from maas_worker.models.paths import bundled_refs
from maas_worker.protocol import (
    ARGS_REPR,
    PRIORITIES,
    TASK_NAME,
    Priority,
    payload_ref,
    queue_for,
)
from maas_worker.settings import MAX_JOB_TTL_S, Settings, redact_url
from maas_worker.tenancy.keyring import Keyring, KeyringSource
from maas_worker.tenancy.quota import Quotas

log = logging.getLogger(__name__)

#: How long the model catalogue read from Redis is reused by a client.
CATALOG_CACHE_S = 5.0
#: How long a queue length read from Redis is reused (plus our own submits).
DEPTH_CACHE_S = 0.25
#: Sealed requests larger than this (bytes; 64 KiB once base64-encoded) travel
#: by claim check.
INLINE_MAX_BYTES = 48 * 1024
#: Retry-after hint when a queue is full.
QUEUE_FULL_RETRY_S = 1.0
#: A channel no one subscribes to: publishing nothing there tells whether the
#: client's Redis user may publish at all (a producer role may not).
PUBLISH_PROBE_CHANNEL = "maas:publish-probe"


def _size(n: int) -> str:
    """A byte count as a person reads it: ``2.1 MB (2100000 bytes)``, ``512 bytes``."""
    if n < 1000:
        return f"{n} bytes"
    scaled = f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.1f} kB"
    return f"{scaled} ({n} bytes)"


class Client:
    """Submit sealed inference jobs as one tenant.

    Build it with `Client.from_env` or with keywords that override the
    environment::

        client = Client(broker_url="redis://127.0.0.1:6379/0", tenant="acme")
        job = client.submit("echo", {"text": "hi"}, priority="high")
        job.result(timeout=10)
    """

    def __init__(
        self,
        *,
        broker_url: str | None = None,
        result_backend: str | None = None,
        tenant: str | None = None,
        keyring: Keyring | str | Path | None = None,
        settings: Settings | None = None,
    ) -> None:
        base = settings or Settings.from_env()
        overrides: dict[str, Any] = {"broker_url": broker_url, "tenant": tenant}
        if result_backend is not None or broker_url is not None:
            overrides["result_backend"] = result_backend or broker_url
        if isinstance(keyring, str | Path):
            overrides["keyring_path"] = Path(keyring)
        self.settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if self.settings.tenant is None:
            raise SubmitError("no tenant: set MAAS_TENANT or pass tenant=")
        try:
            #: AES-GCM for every envelope this client seals or opens (MAAS_CRYPTO_BACKEND).
            self.crypto: CryptoBackend = crypto_backend(self.settings.crypto_backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.tenant = self.settings.tenant
        self._static_ring = keyring if isinstance(keyring, Keyring) else None
        self._ring_source = None if self._static_ring else KeyringSource(self.settings.keyring_path)
        self.keyring.tenant(self.tenant).primary()  # fail now, not at the first submit
        self._app: Celery | None = None
        self._backend: redis.Redis | None = None
        self._broker: redis.Redis | None = None
        self._quotas: Quotas | None = None
        self._cancel: Any = None
        self._served: tuple[float, set[str]] = (0.0, set())
        self._live: tuple[float, int] = (0.0, 0)
        self._depth: dict[str, tuple[float, int]] = {}
        self._own: tuple[Keyring | None, Keyring] = (None, self.keyring)

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from ``MAAS_*`` variables (see docs/configuration.md)."""
        return cls(**overrides)

    # -- plumbing --------------------------------------------------------------
    @property
    def keyring(self) -> Keyring:
        """The keyring in force (re-read when its file changes)."""
        if self._static_ring is not None:
            return self._static_ring
        assert self._ring_source is not None
        return self._ring_source.get()

    def own_keyring(self) -> Keyring:
        """This tenant's keys only (what opens its results), rebuilt when the keyring changes."""
        ring = self.keyring
        if self._own[0] is not ring:
            self._own = (ring, ring.only(self.tenant))
        return self._own[1]

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
                refs, ever = catalog.offered(self.backend)
            except redis.exceptions.NoPermissionError:
                # A Redis ACL from before the durable catalogue: the live one
                # only, as before (`maas-worker acl --apply` lets producers read it).
                refs, ever = catalog.advertised(self.backend), True
        if not ever:
            refs |= bundled_refs()
        if self.settings.diagnostic_models:
            refs |= set(diagnostic_refs())
        self._served = (time.monotonic() + CATALOG_CACHE_S, refs)
        return refs

    def live_workers(self) -> int:
        """How many worker nodes are live (sent a heartbeat within `catalog.NODE_LIVE_S`).

        Reused for `CATALOG_CACHE_S` while some are; re-read at each call while none is.
        """
        expires, count = self._live
        if count and time.monotonic() < expires:
            return count
        with backend_errors(self.settings):
            count = catalog.live_nodes(self.backend)
        self._live = (time.monotonic() + CATALOG_CACHE_S, count)
        return count

    def _serves(self, model: str) -> set[str] | None:
        """None if ``model`` is served; else the served set (re-read if the cache is stale)."""
        expires, refs = self._served
        if time.monotonic() < expires and model in refs:
            return None
        # Unknown to the cache, or the cache is old: ask Redis (a model deployed
        # a moment ago is found at once).
        refs = self.served_models()
        return None if model in refs else refs

    def _check(self, model: str, priority: str) -> None:
        try:
            parse_model_ref(model)
        except ValueError as exc:
            raise UnknownModel(str(exc)) from None
        if priority not in PRIORITIES:
            raise SubmitError(f"invalid priority {priority!r}: use high, normal or low")
        policy = self.keyring.tenant(self.tenant).policy
        if not policy.allows_model(model):
            raise PolicyDenied(f"tenant {self.tenant!r} may not use model {model!r}")
        if not policy.allows_priority(priority):
            raise PolicyDenied(
                f"tenant {self.tenant!r} may not submit at priority {priority!r}"
                f" (highest allowed: {policy.max_priority})"
            )
        served = self._serves(model)
        if served is not None:
            offer = ", ".join(sorted(r for r in served if "@" not in r)) or "none"
            raise UnknownModel(f"unknown model {model!r} (served: {offer})")

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
        header, sealed = self._seal_raw(
            model, inputs, priority=priority, ttl_s=ttl_s, job_id=job_id
        )
        return header, base64.b64encode(sealed).decode("ascii")

    def _seal_raw(
        self,
        model: str,
        inputs: Any,
        *,
        priority: str,
        ttl_s: int | None,
        job_id: str | None = None,
    ) -> tuple[Header, bytes]:
        """`seal` without the base64: a claim-checked request is stored raw."""
        if isinstance(priority, Priority):
            priority = priority.value  # the header and the error messages hold the plain name
        self._check(model, priority)
        if job_id is not None and not keyspace.is_job_id(job_id):
            raise SubmitError("job_id must be a UUID in canonical form (lowercase, hyphenated)")
        try:
            body = json.dumps(inputs, separators=(",", ":"), allow_nan=False).encode()
        except RecursionError:
            raise SubmitError(
                f"inputs nest too deeply (the limit is {jsonlimits.MAX_INPUT_DEPTH} levels)"
            ) from None
        except (TypeError, ValueError) as exc:
            raise SubmitError(f"inputs are not JSON-serialisable: {exc}") from None
        if len(body) > self.settings.max_input_bytes:
            raise InputTooLarge(
                f"input is {_size(len(body))}, more than the limit "
                f"MAAS_MAX_INPUT_BYTES={self.settings.max_input_bytes}"
            )
        if not jsonlimits.depth_within(body, jsonlimits.MAX_INPUT_DEPTH):
            raise SubmitError(
                f"inputs nest deeper than {jsonlimits.MAX_INPUT_DEPTH} levels, the limit"
            )
        ttl = self.settings.job_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= MAX_JOB_TTL_S:
            raise SubmitError(f"ttl_s must be in 1..{MAX_JOB_TTL_S}")
        kv = self.keyring.tenant(self.tenant).primary()
        issued = now_ms()
        header = Header(
            "request",
            kv.version,
            issued,
            issued + ttl * 1000,
            priority,
            self.tenant,
            job_id or str(uuid.uuid4()),
            TASK_NAME,
            model,
        )
        return header, seal(kv.keys(self.tenant), header, body, crypto=self.crypto)

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
        if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
            raise SubmitError("submit_many takes a list of inputs")
        if not inputs:
            return []
        sealed = []
        for index, item in enumerate(inputs):
            try:
                sealed.append(self._seal_raw(model, item, priority=priority, ttl_s=ttl_s))
            except (UnknownModel, PolicyDenied):
                raise  # the same for every item
            except SubmitError as exc:
                if len(inputs) == 1:
                    raise
                # Say which input failed (its index in ``inputs``); nothing is enqueued.
                raise type(exc)(f"item {index}: {exc}") from None
        self._check_depth(priority, len(sealed))
        self._admit([h for h, _ in sealed])
        queue = queue_for(priority)
        # Claim check: a large sealed request goes to Redis as raw bytes, and
        # the Celery message only points at it, so its megabytes are not
        # base64-encoded twice (ours, then kombu's) and JSON-escaped between.
        large = [(h, raw) for h, raw in sealed if len(raw) > INLINE_MAX_BYTES]
        if large:
            with backend_errors(self.settings):
                pipe = self.backend.pipeline(transaction=False)
                for header, raw in large:
                    pipe.set(
                        keyspace.payload(self.tenant, header.job_id),
                        raw,
                        px=header.expires_at_ms - header.issued_at_ms + 60_000,
                    )
                pipe.execute()
        try:
            # kombu's producer batch puts every message (and its task-sent
            # event) into one Redis pipeline: one round trip, not two per job.
            with self.app.producer_or_acquire() as producer, producer.batch():
                ref = payload_ref(self.tenant)
                for header, raw in sealed:
                    # base64 only what travels inside the message
                    arg = (
                        ref
                        if len(raw) > INLINE_MAX_BYTES
                        else base64.b64encode(raw).decode("ascii")
                    )
                    self.app.send_task(
                        TASK_NAME,
                        args=[arg],
                        task_id=header.job_id,
                        queue=queue,
                        producer=producer,
                        # Celery copies args into message headers and events for
                        # display; say what it is instead of repeating the ciphertext.
                        argsrepr=ARGS_REPR,
                        kwargsrepr="{}",
                        # Declare nothing: the job queues are the workers' (they
                        # bind them), and a producer's Redis user may only push
                        # to them (docs/security.md, Redis roles).
                        declare=[],
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
        # After the send: a marker for a job that never got enqueued would
        # report it "queued" forever. It holds the expiry, so status can tell
        # queued from expired. The jobs are enqueued by now: if the markers
        # cannot be written, they are still accepted (status is unknown until
        # a worker takes them), not reported as failed and submitted twice.
        try:
            pipe = self.backend.pipeline(transaction=False)
            for header, _ in sealed:
                pipe.set(
                    keyspace.submitted(self.tenant, header.job_id),
                    str(header.expires_at_ms),
                    ex=(header.expires_at_ms - header.issued_at_ms) // 1000
                    + self.settings.result_ttl_s,
                )
            pipe.execute()
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

    def _check_depth(self, priority: str, adding: int = 1) -> None:
        """Backpressure: refuse while the priority's queue is at its maximum depth."""
        limit = self.settings.max_queue_depth[priority]
        now = time.monotonic()
        read_at, depth = self._depth.get(priority, (0.0, 0))
        # Re-read the length at most every DEPTH_CACHE_S, and always when close
        # to the limit; in between, count our own submits.
        if now - read_at > DEPTH_CACHE_S or depth + adding >= limit * 0.9:
            try:
                depth = int(self.broker.llen(queue_for(priority)))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ServiceUnavailable(
                    f"broker unavailable ({redact_url(self.settings.broker_url)}: "
                    f"{connection_cause(exc)}); the job was not submitted, retry later"
                ) from None
            read_at = now
        self._depth[priority] = (read_at, depth + adding)
        if depth + adding > limit:
            self._depth.pop(priority, None)
            raise QueueFull(
                f"the {priority} queue is full ({depth} jobs, limit {limit}, "
                "MAAS_MAX_QUEUE_DEPTH); retry later",
                QUEUE_FULL_RETRY_S,
            )

    def _admit(self, headers: list[Header]) -> None:
        """Check the tenant's quota now, for fast feedback (advisory: workers charge it)."""
        policy = self.keyring.tenant(self.tenant).policy
        with backend_errors(self.settings):
            verdict = self.quotas.advise_many(
                self.tenant,
                [h.job_id for h in headers],
                policy,
                max(h.expires_at_ms for h in headers),
            )
        if verdict.admitted:
            return
        if verdict.over == "rate" and verdict.retry_after_s is None:
            raise RateLimited(
                f"a batch of {len(headers)} jobs is larger than tenant "
                f"{self.tenant!r}'s burst ({policy.effective_burst}); "
                "submit fewer at a time",
                None,
            )
        if verdict.over == "rate":
            raise RateLimited(
                f"tenant {self.tenant!r} is over its rate limit ({policy.rate_per_s:g} jobs/s, "
                f"burst {policy.effective_burst}); retry after {verdict.retry_after_s:.3f} s",
                verdict.retry_after_s,
            )
        raise RateLimited(
            f"tenant {self.tenant!r} has {policy.max_in_flight} jobs in flight, "
            "its maximum; retry when one finishes",
            None,
        )

    def job(self, job_id: str) -> Job:
        """A handle on an existing job of this client's tenant, by id (`UnknownJob` if the
        id is not a job id)."""
        if not keyspace.is_job_id(job_id):
            raise UnknownJob(
                repr(job_id[:64]),
                "not a job id (job ids are UUIDs such as 0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c)",
            )
        return Job(self, job_id)
