"""Taking messages from the job queues atomically: pop and reserve in one step.

kombu's Redis transport takes a message with ``BRPOP`` and records it as reserved (in
the ``unacked`` hash and its ``unacked_index``) with a second command; a Redis crash
between the two loses the message (docs/reliability.md, defect 11).

Invariant: after any crash a message is either still in its queue or reserved. One Lua
script pops the first message of the first non-empty list (in the order given: priority
order) and, in the same atomic step, writes it to the ``unacked`` hash and index exactly
as kombu would (``[message, exchange, routing_key]`` under its delivery tag, scored with
the time). Redis persists the script's effects together, and kombu's visibility sweep
returns reserved messages whose worker never acknowledged them.

A script cannot block, so waiting for work is separate: producers using the maas
transport push a token to `WAKE_KEY` with every message they publish, and an idle
consumer waits on it with ``BRPOP`` (tokens are only a hint: the wait also ends after a
timeout, so a message published without one, or put back by the sweep, is found within
that timeout).

Fair share (docs/compute.md, "Fair share across tenants"): producers push a job of
tenant ``T`` at priority ``P`` to ``maas.P.T`` (`tenant_queue`) and add ``T`` to the
priority's arrivals set (`arrivals_key`); the same script admits arrivals to the
priority's ring of tenants with work (`ring_key`) and takes from the tenant whose
turn it is, ``weight`` takes per turn (`WEIGHTS_KEY`, written by workers from the
keyring). The old single list ``maas.P`` is still taken, before the ring: jobs
queued there before an upgrade, and by producers that do not name a tenant.

Used by the Celery consumer (`transport.HardenedChannel`, one message at a time) and by
anything that takes batches of messages (`take` with a count).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from maas_worker.backend import scripts
from maas_worker.protocol import MAX_TENANT_WEIGHT, QUEUE_NAMES, TENANT_RE

#: kombu's names for the reservation hash and its time index (Channel defaults).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: Hint list: one token per published message, so idle consumers wake at once.
WAKE_KEY = "maas:wake"
#: Tokens kept at most: enough to wake every idle consumer, bounded if none listen.
WAKE_MAX = 256
#: kombu's priority sub-queues: message priority 0-9 goes to one of these steps.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

#: A job queue's ring of tenants with work: ``maas:ring:<queue>`` (its credit hash
#: is ``<ring>:credit``). Written by the take only.
RING_PREFIX = "maas:ring:"
#: Suffix of a ring's credit hash (``maas:ring:<queue>:credit``).
CREDIT_SUFFIX = ":credit"
#: Tenants that pushed to a job queue: ``maas:arrivals:<queue>`` (producers ``SADD``).
ARRIVALS_PREFIX = "maas:arrivals:"
#: Tenant -> weight (takes per turn; absent = 1), written by workers from the keyring.
WEIGHTS_KEY = "maas:weights"
#: The message property naming the tenant whose list a producer's message goes to.
TENANT_PROPERTY = "maas_tenant"
#: The Celery header the worker's transport writes on a job taken from a tenant's
#: list, naming that tenant (the pipeline checks it against the sealed one).
#: Never the producer's: the transport rebuilds a job's headers on delivery.
LIST_TENANT_HEADER = "maas_list_tenant"
#: Arrivals admitted to a ring per take at most (keeps a take O(1)).
ADMIT_PER_TAKE = 16
#: The highest weight honoured (a turn longer than this is a monopoly, not a share).
MAX_WEIGHT = MAX_TENANT_WEIGHT

#: The take script (broker/lua/pop_reserve.lua; its header: KEYS, ARGV, reply).
POP_RESERVE = scripts.text("pop_reserve")


#: The script's SHA-1: after the first ``EVAL`` a consumer sends ``EVALSHA``.
POP_RESERVE_SHA = hashlib.sha1(POP_RESERVE.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Taken:
    """One message taken from a queue."""

    #: The queue it came from (without kombu's priority suffix).
    queue: str
    #: The message exactly as it sat in the list (kombu's JSON).
    raw: str
    #: Its delivery tag when it is recorded in the unacked hash (it must then be
    #: acknowledged); None when it was taken unreserved.
    tag: str | None
    #: The list it was taken from (a tenant's list, or the queue's own for jobs
    #: queued without a tenant): where it goes back if handed back.
    source: str = ""

    @property
    def tenant(self) -> str | None:
        """The tenant whose list it came from (None: the queue's own list)."""
        split = split_tenant_queue(self.source)
        return split[1] if split else None

    @property
    def reserved(self) -> bool:
        """Whether the message is in the unacked hash, under `tag`."""
        return self.tag is not None

    def tag_agrees(self, raw: Any) -> bool:
        """Whether the entry, once parsed (``raw``), names the delivery tag it is
        reserved under (always true when taken unreserved).

        The take reads the tag at the entry's end without decoding the entry
        (pop_reserve.lua); an entry built to make that read differ from its
        ``properties.delivery_tag`` must be refused, or kombu would acknowledge
        a tag that reserves nothing and leave the real reservation to come back.
        """
        if self.tag is None:
            return True
        props = raw.get("properties") if isinstance(raw, dict) else None
        return isinstance(props, dict) and props.get("delivery_tag") == self.tag


def tenant_queue(queue: str, tenant: str) -> str:
    """The list holding ``tenant``'s jobs of job queue ``queue`` (``maas.normal.acme``)."""
    return f"{queue}.{tenant}"


def split_tenant_queue(key: str) -> tuple[str, str] | None:
    """``(queue, tenant)`` of a tenant list name (`tenant_queue`); None for anything else."""
    for queue in QUEUE_NAMES:
        if key.startswith(queue + "."):
            tenant = key[len(queue) + 1 :]
            return (queue, tenant) if TENANT_RE.fullmatch(tenant) else None
    return None


def ring_key(queue: str) -> str:
    """The ring of tenants with work in job queue ``queue``."""
    return RING_PREFIX + queue


def arrivals_key(queue: str) -> str:
    """The set of tenants that pushed to job queue ``queue`` since the last take."""
    return ARRIVALS_PREFIX + queue


def expand(queues: Sequence[str]) -> list[str]:
    """The Redis lists behind ``queues``, in kombu's order (each priority step, then queue)."""
    return [q if pri == 0 else f"{q}{PRIORITY_SEP}{pri}" for pri in PRIORITY_STEPS for q in queues]


def sources(queues: Sequence[str], fair: Collection[str] = QUEUE_NAMES) -> list[tuple[str, str]]:
    """What a take looks at, in order: ``(kind, key)`` with kind ``list`` or ``ring``.

    kombu's order (`expand`), with each job queue's tenant ring right after its
    own list: jobs queued in the old single list (before an upgrade) go first.
    """
    out: list[tuple[str, str]] = []
    for pri in PRIORITY_STEPS:
        for q in queues:
            out.append(("list", q if pri == 0 else f"{q}{PRIORITY_SEP}{pri}"))
            if pri == 0 and q in fair:
                out.append(("ring", ring_key(q)))
    return out


def base_queue(key: str, prefix: str = "") -> str:
    """The queue a Redis list belongs to (strips kombu's priority suffix and key prefix)."""
    if prefix and key.startswith(prefix):
        key = key[len(prefix) :]
    return key.split(PRIORITY_SEP, 1)[0]


def command(
    queues: Sequence[str],
    *,
    count: int,
    max_chars: int,
    now: float | None = None,
    unacked_key: str = UNACKED_KEY,
    index_key: str = UNACKED_INDEX_KEY,
    prefix: str = "",
    unreserved: Collection[str] = (),
    by_sha: bool = False,
) -> list[Any]:
    """The ``EVAL`` command taking up to ``count`` messages from ``queues`` (in order).

    Sent as a raw command by the Celery consumer (its event loop waits for the
    reply on the socket); `take` runs it through a client. ``prefix`` is
    kombu's ``global_keyprefix``, if one is set; messages of the queues in
    ``unreserved`` (consumed without acknowledgement) are taken unreserved.
    ``by_sha`` sends ``EVALSHA`` (the server must have seen the script: on
    ``NOSCRIPT``, send it once more without).
    """
    flags: list[str] = []
    keys = [unacked_key, index_key, WEIGHTS_KEY]
    for kind, k in sources(queues):
        if kind == "ring":
            # A fair job queue: its old list (the source just before) and its
            # ring's keys, named here (the script builds only tenant lists' names).
            queue = k[len(RING_PREFIX) :]
            flags[-1] = "n" if flags[-1] == "0" else "r"
            keys += [k, f"{k}{CREDIT_SUFFIX}", arrivals_key(queue)]
        else:
            flags.append("0" if base_queue(k) in unreserved else "1")
            keys.append(k)
    keys = [prefix + k for k in keys]
    script = ["EVALSHA", POP_RESERVE_SHA] if by_sha else ["EVAL", POP_RESERVE]
    return [
        *script,
        len(keys),
        *keys,
        count,
        repr(time.time() if now is None else now),
        max_chars,
        PRIORITY_SEP,
        prefix,
        "".join(flags),
        ADMIT_PER_TAKE,
        MAX_WEIGHT,
    ]


def parse(reply: Any, prefix: str = "") -> list[Taken]:
    """The messages in a `command` reply."""
    items = list(reply or [])
    out = []
    for i in range(0, len(items) - 3, 4):
        queue, source, raw, tag = (_text(x) for x in items[i : i + 4])
        out.append(Taken(queue, raw, tag or None, source))
    return out


def take(
    client: Any,
    queues: Sequence[str],
    *,
    count: int,
    max_chars: int,
    now: float | None = None,
    prefix: str = "",
) -> list[Taken]:
    """Pop and reserve up to ``count`` messages from ``queues``, first queue first.

    ``client`` is a redis-py client on the broker database. Every message
    returned with ``reserved`` set is in kombu's unacked hash until `ack`
    (or the visibility sweep puts it back). ``prefix``: the shard's key prefix
    (shards.py; every function here takes one, ``""`` when not sharded).
    """
    try:
        # By SHA: the script's text is 10 KB, sent only when the server lacks it.
        reply = client.execute_command(
            *command(queues, count=count, max_chars=max_chars, now=now, prefix=prefix, by_sha=True)
        )
    except NoScriptError:
        # A restarted or flushed server: the script itself (cached from then on).
        reply = client.execute_command(
            *command(queues, count=count, max_chars=max_chars, now=now, prefix=prefix)
        )
    return parse(reply, prefix)


def ack(client: Any, tags: Iterable[str], prefix: str = "") -> None:
    """Acknowledge reserved messages by delivery tag, in one round trip."""
    tags = list(tags)
    if not tags:
        return
    pipe = client.pipeline(transaction=False)
    pipe.zrem(prefix + UNACKED_INDEX_KEY, *tags)
    pipe.hdel(prefix + UNACKED_KEY, *tags)
    pipe.execute()


def push(
    pipe: Any, queue: str, tenant: str, messages: Sequence[str | bytes], prefix: str = ""
) -> None:
    """Add the push of ``tenant``'s ``messages`` to job queue ``queue`` to ``pipe``.

    Its list first, then its name to the arrivals (after: a take that admits
    it then finds the jobs), then the wake-up tokens. Run it in a transaction
    (``MULTI``) where a crash between the two must not leave jobs outside the ring.
    """
    pipe.lpush(prefix + tenant_queue(queue, tenant), *messages)
    pipe.sadd(prefix + arrivals_key(queue), tenant)
    ring(pipe, len(messages), prefix)


def hand_back(client: Any, taken: Sequence[Taken], prefix: str = "") -> set[str]:
    """Put reserved messages back at the front of the lists they came from, each only
    while its reservation is held (broker/lua/hand_back.lua); the tags handed back.

    One the visibility sweep already put back is dropped: that copy is the job now
    (a second would be refused ``replayed``). One script: nothing lost or doubled
    by a crash.
    """
    args: list[str] = [str(WAKE_MAX)]
    for t in taken:
        if t.tag is None:
            continue
        source = t.source or t.queue
        split = split_tenant_queue(source)
        arrivals, tenant = (prefix + arrivals_key(split[0]), split[1]) if split else ("", "")
        args += [t.tag, prefix + source, t.raw, arrivals, tenant]
    if len(args) == 1:
        return set()
    # redis-py's Script: EVALSHA, loaded again on NOSCRIPT (a restarted server).
    script = scripts.register(client, "hand_back")
    keys = [prefix + UNACKED_KEY, prefix + UNACKED_INDEX_KEY, prefix + WAKE_KEY]
    reply = script(keys=keys, args=args)
    return {_text(tag) for tag in reply}


def announce(pipe: Any, source: str, prefix: str = "") -> None:
    """Add to ``pipe`` what makes a message put back in list ``source`` takeable: its
    tenant's arrival (for a tenant list) and a wake-up token."""
    split = split_tenant_queue(source)
    if split is not None:
        pipe.sadd(prefix + arrivals_key(split[0]), split[1])
    ring(pipe, 1, prefix)


def publish_weights(client: Any, weights: Mapping[str, int], prefix: str = "") -> bool:
    """Make `WEIGHTS_KEY` hold ``weights`` (tenant -> takes per turn; 1 is left out);
    True if it changed. Workers call it from their keyring: the take reads a tenant's
    weight from here (once per take, and only while the hash exists: with every weight
    1 it is deleted and the take reads none), never the keyring."""
    want = {t: str(w) for t, w in weights.items() if w != 1}
    key = prefix + WEIGHTS_KEY
    have = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
    if want == have:
        return False
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        if want:
            pipe.hset(key, mapping=want)
        pipe.execute()
    return True


def reannounce(client: Any, tenants: Iterable[str], prefix: str = "") -> int:
    """Announce every tenant of ``tenants`` with jobs queued in a job queue (`announce`);
    returns how many (tenant, queue) pairs were.

    A safety net, run when a worker starts: a push is its list then its arrival,
    and a Redis that crashed between the two (a non-transactional pipeline: kombu's
    publish batch) would leave the jobs outside the ring until the tenant's next push.
    """
    pairs = [(q, t) for t in tenants for q in QUEUE_NAMES]
    if not pairs:
        return 0
    pipe = client.pipeline(transaction=False)
    for q, t in pairs:
        pipe.llen(prefix + tenant_queue(q, t))
    waiting = [(q, t) for (q, t), n in zip(pairs, pipe.execute(), strict=True) if int(n) > 0]
    if waiting:
        pipe = client.pipeline(transaction=False)
        for q, t in waiting:
            pipe.sadd(prefix + arrivals_key(q), t)
        ring(pipe, len(waiting), prefix)
        pipe.execute()
    return len(waiting)


def ring(pipe: Any, count: int = 1, prefix: str = "") -> None:
    """Add wake-up tokens for ``count`` new messages to ``pipe`` (a redis-py pipeline)."""
    pipe.lpush(prefix + WAKE_KEY, *("1" * min(count, WAKE_MAX)))
    pipe.ltrim(prefix + WAKE_KEY, 0, WAKE_MAX - 1)


def wait(client: Any, timeout_s: float, prefix: str = "") -> bool:
    """Block until a wake-up token arrives (True) or ``timeout_s`` passes (False)."""
    return client.brpop([prefix + WAKE_KEY], timeout=timeout_s) is not None


def _text(value: Any) -> str:
    # surrogateescape: a hostile entry need not be UTF-8; it is refused later.
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
