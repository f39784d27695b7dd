"""Packing commands into RESP for every redis-py connection of ours, faster.

redis-py's pure-Python packer (``PythonRespSerializer``, and the same code in
``redis.asyncio.Connection.pack_command``) encodes each argument through its
`Encoder` and appends it by joining the whole buffer so far again, up to
6,000 bytes: about a microsecond and a half per argument. Our batch commands
carry hundreds (a batch's claims and stores, a batch's queued markers: two
keys per job; a push: one entry per job), so packing was the largest single
cost of the batch consumer, the producers and the gateway after their own
code (docs/benchmarks.md, "Throughput" and the gateway section).

`pack` writes the same bytes for the arguments our code sends (``bytes``,
``str``, ``int``) in one pass; anything else (floats, memoryviews, a
non-UTF-8 encoder) goes to redis-py's own packer, as does the error for a
value redis-py refuses. Arguments above the cutoff stay separate chunks, as
redis-py leaves them, so a large payload is never copied into the buffer.
tests/unit/test_resp.py compares the bytes with redis-py's for every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: redis-py's own cutoff: an argument longer than this is written as its own chunk.
BUFFER_CUTOFF = 6000
#: Below this an argument is framed in one formatting step (keys, numbers).
_SMALL = 512


class _Slow(Exception):
    """An argument this packer leaves to redis-py's."""


def _fast(args: tuple[Any, ...], cutoff: int) -> list[bytes]:
    first = args[0]
    if type(first) is str:
        head: list[Any] = first.encode().split()
    elif type(first) is bytes:
        head = first.split() if b" " in first else [first]
    else:
        raise _Slow
    out: list[bytes] = []
    pieces = [b"*%d\r\n" % (len(head) + len(args) - 1)]
    held = 0  # bytes in pieces, flushed as one chunk past the cutoff (as redis-py does)
    for arg in (*head, *args[1:]) if len(head) != 1 else args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        else:
            raise _Slow  # float, bool, memoryview, None...: redis-py decides
        size = len(data)
        if size > cutoff:
            pieces.append(b"$%d\r\n" % size)
            out.append(b"".join(pieces))
            out.append(data)
            pieces = [b"\r\n"]
            held = 0
        elif size < _SMALL:
            pieces.append(b"$%d\r\n%b\r\n" % (size, data))
            held += size
        else:
            # Appended as it is, joined once per chunk: formatting it into a new
            # bytes object first would copy it twice.
            pieces += (b"$%d\r\n" % size, data, b"\r\n")
            held += size
            if held > cutoff:
                out.append(b"".join(pieces))
                pieces = []
                held = 0
    if pieces:
        out.append(b"".join(pieces))
    return out


def pack(
    args: tuple[Any, ...], fallback: Callable[..., list[bytes]], cutoff: int = BUFFER_CUTOFF
) -> list[bytes]:
    """One command's RESP chunks, as ``fallback`` (redis-py's packer) would frame them."""
    try:
        return _fast(args, cutoff)
    except (_Slow, UnicodeEncodeError):
        return fallback(*args)


class Packer:
    """A redis-py ``command_packer`` (sync connections): `pack`, else redis-py's."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback

    def pack(self, *args: Any) -> list[bytes]:
        """The RESP chunks of one command."""
        return pack(args, self._fallback.pack)
