"""The rules of submitting, without I/O: what `Client` and `AsyncClient` share.

Both clients are thin drivers around `ClientCore`: it holds the settings,
the keyring, the caches (catalogue, live workers, queue depths) and every
check, seals requests, and says which Redis commands a step needs and what
their replies mean (`Plan`). The sync client runs those commands on a
redis-py client, the async one on a ``redis.asyncio`` client; neither holds
a second copy of a rule. Sealing is CPU work of microseconds: it stays
synchronous in both.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis

from maas_worker import jsonlimits
from maas_worker.backend import catalog, keyspace
from maas_worker.backend.redis import NotReplicated, wait_replicated
from maas_worker.broker import fetch, shards
from maas_worker.client import markers
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
from maas_worker.protocol import PRIORITIES, TASK_NAME, Priority, queue_for
from maas_worker.settings import MAX_JOB_TTL_S, Settings, redact_url
from maas_worker.tenancy import quota
from maas_worker.tenancy.cancellation import make_token
from maas_worker.tenancy.keyring import Keyring, KeyringSource, TenantPolicy

log = logging.getLogger("maas_worker.client.client")

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

T = TypeVar("T")
#: One Redis command: its name and arguments, as ``execute_command`` takes them.
Command = tuple[Any, ...]
#: A sealed request: its header and the raw (not base64) envelope.
Sealed = tuple[Header, bytes]


@dataclass(frozen=True)
class Plan(Generic[T]):
    """Commands to send in one pipeline (one round trip), and what their replies mean.

    ``parse`` takes the list of replies, in order. A driver runs it:
    `run_plan` (redis-py) or `arun_plan` (``redis.asyncio``).
    """

    commands: list[Command]
    parse: Callable[[list[Any]], T]


def run_plan(r: Any, plan: Plan[T]) -> T:
    """Run ``plan`` on a redis-py client: one pipeline, one round trip."""
    pipe = r.pipeline(transaction=False)
    for command in plan.commands:
        pipe.execute_command(*command)
    return plan.parse(pipe.execute())


async def arun_plan(r: Any, plan: Plan[T]) -> T:
    """Run ``plan`` on a ``redis.asyncio`` client: one pipeline, one round trip."""
    pipe = r.pipeline(transaction=False)
    for command in plan.commands:
        pipe.execute_command(*command)
    return plan.parse(await pipe.execute())


def _size(n: int) -> str:
    """A byte count as a person reads it: ``2.1 MB (2100000 bytes)``, ``512 bytes``."""
    if n < 1000:
        return f"{n} bytes"
    scaled = f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.1f} kB"
    return f"{scaled} ({n} bytes)"


def _decoded(rows: Any) -> set[str]:
    return {r.decode() if isinstance(r, bytes) else str(r) for r in rows}


def check_job_id(job_id: str) -> None:
    """Raise `UnknownJob` unless ``job_id`` has the form of a job id."""
    if not keyspace.is_job_id(job_id):
        raise UnknownJob(
            repr(job_id[:64]),
            "not a job id (job ids are UUIDs such as 0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c)",
        )


def check_inputs(inputs: Any) -> None:
    """Raise `SubmitError` unless ``inputs`` is a list of inputs (`submit_many`)."""
    if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
        raise SubmitError("submit_many takes a list of inputs")


class ClientCore:
    """Configuration, caches and checks of a client of one tenant (no I/O).

    The constructor is the clients' own: keywords override the environment
    (see `Client`).
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
        self._check_keys()  # fail now, not at the first submit
        self._served: tuple[float, set[str]] = (0.0, set())
        self._live: tuple[float, int] = (0.0, 0)
        self._depth: dict[str, tuple[float, int]] = {}
        self._own: tuple[Keyring | None, Keyring] = (None, self.keyring)

    # -- keys ------------------------------------------------------------------
    def _check_keys(self) -> None:
        """Raise unless the keyring can seal this tenant's jobs (it has a primary key)."""
        self.keyring.tenant(self.tenant).primary()

    def envelope_version(self) -> int:
        """The version of this tenant's primary envelope key (what new jobs are sealed
        with; a private-inference key follows it: client/private.py)."""
        return self.keyring.tenant(self.tenant).primary().version

    @property
    def policy(self) -> TenantPolicy:
        """This tenant's policy (models, priority, quotas), from the keyring in force."""
        return self.keyring.tenant(self.tenant).policy

    def cancel_token(self, job_id: str) -> str:
        """A cancel request for ``job_id`` signed with this tenant's primary MAC key."""
        return make_token(self.keyring, self.tenant, job_id)

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

    # -- catalogue and live workers ---------------------------------------------
    def catalog_plan(self) -> Plan[set[str]]:
        """Read the models this deployment serves (see `Client.served_models`); caches them."""
        since = time.time() - catalog.CATALOG_TTL_S

        def parse(replies: list[Any]) -> set[str]:
            live, ever = replies
            return self._remember_served(_decoded(live) | _decoded(ever), bool(ever))

        return Plan(
            [("ZRANGEBYSCORE", keyspace.CATALOG, since, "+inf"), ("SMEMBERS", keyspace.MODELS)],
            parse,
        )

    def advertised_plan(self) -> Plan[set[str]]:
        """`catalog_plan` for a Redis ACL from before the durable catalogue: the live one only."""
        since = time.time() - catalog.CATALOG_TTL_S
        return Plan(
            [("ZRANGEBYSCORE", keyspace.CATALOG, since, "+inf")],
            lambda replies: self._remember_served(_decoded(replies[0]), True),
        )

    def _remember_served(self, refs: set[str], ever: bool) -> set[str]:
        if not ever:
            refs |= bundled_refs()
        if self.settings.diagnostic_models:
            refs |= set(diagnostic_refs())
        self._served = (time.monotonic() + CATALOG_CACHE_S, refs)
        return refs

    def live_plan(self) -> Plan[int] | None:
        """Read how many worker nodes are live, or None while the cached count holds.

        Reused for `CATALOG_CACHE_S` while some are; re-read at each call while none is.
        """
        expires, count = self._live
        if count and time.monotonic() < expires:
            return None
        since = time.time() - catalog.NODE_LIVE_S

        def parse(replies: list[Any]) -> int:
            self._live = (time.monotonic() + CATALOG_CACHE_S, int(replies[0]))
            return self._live[1]

        return Plan([("ZCOUNT", keyspace.NODES, since, "+inf")], parse)

    @property
    def cached_live(self) -> int:
        """The live worker count `live_plan` last read."""
        return self._live[1]

    # -- checks ------------------------------------------------------------------
    def needs_catalog(self, model: str, priority: str | Priority) -> bool:
        """Whether checking ``model`` needs the catalogue read first (its cache is stale,
        or the model is not in it), after the checks that need none pass."""
        try:
            self._check_local(model, _plain(priority))
        except SubmitError:
            return False  # the check fails before it looks at the catalogue
        expires, refs = self._served
        return not (time.monotonic() < expires and model in refs)

    def _check_local(self, model: str, priority: str) -> None:
        try:
            parse_model_ref(model)
        except ValueError as exc:
            raise UnknownModel(str(exc)) from None
        if priority not in PRIORITIES:
            raise SubmitError(f"invalid priority {priority!r}: use high, normal or low")
        policy = self.policy
        if not policy.allows_model(model):
            raise PolicyDenied(f"tenant {self.tenant!r} may not use model {model!r}")
        if not policy.allows_priority(priority):
            raise PolicyDenied(
                f"tenant {self.tenant!r} may not submit at priority {priority!r}"
                f" (highest allowed: {policy.max_priority})"
            )

    def check(self, model: str, priority: str) -> None:
        """Every check of (model, priority) a client makes; the catalogue must be fresh
        (`needs_catalog`)."""
        self._check_local(model, priority)
        refs = self._served[1]
        if model not in refs:
            offer = ", ".join(sorted(r for r in refs if "@" not in r)) or "none"
            raise UnknownModel(f"unknown model {model!r} (served: {offer})")

    # -- sealing -------------------------------------------------------------------
    def seal_raw(
        self,
        model: str,
        inputs: Any,
        *,
        priority: str | Priority,
        ttl_s: int | None,
        job_id: str | None = None,
    ) -> Sealed:
        """Check and seal one job (the catalogue must be fresh): (header, raw envelope)."""
        priority = _plain(priority)
        self.check(model, priority)
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

    def seal_many(
        self, model: str, inputs: Sequence[Any], *, priority: str | Priority, ttl_s: int | None
    ) -> list[Sealed]:
        """`seal_raw` for each input of a batch; a failing input is named by its index."""
        sealed = []
        for index, item in enumerate(inputs):
            try:
                sealed.append(self.seal_raw(model, item, priority=priority, ttl_s=ttl_s))
            except (UnknownModel, PolicyDenied):
                raise  # the same for every item
            except SubmitError as exc:
                if len(inputs) == 1:
                    raise
                # Say which input failed (its index in ``inputs``); nothing is enqueued.
                raise type(exc)(f"item {index}: {exc}") from None
        return sealed

    # -- queue shard ------------------------------------------------------------------
    @property
    def shard(self) -> int:
        """The queue shard this tenant's jobs go to (`shards.shard_of`, the placement rule)."""
        return shards.shard_of(self.tenant, self.settings.redis_ha.queue_shards)

    @property
    def key_prefix(self) -> str:
        """The key prefix of this tenant's queue shard (``""`` when not sharded)."""
        return shards.key_prefix(self.settings, self.shard)

    # -- backpressure and quota -------------------------------------------------------
    def depth_key(self, priority: str) -> str:
        """The list whose length is this tenant's queue depth at ``priority``: its own
        list of the priority's queue (fair share, broker/fetch.py), in its shard."""
        return self.key_prefix + fetch.tenant_queue(queue_for(priority), self.tenant)

    def depth_needs_read(self, priority: str, adding: int) -> bool:
        """Whether the queue length must be read before `commit_depth` (cache stale or
        close to the limit); the read is ``LLEN`` of `depth_key` on the broker.

        The limit is per tenant: a tenant sees only its own list (its Redis user
        may read no other), and behind fair share one tenant's backlog no longer
        delays the others, so it is the one each tenant must bound."""
        limit = self.settings.max_queue_depth[priority]
        read_at, depth = self._depth.get(priority, (0.0, 0))
        return time.monotonic() - read_at > DEPTH_CACHE_S or depth + adding >= limit * 0.9

    def commit_depth(self, priority: str, adding: int, read: int | None) -> None:
        """Backpressure: count ``adding`` jobs into the priority's queue, or raise `QueueFull`.

        ``read`` is the length just read (`depth_needs_read`), None to use the cache.
        """
        limit = self.settings.max_queue_depth[priority]
        read_at, depth = self._depth.get(priority, (0.0, 0))
        if read is not None:
            read_at, depth = time.monotonic(), read
        self._depth[priority] = (read_at, depth + adding)
        if depth + adding > limit:
            self._depth.pop(priority, None)
            raise QueueFull(
                f"the {priority} queue is full for tenant {self.tenant!r} "
                f"({depth} jobs, limit {limit}, "
                "MAAS_MAX_QUEUE_DEPTH); retry later",
                QUEUE_FULL_RETRY_S,
            )

    def admit_call(self, headers: list[Header]) -> tuple[str, list[str], list[Any]] | None:
        """The advisory quota check of a batch (`quota.advise_call`), or None when this
        tenant has no quota (no round trip); `admit_verdict` reads its reply."""
        return quota.advise_call(
            self.tenant,
            [h.job_id for h in headers],
            self.policy,
            max(h.expires_at_ms for h in headers),
        )

    def admit_verdict(self, headers: list[Header], reply: Any) -> None:
        """Raise `RateLimited` if the quota check's reply refuses the batch."""
        code, wait_ms = reply
        verdict = quota.verdict(int(code), int(wait_ms))
        if verdict.admitted:
            return
        policy = self.policy
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

    # -- the submit, step by step ------------------------------------------------------------
    def submit_flow(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        priority: str | Priority,
        ttl_s: int | None,
    ) -> SubmitFlow:
        """`Client.submit_many` without its I/O: yields each `Step` in order and returns
        the sealed requests and whether a worker was live.

        All or nothing: every check and the quota come before anything is
        written; large requests are stored before their messages point at them;
        the queued markers are written after the send.
        """
        check_inputs(inputs)
        if not inputs:
            return [], None
        if self.needs_catalog(model, priority):
            yield Step("catalog")
        sealed = self.seal_many(model, inputs, priority=priority, ttl_s=ttl_s)
        return (yield from self.enqueue_flow(sealed))

    def enqueue_flow(self, sealed: list[Sealed], *, pinned: Any = None) -> SubmitFlow:
        """The I/O half of `submit_flow` for requests sealed already (all of one priority):
        backpressure, the advisory quota, payloads, the send, the markers.

        The gateway (maas_worker/gateway) drives it with envelopes its callers sealed,
        and hands ``pinned`` (the ``pin`` step's reply) noted before it wrote their
        markers.
        """
        plain = sealed[0][0].priority
        read = (yield Step("depth", plain)) if self.depth_needs_read(plain, len(sealed)) else None
        self.commit_depth(plain, len(sealed), read)
        if self.settings.redis_ha.wait_replicas and pinned is None:
            # Where the writes below go, for the replicate step to check (a Redis Cluster).
            pinned = yield Step("pin")
        headers = [h for h, _ in sealed]
        call = self.admit_call(headers)
        if call is not None:
            self.admit_verdict(headers, (yield Step("admit", call)))
        payloads = self.payload_commands(sealed)
        if payloads:
            yield Step("payloads", payloads)
        yield Step("send", (sealed, queue_for(plain)))
        unreachable: Exception | None = None
        try:
            yield Step("markers", self.marker_write(sealed))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # The jobs are enqueued by now: they are still accepted (status is
            # unknown until a worker takes them), not reported as failed and
            # submitted twice.
            log.warning(
                "%d job(s) enqueued, but their queued markers could not be written", len(sealed)
            )
            unreachable = exc
        if self.settings.redis_ha.wait_replicas:
            if unreachable is not None:
                raise not_replicated(self.settings, sealed, unreachable)
            try:
                replies = yield Step("replicate", (self.replicate_commands(), pinned))
                wait_replicated(replies[-1], self.settings.redis_ha, "submit")
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise not_replicated(self.settings, sealed, exc) from None
        live: bool | None = None
        try:
            # Not asked of a server that just failed to answer: a hung one would
            # hold the submit for a second socket timeout (the jobs are queued).
            if unreachable is None:
                live = (yield Step("live")) > 0
        except (ServiceUnavailable, redis.exceptions.NoPermissionError):
            live = None  # not known (Redis gone, or an ACL from before); the jobs are queued
        if live is False:
            log.info("%d job(s) queued; no worker is consuming right now", len(sealed))
        return sealed, live

    # -- what goes to Redis ---------------------------------------------------------------
    def payload_commands(self, sealed: list[Sealed]) -> list[Command]:
        """Claim check: a large sealed request goes to Redis as raw bytes, and its message
        only points at it, so its megabytes are not base64-encoded twice and JSON-escaped
        between. Written before the messages are sent."""
        return [
            (
                "SET",
                keyspace.payload(self.tenant, h.job_id),
                raw,
                "PX",
                h.expires_at_ms - h.issued_at_ms + 60_000,
            )
            for h, raw in sealed
            if len(raw) > INLINE_MAX_BYTES
        ]

    def replicate_commands(self) -> list[Command]:
        """The durability step (``MAAS_REDIS_WAIT_REPLICAS``), sent to the broker after
        everything else: a write, then ``WAIT`` in the same pipeline.

        ``WAIT`` vouches only for the writes of its own connection (Redis keeps
        the replication offset per connection), and the send went through
        another. So this pipeline writes first (one more wake-up token: harmless,
        a consumer that finds nothing waits again): its offset is past every
        write that came before, the send's and, when the result backend is the
        same Redis, the payloads' and markers' too, so the ``WAIT`` covers them
        all. (A result backend on another Redis: docs/scaling.md.)
        """
        wait = self.settings.redis_ha.wait_command()
        assert wait is not None
        wake = self.key_prefix + fetch.WAKE_KEY  # on the tenant's shard's connection
        return [("LPUSH", wake, "1"), ("LTRIM", wake, 0, fetch.WAKE_MAX - 1), wait]

    def marker_write(self, sealed: list[Sealed]) -> markers.MarkerWrite:
        """The queued markers, written after the send: a marker for a job that never got
        enqueued would report it "queued" forever. Each holds the expiry, so status can
        tell queued from expired. One library call for the batch (client/markers.py)."""
        return markers.mark(self.tenant, [h for h, _ in sealed], self.settings.result_ttl_s)


def message_arg(tenant_ref: str, raw: bytes) -> str:
    """The task argument that carries a sealed request: the base64 envelope, or the claim
    check reference ``tenant_ref`` for one stored beside the message."""
    return tenant_ref if len(raw) > INLINE_MAX_BYTES else base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Step:
    """One I/O step of `ClientCore.submit_flow`, for the driving client to carry out.

    ``kind`` and what the flow expects back:

    * ``catalog``: read the served models (`catalog_plan`); nothing;
    * ``depth``: the length of the tenant's list of priority ``arg`` (`ClientCore.depth_key`,
      on the broker): an int;
    * ``pin``: with ``MAAS_REDIS_WAIT_REPLICAS``, before anything is written: where the
      writes will go (`barrier.pin` of the backend, `shards.epoch` of the broker; no
      I/O but an asyncio cluster client's first slot map), handed back to ``replicate``;
    * ``admit``: ``FCALL`` of ``arg`` (function, keys, args) on the backend: its reply;
    * ``payloads``: run the commands ``arg`` on the backend; nothing;
    * ``send``: enqueue ``arg`` = (sealed requests, queue); nothing;
    * ``markers``: write the queued markers ``arg`` (a `markers.MarkerWrite`) on the
      backend (`markers.write`); nothing;
    * ``replicate``: ``arg`` = (commands, the ``pin`` reply): run the commands on the
      broker (`ClientCore.replicate_commands`), then `check_shard` and the backend's
      barrier (`barrier.confirm`; a Redis Cluster only): their replies;
    * ``live``: how many workers are live (`Client.live_workers`).

    A step that fails is thrown into the flow (`drive` and `adrive` do both).
    """

    kind: str
    arg: Any = None


#: What `ClientCore.submit_flow` yields, is sent back, and returns.
SubmitFlow = Generator[Step, Any, tuple[list[Sealed], bool | None]]


class _Driving:
    """Where a driven `SubmitFlow` stands: the next step, then its result."""

    def __init__(self, flow: SubmitFlow) -> None:
        self._flow = flow
        self.result: tuple[list[Sealed], bool | None] = ([], None)

    def next(self, reply: Any = None, error: BaseException | None = None) -> Step | None:
        """Hand the last step's reply (or its error) to the flow: its next step, or None."""
        try:
            return self._flow.send(reply) if error is None else self._flow.throw(error)
        except StopIteration as end:
            self.result = end.value
            return None


def drive(flow: SubmitFlow, carry_out: Callable[[Step], Any]) -> tuple[list[Sealed], bool | None]:
    """Run ``flow`` to its end, doing each step with ``carry_out`` (sync clients)."""
    driving = _Driving(flow)
    step = driving.next()
    while step is not None:
        try:
            reply = carry_out(step)
        except Exception as exc:  # the flow decides: it handles the error or raises it
            step = driving.next(error=exc)
        else:
            step = driving.next(reply)
    return driving.result


async def adrive(
    flow: SubmitFlow, carry_out: Callable[[Step], Awaitable[Any]]
) -> tuple[list[Sealed], bool | None]:
    """`drive` for asyncio clients: ``carry_out`` is a coroutine function."""
    driving = _Driving(flow)
    step = driving.next()
    while step is not None:
        try:
            reply = await carry_out(step)
        except Exception as exc:  # the flow decides: it handles the error or raises it
            step = driving.next(error=exc)
        else:
            step = driving.next(reply)
    return driving.result


def check_shard(broker: Any, epoch: int | None) -> None:
    """After the replicate step's ``WAIT`` on the tenant's shard connection: refuse
    (`NotReplicated`) if the shard's node was forgotten since the ``pin`` step (on a
    Redis Cluster: the send and the ``WAIT`` may have gone to two nodes)."""
    if epoch is not None and shards.epoch(broker) != epoch:
        raise NotReplicated("the node of the tenant's queue shard changed during the submit")


def broker_unavailable(
    settings: Settings, exc: BaseException, *, what: str = "the job was not submitted"
) -> ServiceUnavailable:
    """The error for a broker that cannot be reached before anything was sent."""
    return ServiceUnavailable(
        f"broker unavailable ({redact_url(settings.broker_url)}: "
        f"{connection_cause(exc)}); {what}, retry later"
    )


def not_replicated(
    settings: Settings, sealed: list[Sealed], exc: BaseException
) -> ServiceUnavailable:
    """The error for a submit whose jobs are queued on the primary but not confirmed on
    ``MAAS_REDIS_WAIT_REPLICAS`` replicas (`NotReplicated`, or the connection lost
    before ``WAIT`` answered): a failover now could lose them, or not."""
    return ServiceUnavailable(
        f"submitted, but not confirmed on the replicas "
        f"({exc if isinstance(exc, NotReplicated) else connection_cause(exc)}); "
        "these jobs are queued unless a failover loses them: check their status "
        "(ServiceUnavailable.job_ids) before submitting them again",
        job_ids=[h.job_id for h, _ in sealed],
    )


def send_interrupted(settings: Settings, sealed: list[Sealed]) -> ServiceUnavailable:
    """The error for a connection lost while the messages were being sent: some jobs may
    be queued all the same. It says so, and which, rather than invite a blind
    resubmission that would run them twice."""
    return ServiceUnavailable(
        f"broker connection lost while submitting "
        f"({redact_url(settings.broker_url)}); these jobs may or may not have "
        "been enqueued: check their status (ServiceUnavailable.job_ids) once the "
        "broker is back, before submitting them again",
        job_ids=[h.job_id for h, _ in sealed],
    )


def _plain(priority: str | Priority) -> str:
    # The header and the error messages hold the plain name.
    return priority.value if isinstance(priority, Priority) else priority
