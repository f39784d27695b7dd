"""Static checks of the deployment files: docker/, the Procfile and .dockerignore.

These need no Docker engine and run in `make test`; `make compose-test`
(scripts/compose_test.sh, opt-in) builds the image and runs the stack for real.
Checked here: the compose files parse, every command they
and the Dockerfile run (and the steps they document) is a real ``maas-worker``
command line, nothing runs as root, the base image is pinned, exactly one beat,
Flower authenticated, Redis with an ACL and an append-only file, every service
on its own Redis role, the image's dependencies installed only from a lock with
every file's hash, and no secret in any file.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from maas_worker.cli import validate

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_TLS = DOCKER / "compose.tls.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
LOCK_IN = DOCKER / "requirements.in"
PROCFILE = ROOT / "Procfile"
#: Services that run the maas-worker image.
MAAS_SERVICES = {"worker", "beat", "flower", "metrics", "gateway", "producer", "cli"}
#: Services of other images that never connect to Redis: the metrics stack.
MONITORING_SERVICES = {"prometheus", "grafana"}

_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose/shell ``${VAR:-default}`` and ``${VAR:?error}`` with ``env`` (else defaults)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name = m.group("name") or m.group("bare")
        if name in env:
            return env[name]
        if m.group("op") in (":-", "-"):
            return m.group("arg")
        return f"<{name}>"  # required (:?) or unset: a placeholder, never a value

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


def assert_cli_command(argv: list[str], where: str) -> None:
    """``argv`` is ``maas-worker ...`` and the real command line accepts it."""
    assert argv and argv[0] == "maas-worker", f"{where}: {argv} is not a maas-worker command"
    try:
        validate(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid maas-worker command line")


def assert_healthcheck(test: list[str], where: str) -> None:
    assert test[0] in ("CMD", "CMD-SHELL"), where
    if test[1] == "python":
        assert test[2] == "-c", where
        compile(test[3], where, "exec")
    else:
        assert_cli_command(test[1:], where)


# -- compose.yaml --------------------------------------------------------------------------
def test_compose_has_the_services_of_the_issue(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == MAAS_SERVICES | MONITORING_SERVICES | {"redis"}


def test_every_command_and_healthcheck_is_a_real_cli_command(compose: dict[str, Any]) -> None:
    for name in MAAS_SERVICES:
        svc = interpolate(compose["services"][name])
        assert_cli_command(svc["command"], f"compose service {name}")
        health = svc.get("healthcheck", {})
        if "test" in health:
            assert_healthcheck(health["test"], f"compose service {name} healthcheck")


def test_exactly_one_beat_and_the_worker_scales(compose: dict[str, Any]) -> None:
    services = interpolate(compose["services"])
    beats = [
        n
        for n, s in services.items()
        if s.get("command", [None, None])[:2] == ["maas-worker", "beat"]
    ]
    assert beats == ["beat"]
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    worker = services["worker"]
    # `--scale worker=N` needs no fixed container name and no published host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:2] == ["maas-worker", "worker"]


def test_flower_requires_authentication(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert "--unauthenticated" not in flower["command"]
    auth = flower["environment"]["MAAS_FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{MAAS_FLOWER_BASIC_AUTH:\?[^}]+\}", auth), (
        "Flower's credentials must come from the environment, and be required"
    )
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "Flower is published on loopback only"


def test_gateway_is_hardened_on_loopback_with_the_mac_only_keyring(
    compose: dict[str, Any],
) -> None:
    gateway = interpolate(compose["services"]["gateway"])
    assert gateway["command"][:2] == ["maas-worker", "gateway"]
    port = gateway["command"][gateway["command"].index("--port") + 1]
    # Published on the host's loopback only, to the port it listens on.
    assert gateway["ports"] == [f"127.0.0.1:9550:{port}"]
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in gateway["security_opt"]
    assert not gateway.get("cap_add") and not gateway.get("privileged")
    # The MAC-only keyring's folder, read-only; never the full keyring.
    keyring = gateway["environment"]["MAAS_GATEWAY_KEYRING"]
    mounts = {v.split(":")[1]: v for v in gateway["volumes"]}
    assert mounts == {
        "/run/maas/gateway-keyring": "./secrets/gateway-keyring:/run/maas/gateway-keyring:ro"
    }
    assert keyring.startswith("/run/maas/gateway-keyring/")
    assert not any("secrets/keyring" in v or "model-keys" in v for v in gateway["volumes"])
    # `up --wait` waits on its /healthz (which also checks its Redis).
    test = gateway["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and f"127.0.0.1:{port}/healthz" in test[-1]
    # The documented steps write that keyring with `keys export --mac-only`, in the
    # cli service, which mounts the folder writable.
    exports = [
        c
        for path in (COMPOSE, DOCKER / "init-secrets.sh")
        for c in documented_commands(path.read_text())
        if c[:3] == ["maas-worker", "keys", "export"] and "--mac-only" in c
    ]
    assert exports and all(c[c.index("--out") + 1] == keyring for c in exports)
    assert (
        "./secrets/gateway-keyring:/run/maas/gateway-keyring"
        in (compose["services"]["cli"]["volumes"])
    )
    assert '"$secrets/gateway-keyring"' in (DOCKER / "init-secrets.sh").read_text()


def test_redis_has_an_acl_and_an_append_only_file_and_is_not_published(
    compose: dict[str, Any],
) -> None:
    redis_svc = compose["services"]["redis"]
    cmd = redis_svc["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    acl_file = cmd[cmd.index("--aclfile") + 1]
    # The ACL file's folder, read-only (not a single-file mount: `maas-worker acl`
    # replaces the file by rename, and ACL LOAD must read the new one).
    assert acl_file == "/run/maas/redis-acl/users.acl"
    assert "./secrets/redis-acl:/run/maas/redis-acl:ro" in redis_svc["volumes"]
    assert "ports" not in redis_svc
    # Pinned by default, overridable (an offline builder's own copy).
    assert redis_svc["image"].startswith("${MAAS_REDIS_IMAGE:-")
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+-alpine", interpolate(redis_svc["image"]))
    assert any(str(v).endswith(":/data") for v in redis_svc["volumes"])
    # No shared URL: every client service has its own role's (below).
    assert "MAAS_BROKER_URL" not in compose["x-maas-env"]


#: The Redis role (ACL user) each service connects as, and its password variable in .env.
SERVICE_ROLES = {
    "worker": ("worker", "WORKER"),
    "beat": ("beat", "BEAT"),
    "flower": ("flower", "FLOWER"),
    "metrics": ("monitor", "MONITOR"),
    "cli": ("operator", "OPERATOR"),
    "gateway": ("gateway", "GATEWAY"),
    "producer": ("producer-${MAAS_EXAMPLE_TENANT:-acme}", "PRODUCER"),
}


def role_url(service: str, scheme: str = "redis") -> str:
    user, var = SERVICE_ROLES[service]
    return (
        rf"{scheme}://{re.escape(user)}:\$\{{MAAS_REDIS_PASSWORD_{var}:\?[^}}]+\}}"
        r"@redis:6379/0"
    )


def test_every_service_connects_as_its_own_least_privilege_role(compose: dict[str, Any]) -> None:
    from maas_worker.tenancy import acl

    assert set(SERVICE_ROLES) == MAAS_SERVICES
    assert {user for user, _ in SERVICE_ROLES.values()} - {
        "producer-${MAAS_EXAMPLE_TENANT:-acme}"
    } == {*acl.ROLES, acl.GATEWAY}
    for name in MAAS_SERVICES:
        url = compose["services"][name]["environment"]["MAAS_BROKER_URL"]
        assert re.fullmatch(role_url(name), url), (name, url)
    # Only the operator's cli writes the ACL and the password files; Redis reads
    # the ACL file only and never sees a password.
    cli = set(compose["services"]["cli"]["volumes"])
    assert {
        "./secrets/redis-acl:/run/maas/redis-acl",
        "./secrets/redis-passwords:/run/maas/redis-passwords",
    } <= cli
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            if "redis-passwords" in volume or "redis-acl" in volume:
                assert name in ("cli", "redis"), (name, volume)
                assert name == "cli" or volume.endswith(":ro")


def test_init_secrets_makes_the_password_of_every_role_compose_uses() -> None:
    script = (DOCKER / "init-secrets.sh").read_text()
    roles = re.search(r'^roles="([^"]+)"$', script, re.MULTILINE)
    assert roles, "init-secrets.sh lists the roles it makes passwords for"
    made = {
        ("PRODUCER" if r.startswith("producer-") else r.upper()) for r in roles.group(1).split()
    }
    used = set(
        re.findall(r"MAAS_REDIS_PASSWORD_(\w+)", COMPOSE.read_text() + COMPOSE_TLS.read_text())
    )
    assert used == made
    assert "producer-$example_tenant" in roles.group(1)


def documented_commands(text: str) -> list[list[str]]:
    """The ``maas-worker ...`` command lines in ``docker compose ... run`` instructions."""
    joined = re.sub(r"\\+\n[#\s]*", " ", text)  # backslash continuations, in comments too
    found = []
    for line in joined.splitlines():
        if "docker compose" in line and " run " in line and "maas-worker" in line:
            words = shlex.split(line.split("maas-worker", 1)[1].split("#", 1)[0])
            found.append(["maas-worker", *words])
    return found


@pytest.mark.parametrize("path", [COMPOSE, DOCKER / "init-secrets.sh"], ids=lambda p: p.name)
def test_the_documented_steps_are_real_cli_commands(path: Path) -> None:
    commands = documented_commands(path.read_text())
    assert any(c[:2] == ["maas-worker", "acl"] for c in commands), "the acl step is documented"
    for argv in commands:
        assert_cli_command([interpolate(a, {"example_tenant": "acme"}) for a in argv], path.name)


def test_nothing_runs_as_root_or_privileged(compose: dict[str, Any]) -> None:
    for name, svc in interpolate(
        compose["services"], {"MAAS_UID": "1000", "MAAS_GID": "1000"}
    ).items():
        assert svc.get("user"), f"{name} sets no user"
        assert svc["user"].split(":")[0] not in {"0", "root"}, name
        assert not svc.get("privileged"), name
        raw_user = compose["services"][name]["user"]
        assert raw_user.startswith("${MAAS_UID:?"), f"{name}: the uid must be given, no default"


def test_keyring_and_models_are_mounted_not_baked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker_mounts = {v.split(":")[1]: v for v in services["worker"]["volumes"]}
    # The keyring's folder (rotation replaces the file by rename), read-only.
    assert worker_mounts["/run/maas/keyring"] == "./secrets/keyring:/run/maas/keyring:ro"
    assert worker_mounts["/srv/models"].endswith(":ro")
    producer = services["producer"]["volumes"][0]
    assert producer.startswith("./secrets/clients/") and producer.endswith(":/run/maas/keyring:ro")
    dockerfile = DOCKERFILE.read_text()
    assert "MAAS_KEYRING=/run/maas/keyring/keyring.json" in dockerfile
    assert "MAAS_MODEL_DIR=/srv/models" in dockerfile


def test_prometheus_and_grafana_are_pinned_on_loopback_and_grafana_needs_a_password(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", services["grafana"]["image"])
    for name in MONITORING_SERVICES:
        svc = services[name]
        assert svc["ports"], name
        for port in svc["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} is published on loopback only"
        assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], name
        assert "MAAS_BROKER_URL" not in svc.get("environment", {}), f"{name} needs no Redis"
    grafana_env = services["grafana"]["environment"]
    assert re.fullmatch(
        r"\$\{MAAS_GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", grafana_env["GF_SECURITY_ADMIN_PASSWORD"]
    ), "Grafana's admin password must come from .env, and be required"
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana_env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # init-secrets.sh writes the password (and the data folders the services mount).
    script = (DOCKER / "init-secrets.sh").read_text()
    assert 'echo "MAAS_GRAFANA_ADMIN_PASSWORD=$(random_hex)"' in script
    assert '"$dir/data/prometheus" "$dir/data/grafana"' in script
    # What they mount exists in the repository (the data folders are made at setup).
    for name in MONITORING_SERVICES:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if not source.startswith("./data/"):
                assert (DOCKER / source).exists(), (name, source)
    prom_cmd = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_prometheus_finds_every_worker_replica_and_the_exporter() -> None:
    config = load(DOCKER / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"maas-worker", "maas-fleet"}
    # `--scale worker=N`: every replica is an A record of the service name.
    (dns,) = jobs["maas-worker"]["dns_sd_configs"]
    assert dns == {"names": ["worker"], "type": "A", "port": 9540, "refresh_interval": "15s"}
    assert jobs["maas-fleet"]["static_configs"] == [{"targets": ["metrics:9541"]}]


# -- compose.tls.yaml ------------------------------------------------------------------------
def test_tls_overlay_puts_every_connection_on_rediss_with_certificates(
    compose: dict[str, Any],
) -> None:
    tls = load(COMPOSE_TLS)
    # Every service that connects to Redis; Prometheus and Grafana never do.
    assert set(tls["services"]) == set(compose["services"]) - MONITORING_SERVICES
    cmd = tls["services"]["redis"]["command"]
    assert cmd[cmd.index("--port") + 1] == "0", "no plaintext port"
    assert cmd[cmd.index("--tls-auth-clients") + 1] == "yes"
    assert cmd[cmd.index("--appendonly") + 1] == "yes" and "--aclfile" in cmd
    targets = {f"/run/secrets/{s}" for s in tls["services"]["redis"]["secrets"]}
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert cmd[cmd.index(flag) + 1] in targets, flag
    base = compose["services"]["redis"]["command"]
    assert cmd[cmd.index("--aclfile") + 1] == base[base.index("--aclfile") + 1]
    for name in MAAS_SERVICES:
        svc = tls["services"][name]
        env = svc["environment"]
        # The same role as without TLS, over rediss://.
        assert re.fullmatch(role_url(name, "rediss"), env["MAAS_BROKER_URL"]), name
        mounted = {f"/run/secrets/{s}" for s in svc["secrets"]}
        for var in ("MAAS_REDIS_TLS_CA", "MAAS_REDIS_TLS_CERT", "MAAS_REDIS_TLS_KEY"):
            assert env[var] in mounted, (name, var)
        assert "MAAS_REDIS_TLS_VERIFY" not in env  # verification stays on
    assert set(tls["secrets"]) >= {
        s
        for svc in tls["services"].values()
        for s in svc.get("secrets", [])
        if s != "redis-users.acl"
    }


# -- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_is_pinned_to_a_version_and_a_digest(
    compose: dict[str, Any],
) -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for kind, a in instructions if kind == "ARG" and "=" in a)
    froms = [interpolate(rest.split()[0], args) for kind, rest in instructions if kind == "FROM"]
    assert froms
    for image in froms:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image), image
    # compose passes its own default (MAAS_PYTHON_IMAGE): the same image.
    build_args = compose["services"]["worker"]["build"]["args"]
    assert build_args["PYTHON_IMAGE"].startswith("${MAAS_PYTHON_IMAGE:-")
    assert interpolate(build_args["PYTHON_IMAGE"]) == args["PYTHON_IMAGE"]


def test_dockerfile_has_no_syntax_line() -> None:
    """`# syntax=` makes BuildKit pull a frontend image first: offline builds fail."""
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)


def test_one_build_and_every_maas_service_runs_its_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert [name for name, svc in services.items() if "build" in svc] == ["worker"]
    build = services["worker"]["build"]
    assert build["context"] == ".." and build["dockerfile"] == "docker/Dockerfile"
    assert {services[name]["image"] for name in MAAS_SERVICES} == {
        "${MAAS_IMAGE:-maas-worker:0.1.0}"
    }


def test_beat_has_a_liveness_check_on_its_alive_file(compose: dict[str, Any]) -> None:
    beat = compose["services"]["beat"]
    health = beat["healthcheck"]
    assert not health.get("disable"), "`up --wait` fails on a service without a health check"
    alive = beat["environment"]["MAAS_BEAT_ALIVE_FILE"]
    assert alive.startswith("/tmp/"), "the root file system is read-only: /tmp is its tmpfs"
    assert health["test"][:2] == ["CMD", "python"]
    assert f"open({alive!r})" in health["test"][-1]


def test_home_is_writable_in_a_read_only_container(compose: dict[str, Any]) -> None:
    """onnxruntime writes under $HOME (its telemetry device id): /tmp, the tmpfs."""
    env = dict(
        item.split("=", 1)
        for kind, rest in dockerfile_instructions()
        if kind == "ENV"
        for item in shlex.split(rest)
    )
    assert env["HOME"] == "/tmp"
    for name in MAAS_SERVICES:
        svc = compose["services"][name]
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name


def test_monitoring_services_are_behind_a_profile(compose: dict[str, Any]) -> None:
    """Their images come from Docker Hub: the core stack starts without them, offline too."""
    for name in MONITORING_SERVICES:
        assert compose["services"][name]["profiles"] == ["monitoring"], name
    core = [name for name, svc in compose["services"].items() if "profiles" not in svc]
    assert sorted(core) == ["beat", "flower", "gateway", "metrics", "redis", "worker"]


def test_compose_says_it_needs_compose_v2() -> None:
    assert "Docker Compose v2" in COMPOSE.read_text()


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for kind, rest in dockerfile_instructions() if kind == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"0", "root"}


def test_dockerfile_commands_are_real_cli_commands() -> None:
    instructions = dockerfile_instructions()
    cmd = [json.loads(rest) for kind, rest in instructions if kind == "CMD"]
    assert len(cmd) == 1
    assert_cli_command(cmd[0], "Dockerfile CMD")
    health = [rest for kind, rest in instructions if kind == "HEALTHCHECK"]
    assert len(health) == 1
    probe = json.loads(health[0][health[0].index("CMD ") + 4 :])
    assert_cli_command(probe, "Dockerfile HEALTHCHECK")
    assert probe[:2] == ["maas-worker", "ping"]  # it asks the worker


def test_dockerfile_copies_only_the_package_sources() -> None:
    copies = [rest for kind, rest in dockerfile_instructions() if kind == "COPY"]
    sources = [c.split()[:-1] for c in copies if not c.startswith("--from=")]
    assert sorted(s for group in sources for s in group) == [
        "README.md",
        "docker/requirements.lock",
        "maas_worker",
        "pyproject.toml",
    ]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**")] == "**"  # everything else stays out of the context
    assert "!docker/requirements.lock" in ignore
    assert {"**/*.key", "**/keyring*.json", "**/.env"} <= set(ignore)


def pip_installs() -> list[list[str]]:
    """The arguments after ``pip install`` of each install the Dockerfile runs."""
    installs = []
    for kind, rest in dockerfile_instructions():
        if kind != "RUN":
            continue
        for command in rest.split("&&"):
            argv = shlex.split(command)
            for i in range(len(argv) - 1):
                if Path(argv[i]).name in ("pip", "pip3") and argv[i + 1] == "install":
                    installs.append(argv[i + 2 :])
    return installs


def test_dockerfile_installs_dependencies_only_from_the_hashed_lock() -> None:
    installs = pip_installs()
    from_lock = [args for args in installs if "-r" in args]
    assert len(from_lock) == 1, installs
    assert "--require-hashes" in from_lock[0]
    assert from_lock[0][from_lock[0].index("-r") + 1] == "docker/requirements.lock"
    # Every other install is the package alone: nothing is resolved or fetched
    # outside the lock (no `pip install --upgrade pip`, no build isolation).
    others = [args for args in installs if args is not from_lock[0]]
    assert others, "the package itself is installed"
    for args in others:
        assert {"--no-deps", "--no-build-isolation"} <= set(args), args
        assert [a for a in args if not a.startswith("-")] == ["."], args


# -- requirements.in and requirements.lock ---------------------------------------------------
def requirements_in() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in LOCK_IN.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """Each package of requirements.lock: (its pinned version, its sha256 hashes)."""
    pins = {}
    for line in LOCK.read_text().replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name, _, version = words[0].partition("==")
        # An environment marker (`; sys_platform != "win32"`) may sit between the pin and
        # its hashes.
        rest = words[1:]
        if rest and rest[0] == ";":
            rest = rest[next(i for i, w in enumerate(rest) if w.startswith("--")) :]
        assert all(w.startswith("--hash=sha256:") for w in rest), line
        pins[canonicalize_name(name)] = (version, [w.split(":", 1)[1] for w in rest])
    return pins


def test_the_lock_pins_every_package_with_hashes() -> None:
    pins = lock_pins()
    assert {"celery", "kombu", "onnxruntime", "flower", "setuptools"} <= set(pins)
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[\w.]+", version), f"{name} is not pinned to one version"
        assert hashes, f"{name} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_satisfies_requirements_in() -> None:
    pins = lock_pins()
    for req in requirements_in():
        version = pins.get(canonicalize_name(req.name), ("", []))[0]
        assert version, f"{req.name} is missing from requirements.lock: run `make lock`"
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock has {req.name}=={version}, not {req}: run `make lock`"
        )


def test_requirements_in_is_what_pyproject_gives_the_image() -> None:
    """The core dependencies, the worker, flower and gateway extras, and the build backend."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    wanted = [
        *pyproject["project"]["dependencies"],
        *extras["worker"],
        *extras["flower"],
        *extras["gateway"],
        *pyproject["build-system"]["requires"],
        # Locked unconditionally for a base image's Python below 3.11.3
        # (requirements.in says why).
        "async-timeout>=4.0.3",
    ]

    def normal(req: Requirement) -> str:
        return f"{canonicalize_name(req.name)}{sorted(req.extras)}{req.specifier}{req.marker}"

    assert sorted(map(normal, requirements_in())) == sorted(normal(Requirement(r)) for r in wanted)


# -- Procfile ------------------------------------------------------------------------------
def procfile() -> dict[str, str]:
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def test_procfile_runs_every_process_the_system_needs() -> None:
    entries = procfile()
    assert set(entries) == {"worker", "beat", "flower", "metrics"}
    for name, command in entries.items():
        assert_cli_command(shlex.split(interpolate(command)), f"Procfile {name}")
    assert "--unauthenticated" not in entries["flower"]


# -- no secrets anywhere -------------------------------------------------------------------------
_SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # The user part may be a ${VAR} itself (producer-${MAAS_EXAMPLE_TENANT:-acme}).
    "password in a URL": re.compile(r"rediss?://(?:[^:/@\s$]|\$\{[^}]*\})*:(?!\$\{)[^@\s]+@"),
    "literal requirepass": re.compile(r"requirepass\s+(?!\$)\S+"),
    "ACL password or hash": re.compile(r"\buser\s+\w+\s+on\s+[^\n]*[>#](?!%s)\S+"),
    "random-looking token": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    # user:password with a literal password (a ${VAR} or a $(command) is fine).
    "literal basic auth": re.compile(r"BASIC_AUTH(?:=|:\s)\s*[\"']?[^:$\s]*:(?![$\"'])\S+"),
}


@pytest.mark.parametrize(
    "path",
    sorted(
        [p for p in DOCKER.iterdir() if p.is_file() and p.name != ".gitignore"]
        + [p for p in (DOCKER / "grafana").rglob("*") if p.is_file()]
        + [PROCFILE, ROOT / ".dockerignore"]
    ),
    ids=lambda p: p.name,
)
def test_no_secret_values_in_deployment_files(path: Path) -> None:
    # The lock's pins are sha256 digests of public release files, not secrets.
    # So are image digests (image@sha256:...).
    text = re.sub(r"(--hash=|@)sha256:[0-9a-f]{64}", "", path.read_text())
    for what, pattern in _SECRET_PATTERNS.items():
        assert not pattern.search(text), f"{path.name}: {what}: {pattern.search(text)}"
