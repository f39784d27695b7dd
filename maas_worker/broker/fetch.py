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

Used by the Celery consumer (`transport.HardenedChannel`, one message at a time) and by
anything that takes batches of messages (`take` with a count).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from maas_worker.backend import scripts

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

    @property
    def reserved(self) -> bool:
        """Whether the message is in the unacked hash, under `tag`."""
        return self.tag is not None


def expand(queues: Sequence[str]) -> list[str]:
    """The Redis lists behind ``queues``, in kombu's order (each priority step, then queue)."""
    return [q if pri == 0 else f"{q}{PRIORITY_SEP}{pri}" for pri in PRIORITY_STEPS for q in queues]


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
    lists = expand(queues)
    flags = "".join("0" if base_queue(k) in unreserved else "1" for k in lists)
    keys = [prefix + k for k in (unacked_key, index_key, *lists)]
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
        flags,
    ]


def parse(reply: Any, prefix: str = "") -> list[Taken]:
    """The messages in a `command` reply."""
    items = list(reply or [])
    out = []
    for i in range(0, len(items) - 2, 3):
        key, raw, tag = (_text(x) for x in items[i : i + 3])
        out.append(Taken(base_queue(key, prefix), raw, tag or None))
    return out


def take(
    client: Any, queues: Sequence[str], *, count: int, max_chars: int, now: float | None = None
) -> list[Taken]:
    """Pop and reserve up to ``count`` messages from ``queues``, first queue first.

    ``client`` is a redis-py client on the broker database. Every message
    returned with ``reserved`` set is in kombu's unacked hash until `ack`
    (or the visibility sweep puts it back).
    """
    return parse(
        client.execute_command(*command(queues, count=count, max_chars=max_chars, now=now))
    )


def ack(client: Any, tags: Iterable[str]) -> None:
    """Acknowledge reserved messages by delivery tag, in one round trip."""
    tags = list(tags)
    if not tags:
        return
    pipe = client.pipeline(transaction=False)
    pipe.zrem(UNACKED_INDEX_KEY, *tags)
    pipe.hdel(UNACKED_KEY, *tags)
    pipe.execute()


def ring(pipe: Any, count: int = 1) -> None:
    """Add wake-up tokens for ``count`` new messages to ``pipe`` (a redis-py pipeline)."""
    pipe.lpush(WAKE_KEY, *("1" * min(count, WAKE_MAX)))
    pipe.ltrim(WAKE_KEY, 0, WAKE_MAX - 1)


def wait(client: Any, timeout_s: float) -> bool:
    """Block until a wake-up token arrives (True) or ``timeout_s`` passes (False)."""
    return client.brpop([WAKE_KEY], timeout=timeout_s) is not None


def _text(value: Any) -> str:
    # surrogateescape: a hostile entry need not be UTF-8; it is refused later.
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
