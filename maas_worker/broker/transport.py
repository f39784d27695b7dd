"""The worker's guard at the Redis transport: what a Redis writer puts in a queue.

kombu's Redis channel takes a message from a queue, parses it and hands it to Celery.
Whatever sits in a queue list was written by someone with Redis write access.
`HardenedChannel` keeps the consumer alive and the queue truthful:

* each entry must pass `entries.check_message` (on the job queues only well-formed
  protocol-2 JSON messages of ``maas.infer`` with a UUID task id, no larger than the
  envelope limit allows, whose body is a plain task call; on the monitoring queue only
  ``maas.sample``), parsed with bounded depth;
* it is stamped with the queue it was really taken from, which the pipeline compares
  with the priority in the sealed header (never the routing key the message carries);
* a job message's Celery headers are replaced with ours (`entries.sanitize_headers`): no
  ``expires``, ``timelimit`` or far ``eta`` a Redis writer set decides whether or when a
  job runs;
* anything else is dropped (it was already popped, so it is gone), logged and audited
  as ``malformed`` (``oversize`` for a body over the limit), and the worker carries on;
  connection errors still propagate, so kombu reconnects.

Taking a message is atomic: the channel pops and reserves in one Lua script (`fetch`),
and an idle channel waits on the wake-up list its producers ring with every publish. A
lost connection must not stop the worker either: `HardenedQoS` leaves to the
visibility sweep what kombu cannot put back, acknowledge or reject on a channel the
lost connection tore down. The defects each of these closes are in docs/reliability.md
("Defects the suite found").

Producers (`Client`) select `Transport` as their app's ``broker_transport`` so that
they ring the wake-up list and push each job to its tenant's list of the queue (the
message property `fetch.TENANT_PROPERTY` names it) with the tenant's arrival (fair
share, fetch.py); a put-back job returns to the list it was taken from. Worker
processes `install` the channel over kombu's Redis transport (``tasks.py`` does). A
producer on a ``redis+socket://`` URL gets kombu's plain transport (the URL names it):
its jobs go to the queue's own list (taken first, outside the tenant ring) and are
found by the idle poll instead, within a second.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from maas_worker.broker import fetch, shards
from maas_worker.broker.entries import (
    CONSUMED_QUEUES,
    JOB_QUEUES,
    Refused,
    check_message,
    max_body_chars,
    parse_entry,
    sanitize_headers,
    str_field,
    unverified_entry_id,
)
from maas_worker.broker.scheduling import ReservedShareCycle
from maas_worker.protocol import TENANT_RE, AuditReason
from maas_worker.settings import Settings

log = logging.getLogger(__name__)

#: Queues kombu declares for the replies to a remote-control broadcast
#: (``<uuid>.reply.celery.pidbox``): the sender consumes its own.
REPLY_QUEUE_SUFFIX = ".reply.celery.pidbox"

#: What a Redis demoted to a replica answers a client blocked in BRPOP (``-UNBLOCKED
#: force unblock from blocking operation, instance state changed (master -> replica?)``).
DEMOTED_REPLY = "UNBLOCKED"

#: A ``READONLY`` reply (a replica, or a primary demoted under us) is a connection
#: to the wrong server, not a bad command: on a fixed address Celery stopped
#: consuming ("Unrecoverable error: ReadOnlyError", issue #17); as a connection
#: error the worker reconnects instead and keeps trying until a writable primary
#: answers there.
CONNECTION_ERRORS: Any = (
    *kombu_redis.Transport.connection_errors,
    ReadOnlyError,
)


class _PrefixedCommands(kombu_redis.GlobalKeyPrefixMixin):
    """kombu's key prefixing, also for the commands our channel adds (``LTRIM`` of
    the wake-up list): with a shard's prefix every key must carry it (shards.py)."""

    # A list, as kombu's (it tests membership per command).
    PREFIXED_SIMPLE_COMMANDS = [  # noqa: RUF012
        *kombu_redis.GlobalKeyPrefixMixin.PREFIXED_SIMPLE_COMMANDS,
        "LTRIM",
    ]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return PrefixedPipeline(  # type: ignore[no-untyped-call]
            self.connection_pool,  # type: ignore[attr-defined]
            self.response_callbacks,  # type: ignore[attr-defined]
            transaction,
            shard_hint,
            global_keyprefix=self.global_keyprefix,  # type: ignore[attr-defined]
        )


class PrefixedClient(_PrefixedCommands, kombu_redis.PrefixedStrictRedis):
    """kombu's prefixing client with `_PrefixedCommands`."""


class PrefixedPipeline(_PrefixedCommands, kombu_redis.PrefixedRedisPipeline):
    """kombu's prefixing pipeline with `_PrefixedCommands`."""


def _job_id(raw: Any) -> str:
    headers = raw.get("headers") if isinstance(raw, dict) else None
    return str_field(headers, "id") or ""


class _Auditor:
    """Audit records for refused queue entries, from the worker's main process."""

    def __init__(self) -> None:
        self._audit: Any = None
        #: The worker's settings (`install`): where records go, how many are kept.
        self.settings: Settings | None = None
        #: Hears each record's reason (`install`; the worker counts refusals with it).
        self.on_record: Callable[[AuditReason], None] | None = None

    def record(
        self,
        raw: Any,
        reason: AuditReason,
        *,
        job_id: str | None = None,
        detail: str = "",
        tenant: str | None = None,
    ) -> None:
        """One record for a refused entry (or control command): its id from ``raw``
        (parsed) or ``job_id``; ``tenant``: the tenant whose list the entry was
        taken from (only that tenant's producers may push there), else none."""
        try:
            if self._audit is None:
                from maas_worker.backend.audit import AuditLog
                from maas_worker.backend.redis import backend_client

                settings = self.settings
                if settings is None:
                    raise RuntimeError("transport.install was given no settings")
                self._audit = AuditLog(
                    backend_client(settings),
                    maxlen=settings.audit_maxlen,
                    on_record=self.on_record,
                )
            self._audit.record(
                job_id=_job_id(raw) if job_id is None else job_id,
                tenant=tenant or "",
                reason=reason,
                verified=False,
                detail=detail,
            )
        except Exception:  # never let auditing stop the consumer
            log.error("could not audit a refused queue entry", exc_info=False)


#: Audit records from the worker's main process (refused entries and control commands).
auditor = _Auditor()


class HardenedQoS(kombu_redis.QoS):
    """kombu's Redis QoS, whose bookkeeping on a lost connection cannot stop the worker.

    When the connection to Redis is lost, Celery closes the channel: closing
    puts this worker's reserved messages back in their queues, and jobs that
    were running then finish and ack or reject their message on that closed
    channel. With the connection gone each of these can fail inside kombu with
    an AttributeError (its transport is already torn down), not a connection
    error, which Celery treats as unrecoverable (docs/reliability.md, defect 7), so each
    is skipped here and the worker reconnects. Nothing is lost by skipping them: the
    messages are still in the unacked set in Redis, and the visibility sweep brings them
    back (a finished job's copy is then refused as already done).

    A message taken by `fetch` is already reserved in Redis: recording it
    again would only cost a round trip, so only the local bookkeeping is done.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        #: Delivery tags taken and reserved in one step, not yet appended.
        self.prereserved: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as reserved (locally only if `fetch` reserved it)."""
        if delivery_tag in self.prereserved:
            self.prereserved.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def forget(self, delivery_tag: str) -> None:
        """Drop the reservation of a taken message that will not be delivered."""
        self.prereserved.discard(delivery_tag)
        if delivery_tag in self._delivered:
            self.ack(delivery_tag)
        else:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """Put reserved messages back now if possible; else leave them to the sweep."""
        try:
            return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]
        except Exception as exc:
            _left_to_sweep("put back", len(self._delivered), exc)
            return None

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge; on a channel torn down by a lost connection, leave it to the sweep."""
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except AttributeError as exc:
            _left_to_sweep("acknowledge", 1, exc)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject; on a channel torn down by a lost connection, leave it to the sweep."""
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except AttributeError as exc:
            _left_to_sweep("reject", 1, exc)


def _left_to_sweep(what: str, count: int, exc: Exception) -> None:
    log.warning(
        "could not %s %d reserved message(s) on a closed connection (%s); they return "
        "after the visibility timeout",
        what,
        count,
        type(exc).__name__,
    )


def _tenant_of(queue: str, message: Any) -> str | None:
    """The tenant a producer's job message is for (`fetch.TENANT_PROPERTY`), if it names
    a valid one and goes to a job queue; None sends it to the queue's own list."""
    if queue not in JOB_QUEUES or not isinstance(message, dict):
        return None
    tenant = str_field(message.get("properties"), fetch.TENANT_PROPERTY)
    return tenant if tenant and TENANT_RE.fullmatch(tenant) else None


class HardenedChannel(kombu_redis.Channel):
    """kombu's Redis channel: atomic takes, wake-ups, and refusal of foreign entries."""

    QoS = HardenedQoS
    #: The worker's settings (`install`); a channel without them (a producer's)
    #: applies the defaults' limits.
    settings: Settings | None = None
    #: Whether the next poll takes (EVAL) rather than waits for a wake-up (BRPOP).
    _ready = True
    #: What the command in flight on the poll connection is: "take" or "wait".
    _sent = "wait"
    #: Whether the server has the take script cached (EVALSHA, not EVAL).
    _script_known = False
    #: The tenant whose list the message being delivered was taken from.
    _list_tenant: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Queues consumed without acknowledgement (remote-control replies).
        self._no_ack: set[str] = set()
        self._sync_client: Any = None
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        if HardenedChannel.settings is not None and isinstance(
            self._queue_cycle, ReservedShareCycle
        ):
            # kombu makes the cycle without arguments: give it this worker's share.
            self._queue_cycle = ReservedShareCycle(
                share=HardenedChannel.settings.low_priority_share
            )

    def _create_client(self, asynchronous: bool = False) -> Any:
        """A redis-py client on the channel's pool, reused for every synchronous command.

        kombu builds a new client object for each acknowledgement and each
        event it publishes, a visible share of a busy worker's main-process CPU
        (docs/benchmarks.md). A redis-py client is thread-safe
        (each command borrows a connection from the pool), so one per pool
        does; a new pool (after a reconnection) gets a new client.
        """
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        if self._sync_client is None or self._sync_client.connection_pool is not pool:
            self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return self._sync_client

    def _get_client(self) -> Any:
        """kombu's client class; with a key prefix (a shard's) ours, which prefixes
        every command the channel sends (`PrefixedClient`)."""
        if self.global_keyprefix:
            return functools.partial(PrefixedClient, global_keyprefix=self.global_keyprefix)
        return super()._get_client()  # type: ignore[no-untyped-call]

    def _connparams(self, asynchronous: bool = False) -> Any:
        """kombu's connection parameters; on a Redis Cluster (`shards.CLUSTER_SEEDS_OPTION`)
        its connections go to the primary serving the shard's hash tag, found at
        each connection, and a MOVED-like reply is a connection error: Celery
        reconnects and the new connection finds the slot's owner again (shards.py)."""
        params = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        seeds = self.connection.client.transport_options.get(shards.CLUSTER_SEEDS_OPTION)
        if seeds and self.global_keyprefix:
            base = params["connection_class"]
            ssl = issubclass(base, redis.SSLConnection)
            owner = shards.locator(
                [(h, int(p)) for h, p in seeds], shards.slot_of_prefix(self.global_keyprefix)
            )
            params["connection_class"] = shards.pinned_class(
                base, owner, seed_class=redis.SSLConnection if ssl else redis.Connection
            )
        return params

    def _worker_settings(self) -> Settings:
        if HardenedChannel.settings is None:
            HardenedChannel.settings = Settings()
        return HardenedChannel.settings

    def _limit(self) -> int:
        return max_body_chars(self._worker_settings())

    # -- producing -------------------------------------------------------------
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Push ``message`` to ``queue`` and ring the wake-up list, in one round trip."""
        batch = kwargs.pop("_publish_batch", None)
        tenant = _tenant_of(queue, message)
        if tenant is not None:
            # Fair share: the job goes to its tenant's list, and the tenant to the
            # queue's arrivals (after the push: fetch.push).
            if batch is not None:
                batch.add("lpush", fetch.tenant_queue(queue, tenant), json.dumps(message))
                batch.add("sadd", fetch.arrivals_key(queue), tenant)
                batch.add("lpush", fetch.WAKE_KEY, "1")
                batch.add("ltrim", fetch.WAKE_KEY, 0, fetch.WAKE_MAX - 1)
                return
            with self.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
                fetch.push(pipe, queue, tenant, [json.dumps(message)])
                pipe.execute()
            return
        pri = self._get_message_priority(message, reverse=False)  # type: ignore[no-untyped-call]
        key = self._q_for_pri(queue, pri)  # type: ignore[no-untyped-call]
        expires = self._expires.get(queue) if self._expires else None
        if batch is not None:
            batch.add("lpush", key, json.dumps(message))
            batch.add("lpush", fetch.WAKE_KEY, "1")
            batch.add("ltrim", fetch.WAKE_KEY, 0, fetch.WAKE_MAX - 1)
            if expires:
                for pri in self.priority_steps:
                    batch.add(
                        "pexpire",
                        self._q_for_pri(queue, pri),  # type: ignore[no-untyped-call]
                        expires,
                    )
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, json.dumps(message))
            fetch.ring(pipe)
            if expires:
                for pri in self.priority_steps:
                    pipe.pexpire(
                        self._q_for_pri(queue, pri),  # type: ignore[no-untyped-call]
                        expires,
                    )
            pipe.execute()

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        if not exchange and fetch.split_tenant_queue(routing_key) is not None:
            # Taken from a tenant's list (the take recorded that list as the
            # routing key): back to that list as it is, whatever priority the
            # message claims, and the tenant announced again (fetch.announce).
            with contextlib.suppress(KeyError, TypeError):
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            # (kombu's client adds a global key prefix itself.)
            (pipe.lpush if leftmost else pipe.rpush)(routing_key, json.dumps(payload))
            fetch.announce(pipe, routing_key)
            return
        super()._do_restore_message(  # type: ignore[no-untyped-call]
            payload, exchange, routing_key, pipe, leftmost
        )
        fetch.ring(pipe)  # a put-back message is work too: wake a consumer

    # -- consuming -------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """Consume ``queue``, every delivery checked first (see the module docstring).

        Only our own queues and Celery's remote-control and event queues are
        consumed: a queue named by anything else (``add_consumer`` sent by
        whoever could publish) is not, so no message there is ever run.
        """
        if not (
            queue in CONSUMED_QUEUES
            or queue in self._fanout_queues
            or queue.endswith(REPLY_QUEUE_SUFFIX)
        ):
            log.warning("not consuming queue %.64r: not one of this deployment's queues", queue)
            auditor.record(
                None,
                AuditReason.POLICY,
                job_id="",
                detail=f"queue {queue[:64]!r} is not configured: not consumed",
            )
            return kwargs.get("consumer_tag") or (args[1] if len(args) > 1 else None)
        if no_ack:
            self._no_ack.add(queue)  # taken unreserved: nothing will acknowledge them
        else:
            self._no_ack.discard(queue)
        ret = super().basic_consume(  # type: ignore[no-untyped-call]
            queue, no_ack, *args, **kwargs
        )
        inner: Callable[[Any], Any] = self.connection._callbacks[queue]
        fanout = queue in self._fanout_queues

        def deliver(raw: Any) -> Any:
            try:
                check_message(raw, queue, max_body_chars=self._limit())
            except Refused as exc:
                log.warning("queue %s: refused an entry (%s): %s", queue, exc.reason, exc)
                self._forget(raw)
                auditor.record(raw, exc.reason, tenant=self._list_tenant)
                return None
            if not fanout:
                # The list it was popped from, not what the message claims: the
                # pipeline checks the sealed priority against this, and a
                # restored (unacked) message goes back to this same list.
                raw["properties"]["delivery_info"] = {"exchange": "", "routing_key": queue}
            if queue in JOB_QUEUES:
                # An eta no further ahead than our own retries set one.
                sanitize_headers(raw, max_eta_s=self._worker_settings().max_retry_delay_s)
                if self._list_tenant is not None:
                    # Celery hands headers to the task as request attributes.
                    raw["headers"][fetch.LIST_TENANT_HEADER] = self._list_tenant
            try:
                return inner(raw)
            except (*self.connection.connection_errors, *self.connection.channel_errors):
                # The message is reserved in Redis (and held here): closing
                # the channel or the visibility sweep puts it back.
                raise
            except Exception as exc:
                # Celery could not take it after all. Drop its reservation too:
                # a message held unacknowledged forever would use up the
                # prefetch and stop this worker consuming.
                log.warning(
                    "queue %s: refused an entry Celery could not read (%s)",
                    queue,
                    type(exc).__name__,
                )
                self._forget(raw)
                auditor.record(raw, AuditReason.MALFORMED, tenant=self._list_tenant)
                return None

        self.connection._callbacks[queue] = deliver
        return ret

    def _forget(self, raw: Any) -> None:
        props = raw.get("properties") if isinstance(raw, dict) else None
        tag = str_field(props, "delivery_tag")
        if tag and (tag in self.qos.prereserved or tag in self.qos._delivered):
            self.qos.forget(tag)

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Send the next poll: take a message if there may be one, else wait for a wake-up."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        prefix = self.global_keyprefix or ""
        if self._ready:
            args = fetch.command(
                queues,
                count=1,
                max_chars=self._limit(),
                unacked_key=self.unacked_key,
                index_key=self.unacked_index_key,
                prefix=prefix,
                unreserved=self._no_ack,
                by_sha=self._script_known,
            )
            self._sent = "take"
        else:
            args = ["BRPOP", prefix + fetch.WAKE_KEY, timeout or 0]
            self._sent = "wait"
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self.client.connection.send_command(*args)

    def _brpop_read(self, **options: Any) -> Any:
        sent = self._sent
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVAL" if sent == "take" else "BRPOP", **options
                )
            except self.connection_errors:
                # Reconnect on the next poll, and take first: the wake-up
                # tokens may have been lost with the server.
                self._ready = True
                self._script_known = False
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                # A restarted (or flushed) server: send the script itself next.
                self._script_known = False
                self._ready = True
                raise Empty() from None
            except ResponseError as exc:
                if not str(exc).startswith(DEMOTED_REPLY):
                    raise
                # The server became a replica under our BRPOP (a failover):
                # reconnect (through the sentinels, if any), as for a lost one.
                self._ready = True
                self._script_known = False
                self.client.connection.disconnect()
                raise RedisConnectionError("the server became a replica") from None
            if sent == "wait":
                # Woken (or timed out: something may have arrived without a
                # token, such as a message put back by the sweep): take next.
                self._ready = True
                raise Empty()
            self._script_known = True
            taken = fetch.parse(reply, self.global_keyprefix or "")
            if not taken:
                self._ready = False
                raise Empty()
            self._ready = True
            return self._deliver_taken(taken[0])
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _deliver_taken(self, taken: fetch.Taken) -> bool:
        self._queue_cycle.rotate(taken.queue)
        raw = parse_entry(taken.raw, max_chars=self._limit())
        if not isinstance(raw, dict) or not taken.tag_agrees(raw):
            # Not a message at all (it was popped, unreserved, or reserved
            # and too deep to parse), or one whose tag the take misread (built
            # to): drop it instead of letting it stop the worker.
            if taken.tag is not None:
                self.qos.prereserved.add(taken.tag)
                self.qos.forget(taken.tag)
            reason = (
                AuditReason.OVERSIZE if len(taken.raw) > self._limit() else AuditReason.MALFORMED
            )
            log.warning(
                "queue %s: refused a queue entry (%s) that cannot be read as a message",
                taken.queue,
                reason,
            )
            auditor.record(None, reason, job_id=unverified_entry_id(taken.raw), tenant=taken.tenant)
            return True
        if taken.tag is not None:
            self.qos.prereserved.add(taken.tag)
        # Read by the delivery callback (basic_consume's deliver), which runs
        # inside _deliver: the tenant list is known here, not in the message.
        self._list_tenant = taken.tenant
        try:
            self.connection._deliver(raw, taken.queue)
        finally:
            self._list_tenant = None
        return True


class HardenedSentinelChannel(HardenedChannel, kombu_redis.SentinelChannel):
    """`HardenedChannel` on kombu's Sentinel channel (a ``sentinel://`` broker URL).

    kombu's Sentinel channel only changes where connections go: its pool asks
    the sentinels for the primary of the ``master_name`` transport option at
    each new connection, and its connections drop themselves on a ``READONLY``
    reply (a primary demoted under them) with a connection error, so Celery
    reconnects to the new primary. The take, the wake-ups and the checks are
    `HardenedChannel`'s, unchanged.
    """


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `HardenedChannel` (producers' ``broker_transport``)."""

    Channel = HardenedChannel
    connection_errors = CONNECTION_ERRORS


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with `HardenedSentinelChannel` (a producer's
    ``broker_transport`` for a ``sentinel://`` URL)."""

    Channel = HardenedSentinelChannel
    connection_errors = CONNECTION_ERRORS


def install(
    settings: Settings | None = None,
    on_record: Callable[[AuditReason], None] | None = None,
) -> None:
    """Make kombu's Redis transport use `HardenedChannel` in this process (idempotent),
    and its Sentinel transport `HardenedSentinelChannel`.

    ``settings`` (the worker's) set the channels' limits, their queue order's
    reserved share and where refused entries are audited; ``on_record`` hears
    the reason of each of those records (the worker's refusal counter).
    """
    kombu_redis.Transport.Channel = HardenedChannel
    kombu_redis.SentinelTransport.Channel = HardenedSentinelChannel
    # A demoted primary's READONLY: reconnect, never stop consuming (CONNECTION_ERRORS).
    kombu_redis.Transport.connection_errors = CONNECTION_ERRORS
    kombu_redis.SentinelTransport.connection_errors = CONNECTION_ERRORS
    if settings is not None:
        HardenedChannel.settings = auditor.settings = settings
    if on_record is not None:
        auditor.on_record = on_record
