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

Loading installs every version in `VERSIONS`, the current one and the one
before it (whose text is still built from the same files, unchanged), so a
client or worker of the previous release finds its own library on a server
that only new code ever loaded; a server keeps what it had, so old callers
keep working while the new library is loaded alongside (docs/protocol.md
section 7, "Upgrading").

A caller that finds the library missing loads it itself if its user may
(no ACL: the tests, ``make demo``); otherwise it raises `ConfigError`
naming the fix, or, given a ``fallback``, runs that instead (the queued
markers: written after the push, they must not fail for want of a library).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis

from maas_worker.backend import scripts
from maas_worker.errors import ConfigError

log = logging.getLogger(__name__)

#: Each library version, by name, and the scripts it wraps (one function each). A
#: version's text never changes once released: a new script or a changed one makes a
#: new version (tests/unit/test_functions.py pins each text).
VERSIONS: dict[str, tuple[str, ...]] = {
    "maas_v1": ("cancel", "advise_many", "tail_prefix"),
    "maas_v2": ("cancel", "advise_many", "tail_prefix", "mark_queued"),
}
#: The library this code calls (the newest of `VERSIONS`).
LIBRARY = "maas_v2"
#: ``cancel.lua``: a tenant's cancel request (KEYS and ARGV as the script's).
CANCEL = LIBRARY + "_cancel"
#: ``advise_many.lua``: a client's advisory quota check for a batch.
ADVISE_MANY = LIBRARY + "_advise_many"
#: ``tail_prefix.lua``: a prefix of a queue's oldest message (read-only: FCALL_RO).
TAIL_PREFIX = LIBRARY + "_tail_prefix"
#: ``mark_queued.lua``: a batch's queued markers (and the gateway's idempotency records).
MARK_QUEUED = LIBRARY + "_mark_queued"
#: Scripts registered read-only (``no-writes``: FCALL_RO).
_READ_ONLY = frozenset({"tail_prefix"})

#: The fix, as said to a caller that may not load the library.
LOAD_HINT = (
    "run `maas-worker acl --load-functions` as the operator, or start a worker "
    "(it loads the library)"
)


def library_code(version: str = LIBRARY) -> str:
    """The source of library ``version`` (one of `VERSIONS`), as FUNCTION LOAD takes it
    (built from the scripts; only loading needs it, which is rare: not cached, so it
    always names the functions as this module does)."""
    bodies = VERSIONS[version]
    # The library is one Lua chunk: the preludes its scripts use, once, before them all.
    preludes = dict.fromkeys(p for name in bodies for p in scripts.preludes(name))
    return "\n".join(
        [
            f"#!lua name={version}",
            "".join(scripts.source(p).code for p in preludes),
            *(
                line
                for name in bodies
                for line in (f"local function {name}(KEYS, ARGV)", scripts.source(name).code, "end")
            ),
            *(
                f"redis.register_function{{function_name='{version}_{name}', callback={name}, "
                "flags={'no-writes'}}"
                if name in _READ_ONLY
                else f"redis.register_function('{version}_{name}', {name})"
                for name in bodies
            ),
            "",
        ]
    )


def load(client: redis.Redis) -> None:
    """Load (or re-load, identical) every library of `VERSIONS`: idempotent, safe to run
    concurrently.

    Raises `ConfigError` naming the fix if the client's user may not load it.
    """
    try:
        for version in VERSIONS:
            client.function_load(library_code(version), replace=True)
    except redis.exceptions.NoPermissionError:
        raise _not_loadable() from None


async def aload(client: Any) -> None:
    """`load` on a ``redis.asyncio`` client."""
    try:
        for version in VERSIONS:
            await client.function_load(library_code(version), replace=True)
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
    fallback: Callable[[], Any] | None = None,
) -> Any:
    """``FCALL`` (``FCALL_RO`` if ``readonly``) of one library function.

    Loads the library first if the server does not have it (see `load`); if
    this user may not, returns ``fallback()`` when one is given (`ConfigError`
    otherwise).
    """
    fcall = client.fcall_ro if readonly else client.fcall
    try:
        return fcall(name, len(keys), *keys, *args)
    except redis.ResponseError as exc:
        if not is_missing(exc):
            raise
    try:
        load(client)
    except ConfigError:
        if fallback is None:
            raise
        _fell_back(name)
        return fallback()
    return fcall(name, len(keys), *keys, *args)


async def acall(
    client: Any,
    name: str,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    fallback: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """`call` on a ``redis.asyncio`` client (loads the library first if it is missing;
    ``fallback`` is a coroutine function)."""
    try:
        return await client.fcall(name, len(keys), *keys, *args)
    except redis.ResponseError as exc:
        if not is_missing(exc):
            raise
    try:
        await aload(client)
    except ConfigError:
        if fallback is None:
            raise
        _fell_back(name)
        return await fallback()
    return await client.fcall(name, len(keys), *keys, *args)


def _fell_back(name: str) -> None:
    # A rolling upgrade: the server has an older library only, and this user may
    # not load the new one. Said at each call: the operator's fix is one command.
    log.warning("Redis function %s is not loaded (%s); used the fallback", name, LOAD_HINT)


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
