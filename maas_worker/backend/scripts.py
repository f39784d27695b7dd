"""The Lua that runs in Redis, read from the ``lua/`` folders, and its pipelined calls.

Each plane keeps its scripts next to its Python: ``backend/lua/*.lua`` (claims,
results, quotas, the cancel request, the release floor) and ``broker/lua/*.lua``
(taking messages, reading the backlog). A script's name is its file name
without ``.lua``, unique across both folders.

Every file starts with a header of ``--`` lines: what the script does, one
``-- KEYS[n] = …`` and ``-- ARGV[n] = …`` line per key and argument
(``KEYS[3..]`` for a variable tail), and ``-- returns …``. A *prelude*
(``-- prelude: …``) only defines Lua functions that several scripts share; a
script names the preludes it needs with ``-- uses: a, b`` and they are
prepended to it (with the preludes they use, each once). ``bucket.lua``, the
token bucket, is so written once for the worker's charge (``admit.lua``, inside
``claim_job.lua``) and the client's advisory check (``advise_many.lua``); a job's
claim and store likewise for one job (``claim.lua``, ``store.lua``) and a batch
(``claim_batch.lua``, ``store_batch.lua``).

The header is documentation and is not sent. The text Redis runs is the code
below it, as one block between a leading and a trailing newline (so preludes
and scripts concatenate line by line). Changing it changes the script's SHA1;
for a script of the function library (functions.py) it also needs a new
library version, since tests/unit/test_functions.py pins the text per version.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import AskError, ClusterDownError, NoScriptError, TryAgainError

from maas_worker.backend.cluster import ClusterUnavailable

#: The packages whose ``lua/`` folder holds scripts (package data, pyproject.toml).
PACKAGES = ("maas_worker.backend", "maas_worker.broker")

_USES = re.compile(r"^-- uses: (.+)$")


@dataclass(frozen=True)
class Source:
    """One ``.lua`` file, split: its header lines, the preludes it names, its code."""

    name: str
    #: The leading ``--`` lines, as written.
    header: tuple[str, ...]
    #: The preludes of its ``-- uses:`` line, in order (not those they use).
    uses: tuple[str, ...]
    #: The code below the header, starting and ending with a newline.
    code: str

    @property
    def is_prelude(self) -> bool:
        """Whether it only defines functions for other scripts (``-- prelude:``)."""
        return any(line.startswith("-- prelude:") for line in self.header)


@functools.cache
def _files() -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for package in PACKAGES:
        for entry in (files(package) / "lua").iterdir():
            name = entry.name.removesuffix(".lua")
            if entry.name.endswith(".lua"):
                if name in found:
                    raise RuntimeError(f"two Lua scripts named {name!r}")
                found[name] = entry
    return found


def names() -> list[str]:
    """Every script and prelude, by name (sorted)."""
    return sorted(_files())


@functools.cache
def source(name: str) -> Source:
    """The file of script ``name``, split into header and code.

    Raises `KeyError` for an unknown name.
    """
    lines = _files()[name].read_text(encoding="utf-8").splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith("--"):
        n += 1
    header = tuple(line.rstrip("\n") for line in lines[:n])
    uses = tuple(
        u.strip() for line in header if (m := _USES.match(line)) for u in m.group(1).split(",")
    )
    return Source(name, header, uses, "\n" + "".join(lines[n:]).strip("\n") + "\n")


def preludes(name: str) -> list[str]:
    """The preludes ``name`` needs, in the order they are prepended, each once."""
    out: list[str] = []
    for used in source(name).uses:
        for prelude in (*preludes(used), used):
            if prelude not in out:
                out.append(prelude)
    return out


def text(name: str) -> str:
    """The Lua sent to Redis for script ``name``: its preludes' code, then its own."""
    return "".join(source(p).code for p in preludes(name)) + source(name).code


def register(client: redis.Redis, name: str) -> Script:
    """Script ``name`` registered on ``client`` (redis-py: EVALSHA, loaded on NOSCRIPT)."""
    return client.register_script(text(name))


def eval_many(
    client: redis.Redis,
    script: Script,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    *,
    then: Sequence[Any] | None = None,
) -> list[Any]:
    """Run ``script`` once per ``(keys, args)`` in ONE pipeline; the replies, in order.

    ``then`` is one more command sent last in the same pipeline (``WAIT``, which
    must run on the connection that wrote), its reply last.

    A call whose script failed has its `redis.ResponseError` in place of a
    reply, so one job's error never decides another's; a lost connection
    raises.

    Why not redis-py's own way (`Script` objects queued on a pipeline): that
    pipeline sends ``SCRIPT EXISTS`` for its scripts before every execute
    (``Pipeline.load_scripts``), a second round trip each time, and the batch
    consumer's claims, stores and payload reads are each budgeted as one round
    trip per batch (docs/benchmarks.md). So this sends ``EVALSHA`` directly and
    handles the rare miss itself: after a Redis restart (an empty script
    cache) every call answers ``NOSCRIPT``, which means the call did nothing,
    so the script is loaded and the calls that missed are sent once more.

    On a Redis Cluster (`cluster.is_cluster`) each call must name keys of one hash
    slot (`cluster.by_slot` splits a batch); the pipeline sends each node its calls,
    and ``SCRIPT LOAD`` goes to every primary. A cluster still unavailable after
    redis-py's retries raises `ClusterUnavailable` rather than failing the calls'
    jobs one by one.
    """
    if not calls:
        return []
    replies = _send(client, script, calls, then)
    missed = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missed:
        script.sha = client.script_load(script.script)
        # Only the calls that missed, which did nothing: on a Redis Cluster only the
        # nodes without the script (a replica just promoted) miss, and the others' calls
        # ran (a claim sent twice would find itself busy).
        # ``then`` again too: a WAIT must follow the writes it vouches for.
        again = _send(client, script, [calls[n] for n in missed], then)
        for n, reply in zip(missed, again, strict=False):
            replies[n] = reply
        if then is not None:
            replies[-1] = again[-1]
    for reply in replies:
        if isinstance(reply, Exception) and not isinstance(reply, redis.ResponseError):
            raise reply
        if isinstance(reply, _CLUSTER_OUTAGE):
            # A Redis Cluster still moving or electing after redis-py's retries: the
            # call's job is not at fault (this is no error of its script).
            raise ClusterUnavailable(f"Redis Cluster unavailable: {str(reply)[:120]}")
    return list(replies)


def _send(
    client: redis.Redis,
    script: Script,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    then: Sequence[Any] | None,
) -> list[Any]:
    """One pipeline of ``EVALSHA`` per call (and ``then``): its replies, errors in place."""
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        # execute_command: redis-py's cluster pipeline refuses its ``evalsha``
        # method, not the command (it routes it by its keys like any other).
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
    if then is not None:
        pipe.execute_command(*then)  # type: ignore[no-untyped-call]
    return list(pipe.execute(raise_on_error=False))


#: Replies of a cluster pipeline that are an outage, not a script's error (ResponseErrors
#: for redis-py): the cluster down, a slot moving (after redis-py's own redirections).
_CLUSTER_OUTAGE = (ClusterDownError, TryAgainError, AskError)
