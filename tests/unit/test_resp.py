"""Our RESP packer writes what redis-py's writes, for every argument kind (resp.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.connection import PythonRespSerializer

from maas_worker.backend import redis as ours
from maas_worker.backend import resp

KEYS = [f"maas:{{acme}}:job:{os.urandom(16).hex()}" for _ in range(300)]

CASES: dict[str, tuple[Any, ...]] = {
    "str keys, as the marker call sends them": (
        "FCALL",
        "maas_v2_mark_queued",
        len(KEYS),
        *KEYS,
        "claim",
        "1 2 3",
    ),
    "bytes entries past the cutoff together": ("LPUSH", b"maas.normal", *[b"x" * 1900] * 20),
    "one argument past the cutoff": ("SET", "k", b"p" * (resp.BUFFER_CUTOFF + 1), "PX", 5),
    "a multi-word command name": ("CLIENT SETNAME", "maas"),
    "a multi-word command name in bytes": (b"CONFIG GET", b"maxmemory"),
    "negative and large ints": ("ZADD", "z", -5, 2**70),
    "non-ASCII text": ("SET", "clé", "välue ✓"),
    "an empty string": ("SET", "", ""),
    "a float (left to redis-py)": ("INCRBYFLOAT", "k", 1.5),
    "a memoryview (left to redis-py)": ("SET", "k", memoryview(b"abc" * 3000)),
    "a bytearray (left to redis-py)": ("SET", "k", bytearray(b"abc")),
}


def _redis_py(*args: Any) -> bytes:
    return b"".join(
        bytes(c)
        for c in PythonRespSerializer(resp.BUFFER_CUTOFF, redis.Connection().encoder.encode).pack(
            *args
        )
    )


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_the_bytes_are_redis_pys(args: tuple[Any, ...]) -> None:
    expected = _redis_py(*args)
    sync = ours._Connection()
    asynchronous = ours._AsyncConnection()
    assert b"".join(bytes(c) for c in sync.pack_command(*args)) == expected
    assert b"".join(bytes(c) for c in asynchronous.pack_command(*args)) == expected
    # Several commands in one pipeline's write, too.
    assert b"".join(bytes(c) for c in sync.pack_commands([args, args])) == expected * 2


def test_an_argument_past_the_cutoff_is_not_copied() -> None:
    big = b"p" * (resp.BUFFER_CUTOFF + 1)
    chunks = resp.pack(("SET", "k", big), redis.Connection().pack_command)
    assert any(chunk is big for chunk in chunks)


def test_chunks_stay_near_the_cutoff() -> None:
    chunks = resp.pack(("LPUSH", "q", *[b"e" * 1000] * 100), redis.Connection().pack_command)
    assert len(chunks) > 10
    assert all(len(c) <= resp.BUFFER_CUTOFF + 1100 for c in chunks)


@pytest.mark.parametrize("bad", [None, True, object()])
def test_what_redis_py_refuses_is_refused_the_same_way(bad: object) -> None:
    with pytest.raises(redis.DataError):
        ours._Connection().pack_command("SET", "k", bad)
    with pytest.raises(redis.DataError):
        ours._AsyncConnection().pack_command("SET", "k", bad)


def test_our_connections_use_it_and_a_given_packer_is_kept() -> None:
    assert isinstance(ours._Connection()._command_packer, resp.Packer)
    given = PythonRespSerializer(resp.BUFFER_CUTOFF, redis.Connection().encoder.encode)
    assert ours._Connection(command_packer=given)._command_packer is given


def test_another_encoding_is_left_to_redis_py() -> None:
    conn = ours._AsyncConnection(encoding="latin-1")
    plain = redis.asyncio.Connection(encoding="latin-1")
    assert conn.pack_command("SET", "k", "é") == plain.pack_command("SET", "k", "é")
    assert not isinstance(ours._Connection(encoding="latin-1")._command_packer, resp.Packer)
