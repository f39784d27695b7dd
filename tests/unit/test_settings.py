"""Settings: defaults, every MAAS_* variable, validation on the type, overrides, the docs table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from maas_worker import settings as settings_module
from maas_worker.errors import ConfigError
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.protocol import PRIORITIES, queue_for
from maas_worker.settings import (
    DEFAULT_AUDIT_MAXLEN,
    DEFAULT_BROKER_URL,
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_JOB_TTL_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_INPUT_BYTES,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_RESULT_TTL_S,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    MAX_JOB_TTL_S,
    AutoscalePolicy,
    FleetPolicy,
    GatewaySettings,
    RedisTLS,
    Settings,
    markdown_table,
    options,
    redact_url,
)
from scripts import settings_docs

HOME_ENV = {"XDG_CONFIG_HOME": "/cfg", "XDG_DATA_HOME": "/data"}


def test_defaults() -> None:
    s = Settings.from_env(HOME_ENV)
    assert s.broker_url == DEFAULT_BROKER_URL == "redis://127.0.0.1:6379/0"
    assert s.result_backend == DEFAULT_BROKER_URL
    assert s.keyring_path == Path("/cfg/maas-worker/keyring.json")
    assert s.tenant is None
    assert s.model_dir == BUNDLED_MODEL_DIR
    assert (BUNDLED_MODEL_DIR / "digits" / "2" / "manifest.sig").is_file()
    assert s.trusted_signers == (BUNDLED_SIGNERS_DIR,)
    assert any(BUNDLED_SIGNERS_DIR.glob("*.pub"))
    assert s.model_keys_path == Path("/cfg/maas-worker/model-keys.json")
    assert s.visibility_timeout_s == DEFAULT_VISIBILITY_TIMEOUT_S
    assert s.diagnostic_models is False
    assert s.job_ttl_s == DEFAULT_JOB_TTL_S
    assert s.result_ttl_s == DEFAULT_RESULT_TTL_S
    assert s.max_input_bytes == DEFAULT_MAX_INPUT_BYTES
    assert s.max_result_bytes == DEFAULT_MAX_RESULT_BYTES
    assert s.clock_skew_s == DEFAULT_CLOCK_SKEW_S
    assert s.lease_s == DEFAULT_LEASE_S
    assert s.audit_maxlen == DEFAULT_AUDIT_MAXLEN


def test_default_paths_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({})
    assert s.keyring_path == tmp_path / ".config" / "maas-worker" / "keyring.json"
    assert s.model_dir == BUNDLED_MODEL_DIR
    assert s.model_keys_path == tmp_path / ".config" / "maas-worker" / "model-keys.json"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_TENANT", "acme")
    monkeypatch.setenv("MAAS_LEASE_S", "20")
    s = Settings.from_env()
    assert s.tenant == "acme"
    assert s.lease_s == 20


def test_not_built_at_import() -> None:
    assert not any(isinstance(v, Settings) for v in vars(settings_module).values())


def test_frozen() -> None:
    s = Settings.from_env(HOME_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tenant = "acme"  # type: ignore[misc]


def test_every_variable_is_read() -> None:
    env = {
        "MAAS_BROKER_URL": "redis://broker:6380/1",
        "MAAS_RESULT_BACKEND": "rediss://backend:6390/2",
        "MAAS_KEYRING": "/etc/maas/keyring.json",
        "MAAS_TENANT": "acme",
        "MAAS_MODEL_DIR": "/srv/models",
        "MAAS_TRUSTED_SIGNERS": "/etc/maas/signers:/etc/maas/extra.pub",
        "MAAS_MODEL_KEYS": "/etc/maas/model-keys.json",
        "MAAS_VISIBILITY_TIMEOUT_S": "120",
        "MAAS_DIAGNOSTIC_MODELS": "1",
        "MAAS_JOB_TTL_S": "600",
        "MAAS_RESULT_TTL_S": "900",
        "MAAS_MAX_INPUT_BYTES": "2048",
        "MAAS_MAX_RESULT_BYTES": "4096",
        "MAAS_CLOCK_SKEW_S": "5",
        "MAAS_LEASE_S": "9",
        "MAAS_AUDIT_MAXLEN": "500",
    }
    s = Settings.from_env(env)
    assert s.broker_url == "redis://broker:6380/1"
    assert s.result_backend == "rediss://backend:6390/2"
    assert s.keyring_path == Path("/etc/maas/keyring.json")
    assert s.tenant == "acme"
    assert s.model_dir == Path("/srv/models")
    assert s.trusted_signers == (Path("/etc/maas/signers"), Path("/etc/maas/extra.pub"))
    assert s.model_keys_path == Path("/etc/maas/model-keys.json")
    assert s.visibility_timeout_s == 120
    assert s.diagnostic_models is True
    assert s.job_ttl_s == 600
    assert s.result_ttl_s == 900
    assert s.max_input_bytes == 2048
    assert s.max_result_bytes == 4096
    assert s.clock_skew_s == 5
    assert s.lease_s == 9
    assert s.audit_maxlen == 500


def test_every_setting_is_declared_with_its_own_variable() -> None:
    names = [o.env for o in options()]
    assert all(name.startswith("MAAS_") for name in names)
    assert len(names) == len(set(names))
    for cls in (Settings, RedisTLS, AutoscalePolicy, FleetPolicy, GatewaySettings):
        for f in dataclasses.fields(cls):
            assert f.metadata, f"{cls.__name__}.{f.name} has no declaration"


def test_every_declared_variable_is_read() -> None:
    """Each variable, set to a value other than its default, changes the settings."""
    pem = Path(__file__)  # any readable file
    values = {
        "MAAS_BROKER_URL": "redis://b/1",
        "MAAS_RESULT_BACKEND": "redis://r/2",
        "MAAS_REDIS_TLS_CA": str(pem),
        "MAAS_REDIS_TLS_CERT": str(pem),
        "MAAS_REDIS_TLS_KEY": str(pem),
        "MAAS_REDIS_TLS_VERIFY": "none",
        "MAAS_KEYRING": "/k.json",
        "MAAS_TENANT": "acme",
        "MAAS_MODEL_DIR": "/m",
        "MAAS_TRUSTED_SIGNERS": "/s",
        "MAAS_MODEL_KEYS": "/mk.json",
        "MAAS_PRIVATE_KEY_DIR": "/pk",
        "MAAS_PRIVATE_CONTEXT_TTL_S": "3600",
        "MAAS_PRIVATE_MAX_CONTEXT_BYTES": "1000",
        "MAAS_PRIVATE_CONTEXT_CACHE": "2",
        "MAAS_DIAGNOSTIC_MODELS": "1",
        "MAAS_TIME_LIMITS": "echo=1:2",
        "MAAS_MAX_QUEUE_DEPTH": "7",
        "MAAS_CRYPTO_BACKEND": "openssl",
        "MAAS_BATCH": "digits=8:1",
        "MAAS_FLOWER_BASIC_AUTH": "ops:pw",
        "MAAS_REMOTE_CONTROL": "operator",
        "MAAS_WORKER_MODE": "celery-tasks",
        "MAAS_METRICS_ADDRESS": "0.0.0.0",
        "MAAS_LOW_PRIORITY_SHARE": "0.25",
        "MAAS_FLEET_MIN_NODES": "2",
        "MAAS_AUDIT_MAXLEN": "500",
        "MAAS_GATEWAY_TLS_CERT": str(pem),
        "MAAS_GATEWAY_TLS_KEY": str(pem),
        "MAAS_GATEWAY_ADDRESS": "0.0.0.0",
        "MAAS_GATEWAY_KEYRING": "/g.json",
        "MAAS_GATEWAY_MAX_BATCH_BYTES": "4096",
        "MAAS_REDIS_SENTINEL_MASTER": "maas",
        "MAAS_REDIS_SENTINEL_PASSWORD": "spw",
        "MAAS_REDIS_SENTINEL_TLS": "1",
        "MAAS_REDIS_WAIT_REPLICAS": "2",
        "MAAS_REDIS_CLUSTER": "1",
        "MAAS_REDIS_CLUSTER_NODES": "n2:7001,n3:7002",
        "MAAS_QUEUE_SHARDS": "4",
        "MAAS_WORKER_SHARDS": "0,2",
    }
    for option in options():
        # TLS files need a rediss:// URL, and the client key its certificate.
        env = {**HOME_ENV, "MAAS_BROKER_URL": "rediss://tls/0"}
        if option.env == "MAAS_REDIS_SENTINEL_TLS":  # needs a sentinel:// URL (and a name)
            env.update(MAAS_BROKER_URL="sentinel://s:26379/0", MAAS_REDIS_SENTINEL_MASTER="m")
        if option.env == "MAAS_REDIS_CLUSTER_NODES":  # more seeds of a cluster
            env["MAAS_REDIS_CLUSTER"] = "1"
        if option.env == "MAAS_REDIS_TLS_KEY":
            env["MAAS_REDIS_TLS_CERT"] = str(pem)
        if option.env == "MAAS_GATEWAY_TLS_KEY":
            env["MAAS_GATEWAY_TLS_CERT"] = str(pem)
        changed = Settings.from_env({**env, option.env: values.get(option.env, "50")})
        assert changed != Settings.from_env(env), option.env


def test_secrets_are_declared_and_kept_out_of_repr() -> None:
    secret = {o.env for o in options() if o.secret}
    assert secret == {
        "MAAS_BROKER_URL",
        "MAAS_RESULT_BACKEND",
        "MAAS_FLOWER_BASIC_AUTH",
        "MAAS_REDIS_SENTINEL_PASSWORD",
    }
    hidden = {f.name for f in dataclasses.fields(Settings) if not f.repr}
    assert hidden == {"broker_url", "result_backend", "flower_basic_auth"}


def test_bounds_and_choices_are_declared_for_the_docs() -> None:
    accepted = {o.env: o.accepted for o in options()}
    assert accepted["MAAS_LEASE_S"] == "an integer >= 3"
    assert accepted["MAAS_LOW_PRIORITY_SHARE"] == "a number from 0 to 0.5"
    assert accepted["MAAS_REMOTE_CONTROL"] == "`inspect`, `operator`"


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    _, table, _ = settings_docs.split(settings_docs.DOC.read_text())
    assert table == markdown_table(), (
        "docs/configuration.md is stale: run python scripts/settings_docs.py --write"
    )
    for option in options():
        assert f"| `{option.env}` |" in table


def test_result_backend_defaults_to_the_broker_url() -> None:
    s = Settings.from_env({"MAAS_BROKER_URL": "redis://:pw@broker:6380/3"})
    assert s.result_backend == "redis://:pw@broker:6380/3"
    s = Settings.from_env({"MAAS_BROKER_URL": "redis://broker/1", "MAAS_RESULT_BACKEND": ""})
    assert s.result_backend == "redis://broker/1"


@pytest.mark.parametrize(
    "url", ["redis://h:1/0", "rediss://h/0", "redis+socket:///tmp/r.sock", "unix:///tmp/r.sock"]
)
def test_accepted_url_schemes(url: str) -> None:
    s = Settings.from_env({"MAAS_BROKER_URL": url})
    assert s.broker_url == url


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_diagnostic_models_on(value: str) -> None:
    assert Settings.from_env({"MAAS_DIAGNOSTIC_MODELS": value}).diagnostic_models is True


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off"])
def test_diagnostic_models_off(value: str) -> None:
    assert Settings.from_env({"MAAS_DIAGNOSTIC_MODELS": value}).diagnostic_models is False


@pytest.mark.parametrize(
    "name",
    ["MAAS_TENANT", "MAAS_KEYRING", "MAAS_MODEL_DIR", "MAAS_BROKER_URL", "MAAS_LEASE_S"],
)
def test_empty_values_mean_default(name: str) -> None:
    assert Settings.from_env({**HOME_ENV, name: ""}) == Settings.from_env(HOME_ENV)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAAS_BROKER_URL", "http://broker:6379"),
        ("MAAS_BROKER_URL", "amqp://guest@rabbit//"),
        ("MAAS_BROKER_URL", "broker:6379"),
        ("MAAS_RESULT_BACKEND", "db+sqlite:///results.db"),
        ("MAAS_VISIBILITY_TIMEOUT_S", "ten"),
        ("MAAS_VISIBILITY_TIMEOUT_S", "0"),
        ("MAAS_VISIBILITY_TIMEOUT_S", "1.5"),
        ("MAAS_JOB_TTL_S", "-1"),
        ("MAAS_JOB_TTL_S", str(MAX_JOB_TTL_S + 1)),
        ("MAAS_RESULT_TTL_S", "0"),
        ("MAAS_MAX_INPUT_BYTES", "1MB"),
        ("MAAS_MAX_RESULT_BYTES", "0"),
        ("MAAS_CLOCK_SKEW_S", "-1"),
        ("MAAS_LEASE_S", "2"),
        ("MAAS_AUDIT_MAXLEN", "99"),
        ("MAAS_AUDIT_MAXLEN", "lots"),
        ("MAAS_SAMPLE_INTERVAL_S", "0.1"),
        ("MAAS_LOW_PRIORITY_SHARE", "half"),
        ("MAAS_CRYPTO_BACKEND", "rot13"),
        ("MAAS_DIAGNOSTIC_MODELS", "maybe"),
        ("MAAS_TIME_LIMITS", "echo=5:1"),
        ("MAAS_TIME_LIMITS", "echo"),
        ("MAAS_BATCH", "digits=5000:1"),
        ("MAAS_MAX_QUEUE_DEPTH", "urgent=5"),
        ("MAAS_MAX_QUEUE_DEPTH", "many"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_limits_at_their_minimum_are_accepted() -> None:
    s = Settings.from_env(
        {
            "MAAS_CLOCK_SKEW_S": "0",
            "MAAS_LEASE_S": "3",
            "MAAS_AUDIT_MAXLEN": "100",
            "MAAS_JOB_TTL_S": str(MAX_JOB_TTL_S),
        }
    )
    assert (s.clock_skew_s, s.lease_s, s.audit_maxlen, s.job_ttl_s) == (0, 3, 100, MAX_JOB_TTL_S)


def test_overrides_win() -> None:
    env = {
        "MAAS_BROKER_URL": "redis://env/0",
        "MAAS_TENANT": "acme",
        "MAAS_KEYRING": "/env/keyring.json",
        "MAAS_LEASE_S": "9",
    }
    s = Settings.from_env(
        env,
        tenant="globex",
        keyring_path=Path("/flag/keyring.json"),
        broker_url="redis://flag/1",
        lease_s=30,
    )
    assert s.tenant == "globex"
    assert s.keyring_path == Path("/flag/keyring.json")
    assert s.broker_url == "redis://flag/1"
    assert s.lease_s == 30


def test_none_overrides_are_ignored() -> None:
    env = {"MAAS_TENANT": "acme", "MAAS_BROKER_URL": "redis://env/0"}
    s = Settings.from_env(env, tenant=None, broker_url=None, keyring_path=None)
    assert s == Settings.from_env(env)


def test_unknown_override_is_a_programmer_error() -> None:
    with pytest.raises(TypeError):
        Settings.from_env({}, no_such_setting=1)


def test_broker_url_override_moves_the_default_result_backend() -> None:
    s = Settings.from_env({}, broker_url="redis://other:6380/1")
    assert s.result_backend == "redis://other:6380/1"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match="broker"):
        Settings.from_env({}, broker_url="http://not-redis:80")


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"lease_s": 0}, "MAAS_LEASE_S"),
        ({"job_ttl_s": MAX_JOB_TTL_S + 1}, "MAAS_JOB_TTL_S"),
        ({"low_priority_share": 0.9}, "MAAS_LOW_PRIORITY_SHARE"),
        ({"remote_control": "all"}, "MAAS_REMOTE_CONTROL"),
        ({"result_backend": "db+sqlite:///r.db"}, "MAAS_RESULT_BACKEND"),
        ({"time_limits": {"echo": (5.0, 1.0)}}, "MAAS_TIME_LIMITS"),
        ({"batching": {"digits": (0, 2.0)}}, "MAAS_BATCH"),
        ({"max_queue_depth": {"high": 1}}, "MAAS_MAX_QUEUE_DEPTH"),
    ],
)
def test_out_of_bounds_overrides_name_the_variable(overrides: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        Settings.from_env({}, **overrides)
    assert "\n" not in str(info.value)


def test_construction_and_replace_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="MAAS_LEASE_S must be >= 3, got 2"):
        Settings(lease_s=2)
    s = Settings.from_env(HOME_ENV)
    with pytest.raises(ConfigError, match="MAAS_AUDIT_MAXLEN"):
        dataclasses.replace(s, audit_maxlen=1)
    with pytest.raises(ConfigError, match="MAAS_AUTOSCALE_MAX_CPU_PCT"):
        AutoscalePolicy(max_cpu_pct=150)
    with pytest.raises(ConfigError, match="MAAS_FLEET_MIN_NODES"):
        FleetPolicy(min_nodes=3, max_nodes=2)
    with pytest.raises(ConfigError, match="MAAS_REDIS_TLS_CA"):
        RedisTLS(ca=Path("/nonexistent/ca.pem"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"lease_s": "30"},
        {"lease_s": True},
        {"keyring_path": "/k.json"},
        {"flower_basic_auth": 7},
        {"autoscale": FleetPolicy()},
    ],
)
def test_a_wrong_type_is_a_programmer_error(overrides: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        Settings.from_env({}, **overrides)


def test_a_flag_wins_over_an_invalid_variable() -> None:
    assert Settings.from_env({"MAAS_LEASE_S": "soon"}, lease_s=20).lease_s == 20


def test_a_constructed_result_backend_defaults_to_the_broker_url() -> None:
    assert Settings(broker_url="redis://b/1").result_backend == "redis://b/1"


def test_repr_never_contains_a_url_password() -> None:
    env = {
        "MAAS_BROKER_URL": "redis://user:s3cr3t-broker@broker:6379/0",
        "MAAS_RESULT_BACKEND": "rediss://:s3cr3t-backend@backend:6380/0",
    }
    s = Settings.from_env(env)
    for text in (repr(s), str(s), repr(Settings.from_env({}, broker_url=env["MAAS_BROKER_URL"]))):
        assert "s3cr3t" not in text
    assert s.broker_url.endswith("@broker:6379/0")  # the value itself is intact


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
        ("redis://user:p@ss@host:6379", "redis://user:***@host:6379"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("redis+socket:///tmp/redis.sock", "redis+socket:///tmp/redis.sock"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url", ["unix:///tmp/redis.sock?db=0&password=s3cr3t", "redis://host:6379/0?password=s3cr3t"]
)
def test_redact_url_query_password(url: str) -> None:
    assert "s3cr3t" not in redact_url(url)


def test_queue_for() -> None:
    assert PRIORITIES == ("high", "normal", "low")
    assert [queue_for(p) for p in PRIORITIES] == ["maas.high", "maas.normal", "maas.low"]
    with pytest.raises(ConfigError, match="urgent"):
        queue_for("urgent")


def test_max_envelope_chars_grows_with_the_input_limit() -> None:
    small = Settings.from_env({"MAAS_MAX_INPUT_BYTES": "1000"})
    large = Settings.from_env({"MAAS_MAX_INPUT_BYTES": "100000"})
    assert small.max_envelope_chars > 1000 * 4 // 3
    assert large.max_envelope_chars > small.max_envelope_chars


#: The entry points that may build settings from the environment; everything
#: else is given them. Each builds them once for its process.
ENTRY_MODULES = {
    "cli",  # the command line (one Settings from its global options)
    # A Celery app given no Settings (``celery -A maas_worker.app``) reads them once,
    # on first use: settings_of, beside the producer app it belongs to.
    "broker/app.py",
    "worker/runtime.py",  # get_runtime() given none (a solo or threads pool's first job)
    "worker/batch/consumer.py",  # serve(), a batch consumer process
    "client/core.py",  # Client/AsyncClient .from_env(), or built without settings
    "local/demo.py",  # the demo's own stack, on its embedded server
}


def test_settings_are_read_from_the_environment_only_at_entry_points() -> None:
    package = Path(settings_module.__file__).parent
    readers = set()
    for path in package.rglob("*.py"):
        if "Settings.from_env(" in path.read_text():
            readers.add(path.relative_to(package).as_posix())
    allowed = {r for r in readers if r.split("/")[0] in ENTRY_MODULES or r in ENTRY_MODULES}
    assert readers - allowed == set()


def test_an_app_holds_the_settings_it_was_made_with() -> None:
    from maas_worker.app import configure, make_app
    from maas_worker.broker.app import settings_of

    given = Settings.from_env({**HOME_ENV, "MAAS_SAMPLE_INTERVAL_S": "5"})
    app = make_app(given, include_tasks=False)
    assert settings_of(app) is given
    other = dataclasses.replace(given, remote_control="operator")
    configure(app, other)
    assert settings_of(app) is other


def test_an_app_made_without_settings_reads_them_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from maas_worker.app import make_app
    from maas_worker.broker.app import settings_of

    monkeypatch.setenv("MAAS_SAMPLE_INTERVAL_S", "7")
    app = make_app(include_tasks=False)
    # Celery reads its configuration: the settings are built from the environment.
    assert app.conf.beat_schedule["maas-sample"]["schedule"] == 7
    first = settings_of(app)
    monkeypatch.setenv("MAAS_SAMPLE_INTERVAL_S", "9")
    assert settings_of(app) is first
    assert first.sample_interval_s == 7
