"""The batch consumer: the job pipeline run for many messages at a time.

A batch consumer process takes up to ``MAAS_CONSUMER_BATCH`` messages from the job
queues in one round trip (`fetch.take`: popped and reserved atomically in kombu's
unacked hash), runs each stage of pipeline.py (whose docstring holds the check order)
for the whole batch and pipelines the Redis work of a stage: one script call for the
claims (claim_batch.lua), one for the results (store_batch.lua), one round trip for the
acknowledgements (why that pays: docs/benchmarks.md). The batch scripts run, job by
job, the body of the one-job claim and store scripts, so each job's claim is still
decided and charged on its own. A model with ``predict_batch`` runs once per batch; others job by
job. Each job is still verified, bound to its message and queue, claimed, decrypted,
policy-checked, sealed and stored on its own, and its outcome logged and counted as the
task does.

Gathering works like Triton's dynamic batcher: take what is waiting (at most the batch
size); if that is less than a batch and ``MAAS_CONSUMER_WAIT_MS`` is set, keep taking
until the batch is full or the window is over.

Invariants: nothing accepted is lost, nothing runs twice.

* a message is acknowledged only once its job's result is stored or the job is
  rejected (a refused queue entry is audited and dropped, as the Celery consumer does);
* a job another live worker is running (``busy``), or one waiting for memory, stays
  reserved here and is retried after a delay; each retry refreshes the reservation's
  time so the sweep does not put a second copy back; on shutdown it is handed back to
  its queue;
* an error while handling one job (its parse, claim, model or store raised) is that
  job's alone: it is retried a few times, then failed and audited (pipeline.fault); the
  rest of the batch goes on, and a job whose shared model call raised runs again on its
  own;
* when Redis is out of reach mid-batch, claims of unfinished jobs are given back and
  their messages handed back to their queues (once Redis answers);
* a process that dies (killed, or ended at a hard time limit) leaves its messages
  reserved: the visibility sweep (supervisor.py) returns them after
  ``MAAS_VISIBILITY_TIMEOUT_S``, and the job claims tell finished jobs from unfinished
  ones.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from maas_worker.backend import audit, keyspace
from maas_worker.backend.claims import Claim, ClaimOutcome, ClaimRequest
from maas_worker.broker import fetch
from maas_worker.broker.entries import (
    Refused,
    check_message,
    max_body_chars,
    parse_entry,
    unverified_entry_id,
)
from maas_worker.broker.scheduling import ReservedShareCycle
from maas_worker.crypto.envelope import Verified
from maas_worker.monitoring import metrics
from maas_worker.protocol import (
    QUEUE_NAMES,
    TASK_NAME,
    AuditReason,
    JobOutcome,
    ResultDoc,
    payload_ref_tenant,
)
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.worker.batch.events import TaskEvents
from maas_worker.worker.pipeline import (
    UNAVAILABLE,
    Defer,
    Ended,
    Prepared,
    Stop,
    admission,
    can_batch,
    check_memory,
    fault,
    finished_outcome,
    prepare,
    refuse_unreadable,
    request_bytes,
    request_text,
    run_batch,
    run_one,
    seal_result,
    settle_claim,
    tenant_policy,
    verify_request,
    window_ms,
)
from maas_worker.worker.runtime import WorkerRuntime
from maas_worker.worker.task_state import not_succeeded

log = logging.getLogger(__name__)

#: Pause after a Redis or keyring error before trying again.
INFRA_BACKOFF_S = 1.0
#: An idle consumer waits for a wake-up this long at first, doubling while
#: nothing arrives up to `IDLE_PERIOD_S` times the node's consumer processes
#: (at most `IDLE_MAX_S`): a publish rings the wake-up list, which ends the wait
#: at once, so the timeout only bounds how late a job that came without a
#: wake-up (a restarted server) is seen. An idle node so sends about one take and
#: one wait per `IDLE_PERIOD_S` whatever its concurrency (docs/scaling.md).
IDLE_MIN_S = 0.001
IDLE_PERIOD_S = 1.0
#: Longest idle wait of one process (a warm shutdown waits for it to end).
IDLE_MAX_S = 5.0


@dataclass
class _Delivery:
    """One message of a batch as it goes through the stages."""

    taken: fetch.Taken
    job_id: str = ""
    text: str = ""
    fetched: bytes | int | None = None
    verified: Verified | None = None
    policy: TenantPolicy | None = None
    job: Prepared | None = None
    doc: ResultDoc | None = None
    #: This process holds the job's claim (its quota is released after the batch).
    claimed: bool = False
    #: Refused at the transport check: audited, never a job outcome line.
    refused: bool = False
    #: Final outcome (the message is acknowledged); None while undecided.
    outcome: JobOutcome | None = None
    #: The failure code of a failed job's stored result (its outcome line says it).
    failure: str | None = None
    #: Set when the message is kept and retried after this many seconds.
    defer_s: float | None = None

    @property
    def tag(self) -> str | None:
        """The delivery tag it is reserved under (None: taken unreserved)."""
        return self.taken.tag

    @property
    def pending(self) -> bool:
        return self.outcome is None and self.defer_s is None


class BatchConsumer:
    """Takes batches of job messages and runs them through the pipeline (one process)."""

    def __init__(
        self,
        rt: WorkerRuntime,
        broker: redis.Redis,
        *,
        max_jobs: int,
        wait_s: float = 0.0,
        events: TaskEvents | None = None,
        siblings: int = 1,
        prefix: str = "",
    ) -> None:
        self.rt = rt
        #: The key prefix of the queue shard this process consumes (shards.py).
        self.prefix = prefix
        self.events = events
        self.broker = broker
        self.max_jobs = max_jobs
        self.wait_s = wait_s
        self.batches = 0
        self.jobs = 0
        s = rt.settings
        # The same limit the Celery consumer applies (transport.HardenedChannel).
        self._max_chars = max_body_chars(s)
        self._cycle = ReservedShareCycle(list(QUEUE_NAMES), share=s.low_priority_share)
        self._share_n = max(1, round(max_jobs * s.low_priority_share))
        self._deferred: list[tuple[float, fetch.Taken]] = []
        self._to_ack: list[str] = []
        self._to_hand_back: list[fetch.Taken] = []
        self._to_touch: list[str] = []
        self._current: list[_Delivery] = []
        self._idle_s = IDLE_MIN_S
        #: This process's longest idle wait: the node's processes together poll
        #: about once per IDLE_PERIOD_S.
        self._idle_max_s = min(IDLE_MAX_S, IDLE_PERIOD_S * max(1, siblings))

    # -- the loop ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then finish the batch, acknowledge, hand back."""
        done = threading.Event()
        keeper = threading.Thread(
            target=self._keep_reserved, args=(done,), name="maas-reservations", daemon=True
        )
        keeper.start()
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as exc:
                    self._recover(exc)
                    stop.wait(INFRA_BACKOFF_S)
            self._shutdown()
        finally:
            done.set()

    def _keep_reserved(self, done: threading.Event) -> None:
        """Refresh the reservation time of every message this process holds.

        A batch (or a job) that runs longer than the visibility timeout would
        otherwise have its messages put back by the sweep while it runs: a
        second copy, refused as ``replayed`` once the first finishes. Once the
        process is gone the refreshes stop, and the sweep returns what it held
        one visibility timeout later.
        """
        interval = max(0.25, self.rt.settings.visibility_timeout_s / 4)
        while not done.wait(interval):
            tags = [d.tag for d in list(self._current) if d.tag is not None]
            tags += [t.tag for _, t in list(self._deferred) if t.tag is not None]
            if not tags:
                continue
            try:
                now = time.time()
                self.broker.zadd(
                    self.prefix + fetch.UNACKED_INDEX_KEY, dict.fromkeys(tags, now), xx=True
                )
            except redis.RedisError:
                log.debug("reservation refresh failed", exc_info=False)

    def step(self) -> int:
        """Take one batch (or wait a little if there is none) and run it; jobs taken."""
        self._flush()
        batch = self._gather()
        if not batch:
            self._idle()
            return 0
        self._idle_s = IDLE_MIN_S
        self.process(batch)
        return len(batch)

    def _gather(self) -> list[fetch.Taken]:
        now = time.monotonic()
        due = [t for when, t in self._deferred if when <= now]
        self._deferred = [(when, t) for when, t in self._deferred if when > now]
        room = self.max_jobs - len(due)
        taken = self._take(room) if room > 0 else []
        if taken and self.wait_s > 0:
            deadline = now + self.wait_s
            while len(taken) < room and (left := deadline - time.monotonic()) > 0:
                fetch.wait(self.broker, left, self.prefix)
                taken += self._take(room - len(taken))
        return due + taken

    def _take(self, count: int) -> list[fetch.Taken]:
        order = self._cycle.consume(len(QUEUE_NAMES))
        taken: list[fetch.Taken] = []
        if order != list(QUEUE_NAMES):
            # A lower queue's reserved share is due: it goes first for a share
            # of the batch, the rest in strict priority order (scheduling.py).
            taken = fetch.take(
                self.broker,
                order,
                count=min(count, self._share_n),
                max_chars=self._max_chars,
                prefix=self.prefix,
            )
        if len(taken) < count:
            taken += fetch.take(
                self.broker,
                QUEUE_NAMES,
                count=count - len(taken),
                max_chars=self._max_chars,
                prefix=self.prefix,
            )
        for t in taken:
            self._cycle.rotate(t.queue)
        return taken

    def _idle(self) -> None:
        timeout = self._idle_s
        if self._deferred:
            first = min(when for when, _ in self._deferred) - time.monotonic()
            timeout = max(IDLE_MIN_S, min(timeout, first))
        fetch.wait(self.broker, timeout, self.prefix)
        self._idle_s = min(self._idle_s * 2, self._idle_max_s)

    # -- one batch ----------------------------------------------------------------------
    def process(self, batch: list[fetch.Taken]) -> None:
        """Run ``batch`` through every stage, then acknowledge what is finished."""
        rt = self.rt
        started = time.perf_counter()
        received_at = time.time()
        self._current = ds = [self._open(t) for t in batch]
        need = [(d, tenant) for d in ds if d.pending and (tenant := payload_ref_tenant(d.text))]
        for (d, _), got in zip(
            need,
            rt.guard.fetch_payloads(
                [(tenant, d.job_id) for d, tenant in need], rt.settings.max_envelope_chars
            ),
            strict=True,
        ):
            d.fetched = got
        for d in ds:
            if d.pending:
                self._stage(d, self._authenticate)
        to_claim = [d for d in ds if d.pending]
        claims = rt.guard.claim_many(
            [
                ClaimRequest(
                    _verified(d).header.tenant,
                    d.job_id,
                    window_ms(rt, _verified(d).header),
                    admission(_verified(d).header, _policy(d)),
                )
                for d in to_claim
            ]
        )
        for d, first in zip(to_claim, claims, strict=True):
            # Held from here: if anything fails before it runs, it is given back.
            d.claimed = first.outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.EXHAUSTED)
        for d, first in zip(to_claim, claims, strict=True):
            self._stage(d, functools.partial(self._settle_claim, first=first))
        for d in ds:
            if d.pending:
                self._stage(d, self._prepare)
        self._run_models([d for d in ds if d.pending and d.doc is None])
        self._store([d for d in ds if d.pending and d.doc is not None])
        self._release_quotas([d for d in ds if d.claimed and d.policy is not None])
        runtime_s = time.perf_counter() - started
        for d in ds:
            if d.outcome is not None and not d.refused:
                ended = Ended(d.outcome, d.failure)
                log.log(ended.level, "job %r %s", d.job_id[:64], ended.line)
                metrics.job_finished(d.job_id, d.outcome)
                if self.events is not None:
                    self.events.finished(
                        d.job_id,
                        received_at=received_at,
                        runtime_s=runtime_s,
                        failure=not_succeeded(d.outcome, d.failure),
                    )
        self.batches += 1
        self.jobs += len(ds)
        metrics.add_busy(runtime_s)
        self._settle(ds)
        if self.events is not None:
            self.events.flush()

    def _open(self, taken: fetch.Taken) -> _Delivery:
        """Check the queue entry and decode the Celery message around the envelope."""
        rt = self.rt
        d = _Delivery(taken)
        if not taken.reserved:
            # Popped but not reserved: over the size limit or not a message at all.
            d.job_id = unverified_entry_id(taken.raw)
            self._refuse(
                d,
                AuditReason.OVERSIZE if len(taken.raw) > self._max_chars else AuditReason.MALFORMED,
                "not a message that can be reserved",
            )
            return d
        raw = parse_entry(taken.raw, max_chars=self._max_chars)
        headers = raw.get("headers") if isinstance(raw, dict) else None
        job_id = headers.get("id") if isinstance(headers, dict) else None
        d.job_id = job_id if isinstance(job_id, str) else unverified_entry_id(taken.raw)
        if raw is None and len(taken.raw) > self._max_chars:
            self._refuse(d, AuditReason.OVERSIZE, "over the size limit")
            return d
        try:
            body = check_message(raw, taken.queue, max_body_chars=self._max_chars)
        except Refused as exc:
            self._refuse(d, exc.reason, str(exc))
            return d
        if not taken.tag_agrees(raw):
            self._refuse(d, AuditReason.MALFORMED, "not the delivery tag it was taken under")
            return d
        assert body is not None  # a job queue's message: its task call
        args, kwargs = body[0], body[1]
        self._stage(d, lambda d: setattr(d, "text", request_text(rt, d.job_id, args, kwargs)))
        return d

    def _refuse(self, d: _Delivery, reason: AuditReason, why: str) -> None:
        log.warning("queue %s: refused an entry (%s): %s", d.taken.queue, reason, why)
        # The acting tenant: whose list it came from (only that tenant's producers
        # may push there); unverified, like everything about the entry.
        tenant = d.taken.tenant or ""
        self.rt.audit.record(job_id=d.job_id, tenant=tenant, reason=reason, verified=False)
        d.outcome = reason
        d.refused = True

    def _stage(self, d: _Delivery, run: Callable[[_Delivery], None]) -> None:
        """Run one stage for ``d``, recording a `Stop`, a `Defer` or this job's own error.

        Redis out of reach concerns the whole batch: it propagates (`_recover`).
        """
        try:
            run(d)
        except Stop as stop:
            d.outcome, d.failure = stop.ended
        except Defer as defer:
            d.defer_s = defer.delay_s
        except UNAVAILABLE:
            raise
        except Exception as exc:
            self._fault(d, exc)

    def _fault(self, d: _Delivery, exc: Exception) -> None:
        """``d``'s handling raised: refuse it (not yet authenticated) or count a fault."""
        rt = self.rt
        if d.verified is None:
            d.outcome = refuse_unreadable(rt, d.job_id, exc).outcome
            return
        d.claimed = False  # given back by fault()
        verdict = fault(rt, d.verified, d.policy, exc)
        if isinstance(verdict, Stop):
            d.outcome, d.failure = verdict.ended
        else:
            d.defer_s = verdict.delay_s

    def _authenticate(self, d: _Delivery) -> None:
        rt = self.rt
        data = request_bytes(rt, d.job_id, d.text, d.fetched)
        d.verified = verify_request(
            rt,
            d.job_id,
            data,
            task_name=TASK_NAME,
            routed=d.taken.queue,
            text=d.text,
            list_tenant=d.taken.tenant,
        )
        d.policy = tenant_policy(rt, d.verified.header)
        check_memory(rt, d.verified.header)

    def _settle_claim(self, d: _Delivery, first: Claim) -> None:
        settle_claim(self.rt, _verified(d), _policy(d), first)
        d.claimed = True  # ours to run (its quota is released after the batch)

    def _prepare(self, d: _Delivery) -> None:
        job = prepare(self.rt, _verified(d), _policy(d))
        if isinstance(job, ResultDoc):
            d.doc = job
        else:
            d.job = job

    def _run_models(self, ready: list[_Delivery]) -> None:
        groups: dict[int, list[_Delivery]] = {}
        for d in ready:
            assert d.job is not None
            if can_batch(d.job.model):
                groups.setdefault(id(d.job.model), []).append(d)
            else:
                d.doc = run_one(self.rt, _verified(d), d.job, on_hard_also=self._on_hard)
        for group in groups.values():
            docs = run_batch(
                self.rt,
                [(_verified(d), d.job) for d in group],  # type: ignore[misc]
                on_hard_also=self._on_hard,
            )
            for d, doc in zip(group, docs, strict=True):
                d.doc = doc

    def _store(self, done: list[_Delivery]) -> None:
        rt = self.rt
        sealed = [seal_result(rt, _verified(d), _doc(d)) for d in done]
        stored = rt.guard.store_many(
            [
                (_verified(d).header.tenant, d.job_id, envelope, window_ms(rt, _verified(d).header))
                for d, (envelope, _) in zip(done, sealed, strict=True)
            ],
            result_ttl_s=rt.settings.result_ttl_s,
        )
        for d, (_, doc), reply in zip(done, sealed, stored, strict=True):
            if isinstance(reply, Exception):
                self._fault(d, reply)
            else:
                d.outcome, d.failure = finished_outcome(doc, reply)

    def _release_quotas(self, claimed: list[_Delivery]) -> None:
        limited = [
            (_verified(d).header.tenant, d.job_id) for d in claimed if _policy(d).max_in_flight
        ]
        if limited:
            self.rt.quotas.release_many(limited)

    def _settle(self, ds: list[_Delivery]) -> None:
        """Acknowledge the finished, keep the deferred (one round trip for all)."""
        now = time.monotonic()
        for d in ds:
            if d.defer_s is not None and d.tag is not None:
                self._deferred.append((now + d.defer_s, d.taken))
                self._to_touch.append(d.tag)
            elif d.tag is not None:
                self._to_ack.append(d.tag)
        # Decided: from here a failure only delays the flush (retried next step).
        self._current = []
        self._flush()

    # -- acknowledgements, hand-backs, failures --------------------------------------------
    def _flush(self) -> None:
        """Apply pending acknowledgements, hand-backs and reservation refreshes atomically."""
        if not (self._to_ack or self._to_hand_back or self._to_touch):
            return
        if self._to_hand_back:
            # Each to the list it came from (its tenant's), taken next, while
            # this process still holds it: after a partition longer than the
            # visibility timeout the sweep has put it back already (fetch.hand_back).
            handed = fetch.hand_back(self.broker, self._to_hand_back, self.prefix)
            if dropped := len(self._to_hand_back) - len(handed):
                log.info(
                    "batch consumer: %d message(s) were put back by the visibility sweep "
                    "while this process was cut off; its copies dropped",
                    dropped,
                )
            self._to_hand_back = []
        tags = self._to_ack
        touch = self._to_touch
        if not (tags or touch):
            return
        with self.broker.pipeline(transaction=True) as pipe:
            if tags:
                pipe.zrem(self.prefix + fetch.UNACKED_INDEX_KEY, *tags)
                pipe.hdel(self.prefix + fetch.UNACKED_KEY, *tags)
            now = time.time()
            for tag in touch:
                pipe.zadd(self.prefix + fetch.UNACKED_INDEX_KEY, {tag: now}, xx=True, ch=True)
            replies = pipe.execute()
        self._to_ack, self._to_touch = [], []
        gone = {
            tag
            for tag, changed in zip(touch, replies[len(replies) - len(touch) :], strict=True)
            if not changed
        }
        if gone:
            # The sweep put these back in their queue: that copy is the job now.
            self._deferred = [(w, t) for w, t in self._deferred if t.tag not in gone]

    def _recover(self, exc: Exception) -> None:
        """After an error mid-batch: give back claims, keep what is decided for later."""
        log.error("batch consumer: %s; handing the unfinished jobs back", type(exc).__name__)
        for d in self._current:
            if d.outcome is not None and d.tag is not None:
                self._to_ack.append(d.tag)
            elif d.defer_s is not None and d.tag is not None:
                self._deferred.append((time.monotonic() + d.defer_s, d.taken))
            elif d.tag is not None:
                self._to_hand_back.append(d.taken)
            if d.claimed and d.outcome is None and d.verified is not None:
                try:
                    self.rt.guard.release(d.verified.header.tenant, d.job_id)
                except Exception:
                    log.debug("claim release failed", exc_info=False)
        self._current = []

    def _on_hard(self) -> None:
        """At a hard time limit, before the process is ended (watchdog thread).

        The running jobs have their failed result stored. Every message of the
        batch stays reserved and comes back after the visibility timeout:
        finished jobs are marked so their copy is recognised as finished;
        claimed jobs not yet run give their claim back so their copy runs.
        """
        rt = self.rt
        for d in self._current:
            try:
                if d.verified is None:
                    continue
                tenant = d.verified.header.tenant
                if d.outcome is not None:
                    rt.backend.set(
                        keyspace.killed(tenant, d.job_id), "1", ex=rt.settings.result_ttl_s
                    )
                elif d.claimed:
                    rt.guard.release(tenant, d.job_id)  # a no-op once its result is stored
            except Exception:
                log.debug("hard-limit bookkeeping failed", exc_info=False)

    def _shutdown(self) -> None:
        """Warm shutdown: hand the kept messages back to their queues now."""
        self._to_hand_back += [t for _, t in self._deferred]
        self._deferred = []
        for attempt in range(3):
            try:
                self._flush()
                return
            except redis.RedisError:
                if attempt < 2:
                    time.sleep(INFRA_BACKOFF_S)
        log.warning(
            "could not hand %d message(s) back; they return after the visibility timeout",
            len(self._to_hand_back) + len(self._to_ack),
        )


def _verified(d: _Delivery) -> Verified:
    assert d.verified is not None
    return d.verified


def _policy(d: _Delivery) -> TenantPolicy:
    assert d.policy is not None
    return d.policy


def _doc(d: _Delivery) -> ResultDoc:
    assert d.doc is not None
    return d.doc


def serve(
    *,
    name: str,
    loglevel: str = "INFO",
    ready_fd: int | None = None,
    siblings: int = 1,
    shard: int = 0,
) -> int:
    """Run one batch consumer process until SIGTERM/SIGINT (``maas-worker batch-consumer``).

    Started by `supervisor.ConsumerPool`; writes one byte to ``ready_fd`` once
    its runtime is built. Runs in the main thread, so the watchdog can
    interrupt a job at its soft limit. ``siblings``: the node's consumer
    processes, this one included (they share the idle polling). ``shard``: the
    queue shard it consumes (shards.py).
    """
    import os
    import signal

    from maas_worker.broker import shards
    from maas_worker.settings import Settings
    from maas_worker.worker.runtime import get_runtime

    logging.basicConfig(
        level=loglevel.upper(), format=f"[%(asctime)s: %(levelname)s/{name}] %(message)s"
    )
    settings = Settings.from_env()  # this process's entry point: built once, passed down
    node = name.rsplit("/", 1)[0]  # ``node/index``: this process is one of the node's
    audit.name_worker(node)
    rt = get_runtime(settings)
    rt.watchdog.ensure_started()
    broker = shards.broker_client(settings, shard)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            log.info(
                "batch consumer %s: finishing the current batch (%s)",
                name,
                signal.Signals(signum).name,
            )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Task events under the worker node's name too.
    events = TaskEvents(settings, node, task_name=TASK_NAME, shard=shard)
    consumer = BatchConsumer(
        rt,
        broker,
        max_jobs=settings.consumer_batch,
        wait_s=settings.consumer_wait_ms / 1000,
        events=events,
        siblings=siblings,
        prefix=shards.key_prefix(settings, shard),
    )
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    log.info("batch consumer %s ready on queue shard %d (pid %d)", name, shard, os.getpid())
    consumer.run(stop)
    events.close()
    log.info(
        "batch consumer %s stopped after %d jobs in %d batches",
        name,
        consumer.jobs,
        consumer.batches,
    )
    return 0
