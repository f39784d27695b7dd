"""The Redis function library: the Lua that producers and monitors run, loaded once.

Producers cancel a job and check their quota with a Lua script each, and the backlog
reader (fleet exporter, ``stats``, the autoscaler) fetches a queue's oldest message
prefix with one. A role allowed ``EVAL`` could run any Lua, so these scripts live in a
Redis 7 *function library* instead, loaded by a worker at start (or by the operator,
``maas-worker acl --load-functions``), and the roles that only call them get ``+fcall``
/ ``+fcall_ro`` (docs/operations.md and docs/security.md, "Redis roles"). Every
command a function runs is still checked against the caller's ACL.

The scripts are ``.lua`` files like every other (`backend.scripts`:
``backend/lua/cancel.lua``, ``backend/lua/advise_many.lua``,
``broker/lua/tail_prefix.lua``, their headers documenting KEYS, ARGV and
replies); the library is their preludes (``bucket.lua``), then each body,
unchanged, wrapped in a function whose parameters are named ``KEYS`` and
``ARGV``. The library's name carries a version (`LIBRARY`): a change to any
script needs a new version, so that a rolling upgrade never runs new
callers against old code or the reverse (tests/unit/test_functions.py pins
the text to its version).

A caller that finds the library missing loads it itself if its user may
(no ACL: the tests, ``make demo``); otherwise it raises `ConfigError`
naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

from maas_worker.backend import scripts
from maas_worker.errors import ConfigError

#: Library name; bump the number whenever the text of `library_code` changes.
LIBRARY = "maas_v1"
#: ``cancel.lua``: a tenant's cancel request (KEYS and ARGV as the script's).
CANCEL = LIBRARY + "_cancel"
#: ``advise_many.lua``: a client's advisory quota check for a batch.
ADVISE_MANY = LIBRARY + "_advise_many"
#: ``tail_prefix.lua``: a prefix of a queue's oldest message (read-only: FCALL_RO).
TAIL_PREFIX = LIBRARY + "_tail_prefix"

#: The fix, as said to a caller that may not load the library.
LOAD_HINT = (
    "run `maas-worker acl --load-functions` as the operator, or start a worker "
    "(it loads the library)"
)


def library_code() -> str:
    """The library's source, as FUNCTION LOAD takes it (built from the scripts; only
    loading needs it, which is rare: not cached, so it always names the functions
    as this module does)."""
    bodies = ("cancel", "advise_many", "tail_prefix")
    # The library is one Lua chunk: the preludes its scripts use, once, before them all.
    preludes = dict.fromkeys(p for name in bodies for p in scripts.preludes(name))
    return "\n".join(
        [
            f"#!lua name={LIBRARY}",
            "".join(scripts.source(p).code for p in preludes),
            *(
                line
                for name in bodies
                for line in (f"local function {name}(KEYS, ARGV)", scripts.source(name).code, "end")
            ),
            f"redis.register_function('{CANCEL}', cancel)",
            f"redis.register_function('{ADVISE_MANY}', advise_many)",
            f"redis.register_function{{function_name='{TAIL_PREFIX}', callback=tail_prefix, "
            "flags={'no-writes'}}",
            "",
        ]
    )


def load(client: redis.Redis) -> None:
    """Load (or re-load, identical) the library: idempotent, safe to run concurrently.

    Raises `ConfigError` naming the fix if the client's user may not load it.
    """
    try:
        client.function_load(library_code(), replace=True)
    except redis.exceptions.NoPermissionError:
        raise _not_loadable() from None


def _not_loadable() -> ConfigError:
    return ConfigError(
        f"the Redis function library {LIBRARY} is not loaded and this "
        f"Redis user may not load it: {LOAD_HINT}"
    )


def is_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the called function does not exist (library not loaded)."""
    return isinstance(exc, redis.ResponseError) and "function not found" in str(exc).lower()


def call(
    client: redis.Redis,
    name: str,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    readonly: bool = False,
) -> Any:
    """``FCALL`` (``FCALL_RO`` if ``readonly``) of one library function.

    Loads the library first if the server does not have it (see `load`).
    """
    fcall = client.fcall_ro if readonly else client.fcall
    try:
        return fcall(name, len(keys), *keys, *args)
    except redis.ResponseError as exc:
        if not is_missing(exc):
            raise
    load(client)
    return fcall(name, len(keys), *keys, *args)


async def acall(client: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """`call` on a ``redis.asyncio`` client (loads the library first if it is missing)."""
    try:
        return await client.fcall(name, len(keys), *keys, *args)
    except redis.ResponseError as exc:
        if not is_missing(exc):
            raise
    try:
        await client.function_load(library_code(), replace=True)
    except redis.exceptions.NoPermissionError:
        raise _not_loadable() from None
    return await client.fcall(name, len(keys), *keys, *args)


def execute(client: redis.Redis, build: Callable[[Any], None]) -> list[Any]:
    """Run a pipeline that ``build`` fills (with FCALLs among its commands) and execute it.

    If the library was missing, it is loaded (see `load`) and the pipeline
    built and sent again: use it for reads, which are safe to repeat.
    """
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            replies: list[Any] = pipe.execute()
            return replies
        except redis.ResponseError as exc:
            if attempt == 2 or not is_missing(exc):
                raise
        load(client)
    raise AssertionError("unreachable")  # pragma: no cover


def fcall_args(name: str, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """The argument list of ``FCALL name`` (for a pipeline's ``fcall``/``fcall_ro``)."""
    return [name, len(keys), *keys, *args]
