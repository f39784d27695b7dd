"""The Redis function library (`maas_worker.backend.functions`) on fakeredis.

The library wraps the scripts' text unchanged; its name is versioned, so a
change to any script must come with a new version (the pin below).
"""

from __future__ import annotations

import hashlib

import fakeredis
import pytest
import redis

from maas_worker.backend import functions, keyspace, scripts
from maas_worker.errors import ConfigError

#: sha256 of `functions.library_code()` for each library version. Changed a
#: script? Bump `functions.LIBRARY` and add its hash here: old and new
#: clients then each call their own code during a rolling upgrade.
PINNED = {"maas_v1": "fe74e073f587f84da4481c9c1ce4b0526f774f3a1d06301b41a55c6cac4a5743"}
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"


def test_the_library_text_is_pinned_to_its_version() -> None:
    code = functions.library_code()
    assert code.startswith(f"#!lua name={functions.LIBRARY}\n")
    assert hashlib.sha256(code.encode()).hexdigest() == PINNED[functions.LIBRARY], (
        "the library changed: bump functions.LIBRARY and pin the new text in PINNED"
    )
    for name in ("bucket", "cancel", "advise_many", "tail_prefix"):
        assert scripts.source(name).code in code  # the scripts' bodies, unchanged


def test_loading_is_idempotent_and_a_missing_library_is_loaded_by_the_caller() -> None:
    r = fakeredis.FakeRedis()
    keys = [
        keyspace.result("acme", JOB),
        keyspace.cancel("acme", JOB),
        keyspace.done("acme", JOB),
        keyspace.submitted("acme", JOB),
        keyspace.rejected("acme", JOB),
        keyspace.claim("acme", JOB),
        keyspace.pending("acme"),
    ]
    args = ["token", 60_000, 60_000, JOB, keyspace.MAX_TTL_MS]
    assert functions.call(r, functions.CANCEL, keys, args) == -1  # loaded it, then ran
    functions.load(r)
    functions.load(r)
    assert len(r.function_list(library=functions.LIBRARY)) == 1
    r.set(keyspace.submitted("acme", JOB), "99999999999999")
    assert functions.call(r, functions.CANCEL, keys, args) == 1
    assert r.get(keyspace.cancel("acme", JOB)) == b"token"
    # Same as the script sent with EVAL (what test_quota.py checks in depth).
    r2 = fakeredis.FakeRedis()
    r2.set(keyspace.submitted("acme", JOB), "99999999999999")
    assert scripts.register(r2, "cancel")(keys=keys, args=args) == 1


def test_a_pipeline_is_sent_again_once_the_library_is_loaded() -> None:
    r = fakeredis.FakeRedis()
    r.lpush("maas.high", "x" * 600)

    def build(pipe: redis.client.Pipeline) -> None:
        pipe.llen("maas.high")
        pipe.fcall_ro(functions.TAIL_PREFIX, 1, "maas.high", 512)

    assert functions.execute(r, build) == [1, b"x" * 512]


class _Refusing(fakeredis.FakeRedis):
    def function_load(self, *args: object, **kwargs: object) -> str:
        raise redis.exceptions.NoPermissionError("this user has no permissions")


def test_a_caller_that_may_not_load_it_gets_one_line_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        functions.call(_Refusing(), functions.CANCEL, ["k"], [])
    assert "maas-worker acl --load-functions" in str(err.value)
    assert "\n" not in str(err.value)
