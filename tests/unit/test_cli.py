"""The click command line itself: help text, usage errors, and how the global flags travel."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from maas_worker.cli import cli, main, validate


def walk(command: click.Command, path: str = "maas-worker") -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, f"{path} {name}")


ALL_COMMANDS = list(walk(cli))


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("MAAS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return tmp_path


def test_every_command_and_option_has_help_text() -> None:
    missing = [
        f"{path} {param.opts[0]}"
        for path, command in ALL_COMMANDS
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []
    assert [path for path, command in ALL_COMMANDS if not command.get_short_help_str()] == []


def test_the_commands_of_the_interface_contract_are_all_there() -> None:
    names = {path.removeprefix("maas-worker ") for path, _ in ALL_COMMANDS}
    assert {
        "keys init",
        "keys policy",
        "keys rotate",
        "keys promote",
        "keys retire",
        "keys list",
        "keys export",
        "worker",
        "batch-consumer",
        "beat",
        "flower",
        "ping",
        "submit",
        "status",
        "cancel",
        "result",
        "audit",
        "stats",
        "scale",
        "metrics",
        "acl",
        "demo",
        "models keygen",
        "models sign",
        "models release",
        "models encrypt",
        "models verify",
        "models list",
    } <= names


@pytest.mark.parametrize("path", [path for path, _ in ALL_COMMANDS])
def test_help_prints_for_every_command_and_exits_zero(
    path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*path.split()[1:], "--help"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"Usage: {path} ") and err == ""
    assert main([*argv[:-1], "-h"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "Missing command"),
        (["nope"], "No such command 'nope'"),
        (["keys"], "Missing command"),
        (["keys", "init"], "Missing option '--tenant'"),
        (["submit", "--model", "echo"], "one of the arguments --input --input-file is required"),
        (
            ["submit", "--model", "echo", "--input", "{}", "--input-file", "x.json"],
            "not allowed with argument --input",
        ),
        (["worker", "--pool", "gevent"], "'gevent' is not one of"),
        (["ping", "--timeout", "soon"], "'soon' is not a valid float"),
        (["models", "release", "m", "1", "--key", "k", "--serial", "0"], "must be from 1 to"),
        (["--broker-url"], "requires an argument"),
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line_and_exit_2(
    clean_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("maas-worker: error: ") and message in err
    with pytest.raises(SystemExit) as exc:
        validate(argv)
    assert exc.value.code == 2


def test_validate_accepts_a_good_command_line_without_running_it(clean_env: Path) -> None:
    validate(["worker", "--concurrency", "2"])
    validate(["--broker-url", "redis://h:1/0", "keys", "export", "--tenant", "a", "--out", "x"])
    assert not (clean_env / ".config").exists()


def test_usage_errors_come_before_settings_errors(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAAS_JOB_TTL_S", "soon")
    assert main(["submit", "--model", "echo"]) == 2
    assert main(["keys", "list"]) == 1
    assert "MAAS_JOB_TTL_S" in capsys.readouterr().err


def test_the_global_flags_reach_the_settings_not_the_environment(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dict(os.environ)
    # Nothing listens on port 1: the error names the URL given by the flag.
    assert main(["--broker-url", "redis://127.0.0.1:1/0", "audit"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("maas-worker: error: Redis unavailable (redis://127.0.0.1:1/0)")
    ring = clean_env / "ring.json"
    assert main(["--keyring", str(ring), "keys", "init", "--tenant", "acme"]) == 0
    assert ring.exists()
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("env_mode", "flags", "pool_options", "mode"),
    [
        ("batch-consumer", {}, [], "batch-consumer"),  # the default
        ("celery-tasks", {}, [], "celery-tasks"),  # MAAS_WORKER_MODE
        ("batch-consumer", {"celery_tasks": True}, [], "celery-tasks"),  # the opt-out
        ("celery-tasks", {"batch_consumer": True}, [], "batch-consumer"),  # a flag beats env
        ("batch-consumer", {}, ["--autoscale"], "celery-tasks"),  # the contract's --autoscale
        ("batch-consumer", {}, ["--pool"], "celery-tasks"),
        ("batch-consumer", {"celery_tasks": True}, ["--autoscale", "--pool"], "celery-tasks"),
    ],
)
def test_the_worker_mode_comes_from_the_flags_then_pool_options_then_the_environment(
    env_mode: str, flags: dict[str, bool], pool_options: list[str], mode: str
) -> None:
    from maas_worker.cli.services import worker_mode

    given = {"batch_consumer": False, "celery_tasks": False, **flags}
    assert worker_mode(env_mode, pool_options=pool_options, **given) == mode


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["worker", "--batch-consumer", "--autoscale", "4,1"],
            "--autoscale is an option of Celery's pool (--celery-tasks), not of "
            "--batch-consumer: it runs --concurrency processes",
        ),
        (
            ["worker", "--batch-consumer", "--pool", "threads", "--autoscale", "4,1"],
            "--autoscale and --pool are options of Celery's pool (--celery-tasks)",
        ),
        (
            ["worker", "--batch-consumer", "--celery-tasks"],
            "--batch-consumer and --celery-tasks exclude each other",
        ),
    ],
)
def test_a_worker_mode_that_cannot_be_is_one_line_and_exit_1(
    clean_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"maas-worker: error: {message}")
    assert not (clean_env / ".config").exists()  # refused before the keyring is read


def test_an_unknown_worker_mode_in_the_environment_names_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAAS_WORKER_MODE", "threads")
    assert main(["worker"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("maas-worker: error: ") and "MAAS_WORKER_MODE" in err


class Execed(Exception):
    """Raised by the fake execve: the process image would have been replaced."""


@pytest.fixture
def execve(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, list(argv), dict(env)))
        raise Execed

    monkeypatch.setattr(os, "execve", fake)
    return calls


@pytest.mark.parametrize(
    "command", [["worker"], ["beat"], ["flower"], ["batch-consumer", "--name", "c1"]]
)
def test_services_run_again_with_the_flags_in_their_environment(
    clean_env: Path, execve: list[tuple[str, list[str], dict[str, str]]], command: list[str]
) -> None:
    before = dict(os.environ)
    argv = ["--broker-url", "redis://broker:6380/2", "--keyring", "/etc/k.json", *command]
    with pytest.raises(Execed):
        main(argv)
    [(path, child_argv, env)] = execve
    assert path == sys.executable
    assert child_argv == [sys.executable, "-m", "maas_worker", *argv]
    assert env == {
        **before,
        "MAAS_BROKER_URL": "redis://broker:6380/2",
        "MAAS_KEYRING": "/etc/k.json",
    }
    assert dict(os.environ) == before


def test_a_service_whose_environment_carries_the_flags_runs_in_place(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    execve: list[tuple[str, list[str], dict[str, str]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["flower"]) == 1  # no flags: no exec; Flower refuses to run unauthenticated
    monkeypatch.setenv("MAAS_BROKER_URL", "redis://broker:6380/2")  # as exec'd with the flag
    assert main(["--broker-url", "redis://broker:6380/2", "flower"]) == 1
    assert execve == []
    assert "refusing to start Flower without authentication" in capsys.readouterr().err


def test_click_runner_invokes_the_group_too(clean_env: Path) -> None:
    ring = clean_env / "ring.json"
    out = CliRunner().invoke(cli, ["--keyring", str(ring), "keys", "init", "--tenant", "acme"])
    assert out.exit_code == 0, out.output
    assert out.output == f"tenant acme: key version 1 is primary ({ring})\n"


def test_a_unique_prefix_of_a_long_option_is_taken_as_argparse_took_it(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = clean_env / "ring.json"
    assert main(["--keyr", str(ring), "keys", "init", "--ten=acme", "--max-p", "low"]) == 0
    assert main(["--keyring", str(ring), "keys", "list", "--js"]) == 0
    out = capsys.readouterr().out
    assert '"tenant": "acme"' in out
    # --key is a prefix of the group's --keyring: it belongs to `models sign`, not the group
    validate(["models", "sign", "d", "--key", "k", "--max-b", "8"])
    # an option's value is never read as an option, and ambiguous prefixes are refused
    validate(["submit", "--model", "--wai", "--input", "{}"])
    assert main(["keys", "policy", "--tenant", "acme", "--max", "low"]) == 2
    assert (
        "ambiguous option: --max could match --max-priority, --max-in-flight"
        in capsys.readouterr().err
    )


def test_version_prints_the_package_version_and_exits_zero(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    from maas_worker import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr() == (f"maas-worker {__version__}\n", "")
    done = subprocess.run(
        [sys.executable, "-m", "maas_worker", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"maas-worker {__version__}\n", "")


def test_flower_hands_further_options_to_flower(clean_env: Path) -> None:
    from maas_worker.cli.services import flower, flower_argv, flower_options

    args = ["--port", "5556", "--max_tasks=5000", "--url_prefix", "flower", "--unauth"]
    params = flower.make_context("flower", [*args, "--persistent", "--address=0.0.0.0"]).params
    # our own options still parse wherever they stand; the rest is Flower's
    assert (params["port"], params["address"], params["unauthenticated"]) == (5556, "0.0.0.0", True)
    extra = flower_options(params["flower_args"])
    assert extra == ["--max_tasks=5000", "--url_prefix=flower", "--persistent"]
    argv = flower_argv(port=5556, address="0.0.0.0", basic_auth="ops:pw", extra=extra)
    assert argv[:3] == ["flower", "--port=5556", "--address=0.0.0.0"]
    assert "--basic-auth=ops:pw" in argv
    assert argv[-3:] == extra


def test_sigterm_stops_flower_even_inside_a_weakref_callback() -> None:
    """Flower's own handler raises SystemExit; inside a weakref callback Python
    swallows it ("Exception ignored") and Flower serves on. Ours stops the loop."""
    import asyncio
    import signal
    import weakref

    import flower.command  # type: ignore[import-untyped]
    from tornado.ioloop import IOLoop

    from maas_worker.cli.services import _stop_flower_cleanly_on_sigterm

    original = flower.command.sigterm_handler
    previous = signal.getsignal(signal.SIGTERM)
    asyncio.set_event_loop(asyncio.new_event_loop())
    loop = IOLoop.current()  # Flower's loop: the main thread's
    outcome: list[str] = []

    class Thing:
        pass

    def on_collected(_ref: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))  # bytecode, where Python runs the pending handler

    def collect_with_the_signal_inside() -> None:
        thing = Thing()
        ref = weakref.ref(thing, on_collected)
        del thing  # on_collected runs now, with `ref` still alive
        assert ref() is None

    def too_late() -> None:
        outcome.append("still running")
        loop.stop()

    try:
        _stop_flower_cleanly_on_sigterm()
        signal.signal(signal.SIGTERM, flower.command.sigterm_handler)  # as Flower does
        loop.add_callback(collect_with_the_signal_inside)
        timer = loop.call_later(10, too_late)
        loop.start()
        loop.remove_timeout(timer)
    finally:
        signal.signal(signal.SIGTERM, previous)
        flower.command.sigterm_handler = original
        loop.close(all_fds=True)
        asyncio.set_event_loop(None)
    assert outcome == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_task=5"], "no such Flower option: --max_task"),
        (["--max_tasks=lots"], "invalid value for Flower option --max_tasks: 'lots'"),
        (["--url_prefix"], "Flower option --url_prefix requires a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--basic_auth=u:p"], "--basic_auth is set from MAAS_FLOWER_BASIC_AUTH"),
    ],
)
def test_a_bad_flower_option_is_one_line_and_exit_2(
    clean_env: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["flower", "--unauthenticated", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"maas-worker: error: {message}")
    assert err.rstrip().endswith("(see `maas-worker flower --help`)")


# -- error wording: the flag's name on the command line, the parameter's in Python ----------
def test_no_tenant_names_the_flag_and_the_variable(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = clean_env / "ring.json"
    assert main(["--keyring", str(ring), "keys", "init", "--tenant", "acme"]) == 0
    capsys.readouterr()
    job = "5e0c6a4e-7d1b-4c38-9a51-2f7f9a0c1b2d"
    base = ["--keyring", str(ring), "--broker-url", "redis://127.0.0.1:1/0"]
    for argv in (["submit", "--model", "echo", "--input", "{}"], ["status", job]):
        assert main([*base, *argv]) == 1
        assert capsys.readouterr() == (
            "",
            "maas-worker: error: no tenant: pass --tenant or set MAAS_TENANT\n",
        )
    # the Python API keeps naming its keyword
    from maas_worker import Client, Settings, SubmitError

    with pytest.raises(SubmitError, match="pass tenant="):
        Client(settings=Settings.from_env({"MAAS_KEYRING": str(ring)}))


@pytest.mark.parametrize("ttl", ["0", "-5", "604801"])
def test_a_ttl_out_of_bounds_names_the_flag(
    clean_env: Path, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    argv = ["submit", "--model", "echo", "--input", "{}", "--ttl", ttl]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "maas-worker: error: --ttl must be 1..604800 seconds (see `maas-worker submit --help`)\n"
    )
    with pytest.raises(SystemExit):
        validate(argv)
    # the Python API keeps naming its parameter
    import fakeredis

    from maas_worker import Client, Settings, SubmitError
    from maas_worker.tenancy.keyring import Keyring

    settings = Settings.from_env({"MAAS_TENANT": "acme", "MAAS_DIAGNOSTIC_MODELS": "1"})
    client = Client(settings=settings, keyring=Keyring().with_new_tenant("acme"))
    client._backend = fakeredis.FakeRedis()  # the served-model catalogue is read from here
    with pytest.raises(SubmitError, match=r"ttl_s must be in 1\.\.604800"):
        client.seal("echo", {}, ttl_s=int(ttl))


def test_redis_failures_are_named_in_words_not_exception_classes() -> None:
    import socket

    import redis

    from maas_worker.errors import connection_cause

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException:
                raise outer  # noqa: B904 (as redis-py raises it: the inner one as context)
        except BaseException as exc:
            return exc

    unknown = chained(
        redis.ConnectionError("Error -2 connecting to nohost:6379."),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    )
    assert connection_cause(unknown) == "unknown host (Name or service not known)"
    db = redis.ResponseError("DB index is out of range")
    assert connection_cause(db) == "no such database on the server (DB index is out of range)"
    noperm = redis.ResponseError("NOPERM User u has no permissions to run the 'get' command")
    assert connection_cause(noperm) == "the Redis user may not run that command (NOPERM)"
    assert connection_cause(redis.ResponseError("WRONGTYPE x")) == (
        "the server refused a command (WRONGTYPE)"
    )
    unreachable = chained(redis.ConnectionError("x"), OSError(113, "No route to host"))
    assert connection_cause(unreachable) == "No route to host"
