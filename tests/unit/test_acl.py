"""The Redis ACL generator (`maas_worker.tenancy.acl`, ``maas-worker acl``), without a server.

What the file looks like, how passwords are hashed and kept, that a rerun
changes nothing, that everything written is private, and that each tenant
gets one user confined to its own keys. tests/integration/test_acl.py loads
the file into a real server and tries every role.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from maas_worker.backend import keyspace
from maas_worker.cli import main
from maas_worker.errors import ConfigError
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, save_keyring

TENANTS = ("acme", "globex", "initech")
USER_LINE = re.compile(
    r"user (?P<name>[a-z0-9._-]+) reset on #(?P<hash>[0-9a-f]{64}) (?P<rules>.+)"
)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "redis" / "users.acl", tmp_path / "redis" / "passwords"


def users(acl_file: Path) -> dict[str, tuple[str, str]]:
    """user -> (password hash, rules), every line checked against the format."""
    lines = acl_file.read_text().splitlines()
    # Off (nobody logs in as it), with every permission: the server replays its
    # append-only file's transactions as `default` (acl.DEFAULT_USER says why).
    assert lines[0] == "user default reset off ~* &* +@all"
    out = {}
    for line in lines[1:]:
        m = USER_LINE.fullmatch(line)
        assert m, line
        out[m["name"]] = (m["hash"], m["rules"])
    return out


def test_one_user_per_role_and_per_tenant_with_the_password_hashed(
    files: tuple[Path, Path],
) -> None:
    acl_file, passwords = files
    done = acl.generate(TENANTS, acl_file=acl_file, passwords_dir=passwords)
    found = users(acl_file)
    assert list(found) == [
        "operator",
        "worker",
        "beat",
        "monitor",
        "flower",
        "producer-acme",
        "producer-globex",
        "producer-initech",
        "gateway",
    ]
    assert done.roles == list(found) and done.new == list(found) and done.changed
    text = acl_file.read_text()
    for name, (digest, _) in found.items():
        password = (passwords / name).read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", password)  # 256 random bits
        assert digest == hashlib.sha256(password.encode()).hexdigest()
        assert password not in text
    assert len({(passwords / n).read_text() for n in found}) == len(found)


def test_a_producer_is_confined_to_its_own_tenant(files: tuple[Path, Path]) -> None:
    acl_file, passwords = files
    acl.generate(TENANTS, acl_file=acl_file, passwords_dir=passwords)
    rules = users(acl_file)["producer-globex"][1]
    own = keyspace.tenant_prefix("globex")
    # Its own list of each job queue (fair share), never another's nor the shared one.
    own_lists = {f"maas.{p}.globex" for p in ("high", "normal", "low")}
    arrivals = {f"maas:arrivals:maas.{p}" for p in ("high", "normal", "low")}
    for pattern in re.findall(r"~(\S+?)(?=[ )]|$)", rules):
        assert (
            pattern.startswith((own, "maas:wake"))
            or pattern in own_lists | arrivals
            or pattern in (keyspace.CATALOG, keyspace.MODELS, keyspace.NODES)
        ), pattern
    for queue in own_lists:
        assert f"%W~{queue}" in rules and f"%R~{queue}" in rules, queue
    # The arrivals: SADD only (its name; the take checks it, fetch.py).
    assert re.search(r"\(\+sadd( %W~maas:arrivals:maas\.\w+){3}\)", rules), rules
    # The catalogue (live and durable) and the node list: read only.
    for key in (keyspace.CATALOG, keyspace.MODELS, keyspace.NODES):
        assert f"%R~{key}" in rules.split(), key
    assert "&" not in rules  # no channel at all
    for command in (
        "+eval",
        "+evalsha",
        "+function",
        "+publish",
        "+subscribe",
        "+del",
        "+@all",
        "+@write",
        "+unlink",
        "+script",
    ):
        assert f"{command} " not in rules + " " and f"{command})" not in rules, command
    # Writes only where keyspace.py says producers write.
    barrier = keyspace.barrier("globex")  # WAIT on a Redis Cluster (backend/barrier.py)
    assert f"(+set ~{own}job:* ~{own}payload:* ~{own}cancel:* ~{own}ckks:* ~{barrier})" in rules
    # Its public CKKS contexts (private inference): their TTL too, read only.
    assert f"(+ttl %R~{own}ckks:*)" in rules
    assert f"(+fcall ~{own}*)" in rules
    assert f"~{keyspace.bucket('globex')}" not in rules
    assert "acme" not in rules and "initech" not in rules


def test_the_gateway_is_every_tenants_producer_and_writes_only_its_own_records_beyond(
    files: tuple[Path, Path],
) -> None:
    acl_file, passwords = files
    acl.generate(["acme", "globex"], acl_file=acl_file, passwords_dir=passwords)
    rules = users(acl_file)["gateway"][1]
    for tenant in ("acme", "globex"):
        own = keyspace.tenant_prefix(tenant)
        for rule in acl.producer_rules(tenant):
            assert rule in rules, rule
        assert f"(+set +del ~{own}gateway:*)" in rules
    assert f"(+xadd %W~{keyspace.AUDIT_STREAM})" in rules
    for command in ("+@all", "+@write", "+eval", "+publish", "+flushall", "+keys", "~*"):
        assert f"{command} " not in rules + " " and f"{command})" not in rules, command


def test_the_worker_has_no_admin_commands_and_no_catch_all_key_pattern(
    files: tuple[Path, Path],
) -> None:
    acl_file, passwords = files
    acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords, dbs=[0, 3])
    rules = users(acl_file)["worker"][1].split()
    assert "~*" not in rules and "&*" not in rules and "allkeys" not in rules
    assert {"-@admin", "-@dangerous", "-function|flush", "-script|flush"} <= set(rules)
    # PSUBSCRIBE patterns are matched literally: one rule per database.
    for db in (0, 3):
        assert {f"&/{db}.celery.pidbox", f"&/{db}.celeryev/worker.*"} <= set(rules)
    assert users(acl_file)["operator"][1].split()[:4] == ["~*", "&*", "+@all", "-@admin"]


def test_a_rerun_changes_nothing_and_a_new_tenant_keeps_everyone_elses_password(
    files: tuple[Path, Path],
) -> None:
    acl_file, passwords = files
    acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    first = acl_file.read_bytes()
    kept = {p.name: p.read_bytes() for p in passwords.iterdir()}
    again = acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    assert acl_file.read_bytes() == first and not again.changed and again.new == []
    grown = acl.generate(["acme", "newco"], acl_file=acl_file, passwords_dir=passwords)
    assert grown.new == ["producer-newco"] and grown.changed
    assert {p.name: p.read_bytes() for p in passwords.iterdir() if p.name in kept} == kept
    assert acl_file.read_text().startswith(first.decode().rsplit("\n", 2)[0])


def test_everything_written_is_private(files: tuple[Path, Path]) -> None:
    acl_file, passwords = files
    old = os.umask(0o022)
    try:
        acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    finally:
        os.umask(old)
    for path in [acl_file, *passwords.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o700
    assert not [p for p in acl_file.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_password_file_others_can_read_or_an_empty_one_is_refused(
    files: tuple[Path, Path],
) -> None:
    acl_file, passwords = files
    acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    (passwords / "beat").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    (passwords / "beat").chmod(0o600)
    (passwords / "beat").write_text("short\n")
    with pytest.raises(ConfigError, match="no usable password"):
        acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)


def test_names_and_urls() -> None:
    with pytest.raises(ConfigError, match="invalid tenant"):
        acl.roles_for(["Bad Tenant"])
    with pytest.raises(ConfigError, match="unknown role"):
        acl.role_rules("root")
    assert (
        acl.server_url("rediss://maas:secret@redis.internal:6380/2")
        == "rediss://redis.internal:6380/2"
    )
    assert acl.database("redis://h:1/5") == 5 and acl.database("redis://h:1") == 0
    assert acl.role_url("redis://x:y@h:1/0", "worker", None) == "redis://worker:****@h:1/0"
    assert (
        acl.role_url("redis://h:1/0", "producer-acme", "p/w") == "redis://producer-acme:p%2Fw@h:1/0"
    )


# -- the command --------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("MAAS_"):
            monkeypatch.delenv(name)
    keyring = tmp_path / "keyring.json"
    save_keyring(keyring, Keyring().with_new_tenant("acme").with_new_tenant("globex"))
    monkeypatch.setenv("MAAS_KEYRING", str(keyring))
    monkeypatch.setenv("MAAS_BROKER_URL", "redis://operator:not-printed@redis.internal:6379/0")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_command_writes_the_files_and_prints_urls_without_passwords(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["acl"]) == 0
    out, err = capsys.readouterr()
    assert (env / "users.acl").is_file() and (env / "redis-passwords" / "producer-globex").is_file()
    lines = dict(line.split() for line in out.splitlines())
    assert lines["worker"] == "redis://worker:****@redis.internal:6379/0"
    assert set(lines) == {*acl.ROLES, "gateway", "producer-acme", "producer-globex"}
    secrets = [p.read_text().strip() for p in (env / "redis-passwords").iterdir()]
    assert not any(s in out + err for s in [*secrets, "not-printed"])
    assert main(["acl", "--urls", "--tenant", "acme", "--server", "rediss://r:6380/1"]) == 0
    out, _ = capsys.readouterr()
    urls = dict(line.split() for line in out.splitlines())
    password = (env / "redis-passwords" / "producer-acme").read_text().strip()
    assert urls["producer-acme"] == f"rediss://producer-acme:{password}@r:6380/1"
    assert "producer-globex" not in urls  # only the tenants asked for
    assert "&/1.celery.pidbox" in (env / "users.acl").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["acl", "--tenant", "nobody"], "unknown tenant 'nobody'"),
        (["acl", "--acl-file", "keyring.json/users.acl"], "cannot write keyring.json/users.acl"),
        (["acl", "--passwords", "keyring.json"], "cannot"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("maas-worker: error: ")
    assert message in err


def test_an_apply_that_fails_says_so_in_one_line_after_writing(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["acl", "--apply", "--server", "redis://127.0.0.1:1/0"]) == 1
    _, err = capsys.readouterr()
    wrote, error = err.splitlines()  # the files are written; then the reload fails
    assert wrote.startswith("wrote users.acl")
    assert error.startswith(
        "maas-worker: error: cannot apply the ACL on redis://127.0.0.1:1/0 as the operator: "
    )
