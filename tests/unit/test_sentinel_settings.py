"""Sentinel URLs and the durability settings (MAAS_REDIS_SENTINEL_*, MAAS_REDIS_WAIT_*)."""

from __future__ import annotations

import pytest

from maas_worker.backend.redis import sentinel_options
from maas_worker.broker.app import (
    SENTINEL_TRANSPORT,
    TRANSPORT,
    make_producer_app,
    producer_transport,
    transport_options,
)
from maas_worker.errors import ConfigError
from maas_worker.settings import RedisHA, Settings, redact_url, sentinel_hosts
from maas_worker.tenancy import acl

URL = (
    "sentinel://app:pw@10.0.0.1:26379/2;sentinel://app:pw@10.0.0.2:26380/2;"
    "sentinel://app:pw@10.0.0.3/2"
)
ENV = {"MAAS_BROKER_URL": URL, "MAAS_REDIS_SENTINEL_MASTER": "maas"}


def test_a_sentinel_url_is_read_with_every_sentinel_the_user_and_the_db() -> None:
    parsed = sentinel_hosts(URL)
    assert parsed.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (parsed.username, parsed.password, parsed.db) == ("app", "pw", 2)


def test_a_sentinel_url_needs_the_master_name() -> None:
    with pytest.raises(ConfigError, match="MAAS_REDIS_SENTINEL_MASTER"):
        Settings.from_env({"MAAS_BROKER_URL": URL})
    assert Settings.from_env(ENV).result_backend == URL


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://h:1;redis://h:2",
        "sentinel://:1",
        "sentinel://h:1/x",
        "sentinel://h:99999",
        "sentinel://h:1/1;sentinel://h:2",  # kombu would use db 0 through the second
        "sentinel://u:p@h:1/0;sentinel://h:2/0",  # and no password
    ],
)
def test_malformed_sentinel_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="MAAS_BROKER_URL"):
        Settings.from_env({**ENV, "MAAS_BROKER_URL": url})


def test_sentinel_tls_needs_a_sentinel_url_and_enables_the_tls_options() -> None:
    with pytest.raises(ConfigError, match="no URL is sentinel"):
        Settings.from_env({"MAAS_REDIS_SENTINEL_TLS": "1"})
    s = Settings.from_env({**ENV, "MAAS_REDIS_SENTINEL_TLS": "1", "MAAS_REDIS_TLS_VERIFY": "none"})
    assert s.redis_ssl(s.broker_url) == s.redis_tls.options()
    hosts, sentinel_kwargs, primary = sentinel_options(URL, tls=s.redis_tls, ha=s.redis_ha)
    assert hosts[1] == ("10.0.0.2", 26380)
    assert sentinel_kwargs["ssl"] is True and primary["ssl"] is True
    assert primary["password"] == "pw" and primary["db"] == 2


def test_the_producer_transport_follows_the_scheme_with_the_master_name() -> None:
    s = Settings.from_env({**ENV, "MAAS_REDIS_SENTINEL_PASSWORD": "spw"})
    assert producer_transport(s.broker_url) == SENTINEL_TRANSPORT
    assert producer_transport("redis://h/0") == TRANSPORT
    options = transport_options(s)
    assert options["master_name"] == "maas"
    assert options["sentinel_kwargs"]["password"] == "spw"
    assert make_producer_app(s).conf.broker_transport == SENTINEL_TRANSPORT
    assert "spw" not in repr(s) and "pw@" not in repr(s)


def test_wait_settings() -> None:
    assert RedisHA().wait_command() is None
    s = Settings.from_env({"MAAS_REDIS_WAIT_REPLICAS": "2", "MAAS_REDIS_WAIT_TIMEOUT_MS": "250"})
    assert s.redis_ha.wait_command() == ("WAIT", 2, 250)
    with pytest.raises(ConfigError, match="MAAS_REDIS_WAIT_REPLICAS"):
        Settings.from_env({"MAAS_REDIS_WAIT_REPLICAS": "-1"})


def test_sentinel_urls_are_redacted_and_rewritten_per_part() -> None:
    assert redact_url(URL) == URL.replace("app:pw@", "app:***@")
    assert "pw" not in redact_url(URL).replace("app", "")
    bare = acl.server_url(URL)
    assert bare == "sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26380/2;sentinel://10.0.0.3/2"
    assert acl.database(URL) == 2
    assert acl.role_url(bare, "worker", "s") == bare.replace("sentinel://", "sentinel://worker:s@")
