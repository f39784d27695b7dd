"""The Lua files (`maas_worker.backend.scripts`): documented, all used, shipped, run once.

Every script Redis runs is a ``.lua`` file with a KEYS/ARGV/returns header,
read by scripts.py; none is left as a Python string, none lies unused, and
the wheel carries them all.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from maas_worker.backend import functions, scripts

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "maas_worker"
_INDEX = re.compile(r"\b(KEYS|ARGV)\[(\d+)\]")
_DOCUMENTED = re.compile(r"^-- (KEYS|ARGV)\[(\d+)(\.\.)?\] = ")


def _lua_files() -> dict[str, Path]:
    return {p.stem: p for p in PACKAGE.rglob("*.lua")}


def test_every_lua_file_in_the_package_is_read_by_scripts_py() -> None:
    assert scripts.names() == sorted(_lua_files())
    assert len(scripts.names()) == 22  # 17 scripts and 5 preludes
    for name, path in _lua_files().items():
        assert path.parent.name == "lua", path
        assert f"maas_worker.{path.parent.parent.name}" in scripts.PACKAGES, path
        assert scripts.source(name).header, f"{name}.lua: no header"


@pytest.mark.parametrize("name", scripts.names())
def test_every_script_documents_its_keys_args_and_reply(name: str) -> None:
    src = scripts.source(name)
    if src.is_prelude:
        # Only function definitions: what they take is in their parameters.
        assert not _INDEX.search(src.code), f"{name}.lua: a prelude reads KEYS or ARGV"
        return
    documented: dict[str, set[int]] = {"KEYS": set(), "ARGV": set()}
    open_from: dict[str, int | None] = {"KEYS": None, "ARGV": None}
    for line in src.header:
        if m := _DOCUMENTED.match(line):
            if m.group(3):
                open_from[m.group(1)] = int(m.group(2))
            else:
                documented[m.group(1)].add(int(m.group(2)))
    for kind, index in {(k, int(i)) for k, i in _INDEX.findall(src.code)}:
        start = open_from[kind]
        assert index in documented[kind] or (start is not None and index >= start), (
            f"{name}.lua uses {kind}[{index}] without a '-- {kind}[{index}] = ...' line"
        )
    assert any(line.startswith("-- returns") for line in src.header), name


def test_every_file_is_used_by_the_code() -> None:
    """Each script is named by a module that loads scripts, or is a prelude of one."""
    named: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "scripts.py":
            continue
        tree = ast.parse(path.read_text())
        if not any(
            isinstance(node, ast.ImportFrom)
            and node.module == "maas_worker.backend"
            and any(a.name == "scripts" for a in node.names)
            for node in ast.walk(tree)
        ):
            continue
        named |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
    used = {name for name in scripts.names() if name in named}
    used |= {p for name in used for p in scripts.preludes(name)}
    assert used == set(scripts.names())
    for name in scripts.names():  # a prelude is only used through "-- uses:"
        assert scripts.source(name).is_prelude == (name not in named), name


def test_no_lua_is_left_in_python() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for call in ("redis.call(", "redis.pcall(", "register_script("):
            if call == "register_script(" and path.name == "scripts.py":
                continue
            assert call not in text, f"{path.relative_to(ROOT)} has {call}"


def test_the_package_data_ships_every_lua_file() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    for path in _lua_files().values():
        package = ".".join(path.parent.parent.relative_to(ROOT).parts)
        relative = path.relative_to(path.parent.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, glob) for glob in data.get(package, [])), (
            f"{relative} is not in [tool.setuptools.package-data] {package!r}"
        )


def test_the_header_is_not_sent_and_preludes_come_first() -> None:
    for name in scripts.names():
        text = scripts.text(name)
        assert text.startswith("\n") and text.endswith("\n") and "\n\n\n" not in text
        assert not any(line in text for line in scripts.source(name).header if "=" in line)
    assert scripts.preludes("claim") == ["bucket", "admit", "claim_job"]
    assert scripts.preludes("claim_batch") == ["bucket", "admit", "claim_job", "job_error"]
    assert scripts.preludes("store_batch") == ["store_job", "job_error"]
    assert scripts.preludes("advise_many") == ["bucket"]
    assert scripts.text("claim") == "".join(
        scripts.source(n).code for n in ("bucket", "admit", "claim_job", "claim")
    )


def test_a_job_s_claim_and_store_are_written_once() -> None:
    """claim.lua and claim_batch.lua run one body (claim_job.lua); store's likewise."""
    for body, users in (
        ("claim_job", ("claim", "claim_batch")),
        ("store_job", ("store", "store_batch")),
    ):
        defined = [
            n for n in scripts.names() if f"local function {body}(" in scripts.source(n).code
        ]
        assert defined == [body]
        for user in users:
            assert scripts.text(user).count(f"local function {body}(") == 1


def test_the_token_bucket_is_written_once() -> None:
    defined = [
        name for name in scripts.names() if "local function tokens_at(" in scripts.source(name).code
    ]
    assert defined == ["bucket"]
    for user in ("claim", "advise_many"):  # the worker's charge and the client's check
        assert "tokens_at(" in scripts.text(user)
    assert functions.library_code().count("local function tokens_at(") == 1


class _Counting(fakeredis.FakeRedis):
    """Counts pipelines sent and scripts loaded."""

    pipelines = 0
    loads = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return super().pipeline(*args, **kwargs)

    def script_load(self, script: Any) -> Any:
        self.loads += 1
        return super().script_load(script)


def test_eval_many_is_one_pipeline_and_reloads_a_flushed_script_once() -> None:
    r = _Counting()
    fault = scripts.register(r, "fault")
    calls = [([f"k{i}"], [60_000]) for i in range(3)]
    assert scripts.eval_many(r, fault, calls) == [1, 1, 1]  # Redis had no script yet
    assert (r.pipelines, r.loads) == (2, 1)
    assert scripts.eval_many(r, fault, calls) == [2, 2, 2]
    assert (r.pipelines, r.loads) == (3, 1)  # no SCRIPT EXISTS, no load: one round trip
    assert scripts.eval_many(r, fault, []) == []
    assert r.pipelines == 3


def test_eval_many_gives_a_failing_call_its_error_in_place() -> None:
    r = fakeredis.FakeRedis()
    r.set("k", "not a number")
    replies = scripts.eval_many(
        r, scripts.register(r, "fault"), [(["k"], [60_000]), (["j"], [60_000])]
    )
    assert isinstance(replies[0], Exception) and replies[1] == 1
