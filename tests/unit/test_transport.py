"""Transport settings: MAAS_REDIS_TLS_* for the broker (Celery) and every redis-py client.

The real handshakes (certificate, host name, client certificate, ACL user)
are in tests/integration/test_tls.py against a TLS-only server.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis

from maas_worker.app import celery_config
from maas_worker.backend.redis import backend_client, redis_client
from maas_worker.errors import ConfigError
from maas_worker.settings import RedisTLS, Settings, redact_url

PASSWORD = "s3cr3t-Pa55"
TLS_URL = f"rediss://maas:{PASSWORD}@redis.internal:6380/0"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    # Contents do not matter here: nothing connects.
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def tls_env(pem: dict[str, Path], **extra: str) -> dict[str, str]:
    return {
        "MAAS_BROKER_URL": TLS_URL,
        "MAAS_REDIS_TLS_CA": str(pem["ca"]),
        "MAAS_REDIS_TLS_CERT": str(pem["cert"]),
        "MAAS_REDIS_TLS_KEY": str(pem["key"]),
        **extra,
    }


def test_defaults_verify_the_server_with_the_system_cas() -> None:
    s = Settings.from_env({"MAAS_BROKER_URL": TLS_URL})
    assert s.redis_tls == RedisTLS()
    assert s.redis_ssl(s.broker_url) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
    }


def test_files_and_verification_are_read_from_the_environment(pem: dict[str, Path]) -> None:
    s = Settings.from_env(tls_env(pem))
    assert s.redis_ssl(s.result_backend) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(pem["ca"]),
        "ssl_certfile": str(pem["cert"]),
        "ssl_keyfile": str(pem["key"]),
    }
    off = Settings.from_env({"MAAS_BROKER_URL": TLS_URL, "MAAS_REDIS_TLS_VERIFY": "none"})
    assert off.redis_ssl(TLS_URL) == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}


def test_plain_urls_get_no_tls_options(pem: dict[str, Path]) -> None:
    s = Settings.from_env(tls_env(pem, MAAS_RESULT_BACKEND="redis+socket:///run/redis.sock"))
    assert s.redis_ssl(s.result_backend) is None
    assert s.redis_ssl(s.broker_url) is not None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MAAS_REDIS_TLS_VERIFY": "optional"}, "MAAS_REDIS_TLS_VERIFY must be required or none"),
        ({"MAAS_REDIS_TLS_CA": "/nonexistent/ca.pem"}, "MAAS_REDIS_TLS_CA: /nonexistent/ca.pem"),
        ({"MAAS_REDIS_TLS_KEY": "KEY"}, "MAAS_REDIS_TLS_KEY needs MAAS_REDIS_TLS_CERT"),
        (
            {"MAAS_BROKER_URL": "redis://h:6379/0", "MAAS_REDIS_TLS_CA": "CA"},
            "neither MAAS_BROKER_URL nor MAAS_RESULT_BACKEND is rediss://",
        ),
        ({"MAAS_BROKER_URL": TLS_URL + "?ssl_cert_reqs=none"}, "must not carry ssl_\\* options"),
        ({"MAAS_RESULT_BACKEND": "rediss://h/0?SSL_CA_CERTS=/x"}, "must not carry ssl_\\* options"),
    ],
)
def test_invalid_tls_settings_fail_with_one_clear_line(
    pem: dict[str, Path], env: dict[str, str], message: str
) -> None:
    env = {
        k: str(pem["key"]) if v == "KEY" else str(pem["ca"]) if v == "CA" else v
        for k, v in env.items()
    }
    with pytest.raises(ConfigError, match=message) as err:
        Settings.from_env({"MAAS_BROKER_URL": TLS_URL, **env})
    assert PASSWORD not in str(err.value)


def test_celery_broker_gets_the_same_options_and_never_cert_none_by_default(
    pem: dict[str, Path],
) -> None:
    s = Settings.from_env(tls_env(pem))
    conf = celery_config(s)
    # kombu alone would connect a rediss:// broker with CERT_NONE.
    assert conf["broker_use_ssl"] == s.redis_tls.options()
    assert conf["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert celery_config(Settings.from_env({}))["broker_use_ssl"] is False


def test_redis_py_clients_connect_with_tls_only_for_rediss(pem: dict[str, Path]) -> None:
    s = Settings.from_env(tls_env(pem))
    client = backend_client(s)
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kw = pool.connection_kwargs
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == (
        str(pem["ca"]),
        str(pem["cert"]),
        str(pem["key"]),
    )
    assert kw["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kw["ssl_check_hostname"] is True
    assert (kw["username"], kw["password"]) == ("maas", PASSWORD)
    plain = redis_client("redis://h:6379/0", tls=s.redis_tls).connection_pool
    assert issubclass(plain.connection_class, redis.Connection)
    assert not issubclass(plain.connection_class, redis.SSLConnection)
    assert not any(k.startswith("ssl") for k in plain.connection_kwargs)


def test_passwords_stay_out_of_reprs_and_redacted_urls(pem: dict[str, Path]) -> None:
    s = Settings.from_env(tls_env(pem, MAAS_FLOWER_BASIC_AUTH=f"ops:{PASSWORD}"))
    assert PASSWORD not in repr(s)
    assert redact_url(s.broker_url) == "rediss://maas:***@redis.internal:6380/0"
    client = backend_client(s)
    assert PASSWORD not in repr(client) and PASSWORD not in repr(client.connection_pool)
