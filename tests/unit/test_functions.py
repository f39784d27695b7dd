"""The Redis function library (`maas_worker.backend.functions`) on fakeredis.

The library wraps the scripts' text unchanged; its name is versioned, so a
change to any script must come with a new version (the pin below).
"""

from __future__ import annotations

import hashlib
import logging

import fakeredis
import pytest
import redis

from maas_worker.backend import functions, keyspace, scripts
from maas_worker.errors import ConfigError

#: sha256 of `functions.library_code(version)` for each library version. Changed a
#: script? Add a version to `functions.VERSIONS`, point `functions.LIBRARY` at it and
#: add its hash here: old and new clients then each call their own code during a
#: rolling upgrade. A released version's hash never changes.
PINNED = {
    "maas_v1": "fe74e073f587f84da4481c9c1ce4b0526f774f3a1d06301b41a55c6cac4a5743",
    "maas_v2": "b7f129033b39a0d18c6fd603632540d6de41b40db23caa643e60ee2d72714ef1",
}
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"


def test_the_library_text_is_pinned_to_its_version() -> None:
    assert set(functions.VERSIONS) == set(PINNED)
    assert max(functions.VERSIONS, key=lambda v: int(v.rsplit("v", 1)[1])) == functions.LIBRARY
    assert functions.library_code() == functions.library_code(functions.LIBRARY)
    for version, bodies in functions.VERSIONS.items():
        code = functions.library_code(version)
        assert code.startswith(f"#!lua name={version}\n")
        assert hashlib.sha256(code.encode()).hexdigest() == PINNED[version], (
            f"the library {version} changed: add a version and pin its text in PINNED"
        )
        for name in ("bucket", *bodies):
            assert scripts.source(name).code in code  # the scripts' bodies, unchanged
    assert "mark_queued" not in functions.library_code("maas_v1")
    for name in (functions.CANCEL, functions.ADVISE_MANY, functions.MARK_QUEUED):
        assert name.startswith(functions.LIBRARY + "_")


def test_loading_installs_the_previous_version_alongside() -> None:
    # A client of the previous release finds its functions on a server only new code
    # loaded; the same code under both names answers alike.
    r = fakeredis.FakeRedis()
    functions.load(r)
    assert {lib[1] for lib in r.function_list()} == {b"maas_v1", b"maas_v2"}  # name, value
    r.set(keyspace.submitted("acme", JOB), "99999999999999")
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
    assert r.fcall("maas_v1_cancel", len(keys), *keys, *args) == 1
    assert r.fcall(functions.CANCEL, len(keys), *keys, *args) == 1


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
    assert len(r.function_list()) == len(functions.VERSIONS)
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


def test_a_caller_that_may_not_load_it_runs_its_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="maas_worker.backend.functions"):
        assert functions.call(_Refusing(), functions.CANCEL, ["k"], [], fallback=lambda: 7) == 7
    assert functions.CANCEL in caplog.text and "--load-functions" in caplog.text
