"""Resource samples (taking, summarising, storing with expiry) and the backlog reader."""

from __future__ import annotations

import base64
import json
import os

import fakeredis
import pytest

from maas_worker.backend import keyspace
from maas_worker.broker.backlog import _unverified_issued_at_ms, read_backlog
from maas_worker.monitoring.samples import (
    SAMPLE_TTL_INTERVALS,
    STATS_KEY,
    SampleStore,
    celery_options,
    gpu_sample,
    sample_ttl_s,
    stats_fields,
    summarize,
    take_sample,
)
from maas_worker.settings import Settings

#: A request envelope from docs/envelope.md's known-answer vectors (issued at IAT).
ENVELOPE_B64 = (
    "AQEAOQAAAAEAAAGLz+VoAAAAAYvP6fvgAARhY21lCGpvYi0wMDAxCm1hYXMuaW5m"
    "ZXIGZWNob0AxAAECAwQFBgcICQoL4ojtqPxUhQf6PJUwb/DruGPCGBeDL34HnCvp"
    "i5dHOX7pN2X0gXFNN+ktuH9QXN0xlCL482bEgwKjecp+qA=="
)
IAT_MS = 1_700_000_000_000


def kombu_message(envelope_b64: str, *, argsrepr: str = "('<sealed envelope>',)") -> bytes:
    """A message as kombu's Redis transport stores it (virtual Channel.prepare_message)."""
    body = json.dumps(
        [[envelope_b64], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": "maas.infer",
                "id": "job-0001",
                "argsrepr": argsrepr,
                "kwargsrepr": "{}",
            },
            "properties": {
                "delivery_tag": "t",
                "body_encoding": "base64",
                "delivery_info": {"exchange": "maas", "routing_key": "maas.normal"},
            },
        }
    ).encode()


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


# -- backlog -------------------------------------------------------------------------------------
def test_issued_at_is_read_from_a_message_prefix() -> None:
    msg = kombu_message(ENVELOPE_B64)
    assert _unverified_issued_at_ms(msg) == IAT_MS
    assert _unverified_issued_at_ms(msg[:512]) == IAT_MS  # what read_backlog fetches


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b"not json", kombu_message("Zm9yZ2Vk"), kombu_message("!!!"), b'{"body": "////"}'],
)
def test_anything_else_has_no_age(raw: bytes) -> None:
    assert _unverified_issued_at_ms(raw) is None


def test_read_backlog_counts_and_ages(r: fakeredis.FakeRedis) -> None:
    now = IAT_MS / 1000 + 42.5
    r.lpush("maas.normal", kombu_message(ENVELOPE_B64))  # the oldest (tail)
    r.lpush("maas.normal", kombu_message("Zm9yZ2Vk"))
    r.lpush("maas.low", kombu_message("Zm9yZ2Vk"))
    backlog = read_backlog(r, now=now)
    assert dict(backlog.depth) == {"high": 0, "normal": 2, "low": 1}
    assert backlog.oldest_age_s["normal"] == pytest.approx(42.5)
    assert backlog.oldest_age_s["high"] is None
    assert backlog.oldest_age_s["low"] is None
    assert backlog.total == 3
    assert backlog.oldest_s == pytest.approx(42.5)


def test_a_clock_ahead_is_zero_age_and_junk_far_ahead_is_none(r: fakeredis.FakeRedis) -> None:
    r.lpush("maas.high", kombu_message(ENVELOPE_B64))
    assert read_backlog(r, now=IAT_MS / 1000 - 5).oldest_age_s["high"] == 0.0
    assert read_backlog(r, now=IAT_MS / 1000 - 3600).oldest_age_s["high"] is None


# -- samples -------------------------------------------------------------------------------------
def test_sample_has_every_documented_section() -> None:
    s = take_sample("w1@host", main_pid=os.getpid(), interval_s=15, jobs=(3, 1.5))
    assert s["node"] == "w1@host"
    assert s["cpu"]["cores"] == len(s["cpu"]["per_core"]) >= 1
    assert 0 <= s["cpu"]["percent"] <= 100
    assert s["memory"]["total_bytes"] > 0
    assert 0 <= s["memory"]["used_percent"] <= 100
    assert set(s["swap"]) == {"total_bytes", "used_bytes", "used_percent"}
    assert len(s["load"]) == 3
    assert s["net"]["bytes_recv"] >= 0
    assert s["disk"] is None or s["disk"]["read_bytes"] >= 0
    pool = s["pool"]
    assert pool["processes"] == len(pool["rss_bytes"]) == len(pool["open_fds"])
    assert pool["main_rss_bytes"] > 0
    assert s["jobs"] == {"finished": 3, "busy_s": 1.5}
    json.dumps(s)  # JSON-ready


def test_without_nvml_there_is_no_gpu_section() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert gpu_sample() is None
        assert "gpu" not in take_sample("n", main_pid=os.getpid(), interval_s=1)
    else:  # pragma: no cover - a machine with the gpu extra
        pytest.skip("nvidia-ml-py is installed here")


def test_summary_is_short_readable_text() -> None:
    s = take_sample("w1@host", main_pid=os.getpid(), interval_s=15, jobs=(3, 1.5))
    s["cpu"]["per_core"] = [float(i) for i in range(64)]
    s["gpu"] = [
        {
            "index": 0,
            "utilization_percent": 55.0,
            "memory_used_bytes": 2**30,
            "memory_total_bytes": 2**34,
        }
    ]
    text = summarize(s)
    assert all(isinstance(v, str) for v in text.values())
    assert len(repr(text)) < 1024  # Flower's result column truncates at 1024
    assert text["node"] == "w1@host"
    assert text["gpu"] == "#0 55% 1024 MiB/16384 MiB"
    assert "..." in text["cpu"]


def test_summary_counts_processes_in_words_and_shows_throughput() -> None:
    s = take_sample("w1@host", main_pid=os.getpid(), interval_s=15, jobs=(3, 1.5))
    s["pool"] = {
        "processes": 1,
        "rss_bytes": [60 * 2**20],
        "open_fds": [14],
        "main_rss_bytes": 75 * 2**20,
    }
    s["memory"] = {"total_bytes": 2**33, "available_bytes": 2**32, "used_percent": 50.0}
    s["swap"] = {"total_bytes": 2**30, "used_bytes": 2**28, "used_percent": 25.0}
    s["jobs"].update(per_s=0.5, busy_fraction=0.25)
    text = summarize(s)
    assert text["pool"] == "1 process, RSS 60 MiB, open fds 14; main process RSS 75 MiB"
    assert text["memory"] == "50.0% used, 4096 MiB available of 8192 MiB"
    assert text["swap"] == "25.0% used of 1024 MiB"
    assert text["jobs"] == "3 finished, 0.50/s, pool 25% busy"
    s["pool"] = {"processes": 2, "rss_bytes": [2**20, 2**21], "open_fds": [1, 2]}
    s["swap"] = {"total_bytes": 0, "used_bytes": 0, "used_percent": 0.0}  # no swap at all
    s["jobs"].update(per_s=None, busy_fraction=None)  # the first sample after a start
    text = summarize(s)
    assert text["pool"] == "2 processes, RSS 1 MiB + 2 MiB, open fds 3"
    assert text["swap"] == "none"
    assert text["jobs"] == "3 finished"


def test_stats_fields_are_readable_rows_then_the_whole_document() -> None:
    s = take_sample("w1@host", main_pid=os.getpid(), interval_s=15, jobs=(3, 1.5))
    s["at"] = 1_800_000_000.0
    fields = stats_fields(s, now=s["at"] + 2.5, interval_s=15)
    # the rows come first (Flower lists them in this order), the document last
    assert list(fields) == [
        "sample taken",
        "sample cpu",
        "sample memory",
        "sample swap",
        "sample load",
        "sample pool",
        "sample gpu",
        "sample jobs",
        STATS_KEY,
    ]
    rows = {k: v for k, v in fields.items() if k != STATS_KEY}
    assert all(isinstance(v, str) for v in rows.values())
    assert fields["sample taken"] == (
        "2027-01-15 08:00:00 UTC, 2.5 s before this reply (one every 15 s)"
    )
    assert fields["sample cpu"].startswith(f"{s['cpu']['percent']}% (per core: ")
    assert fields[STATS_KEY] == s
    assert json.loads(json.dumps(fields)) == fields  # a remote-control reply is JSON


def test_stats_fields_without_a_current_sample_say_why() -> None:
    fields = stats_fields(None, now=1000.0, interval_s=15)
    assert fields == {
        "sample taken": "none in the last 45 s (beat asks for one every 15 s: is it running?)",
        STATS_KEY: None,
    }


# -- storage -------------------------------------------------------------------------------------
def sample_at(node: str, at: float, finished: float = 0, busy: float = 0) -> dict[str, object]:
    return {
        "v": 1,
        "node": node,
        "at": at,
        "pool": {"processes": 2},
        "jobs": {"finished": finished, "busy_s": busy},
    }


def test_store_keeps_only_current_samples(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=10)
    assert store.ttl_s == SAMPLE_TTL_INTERVALS * 10
    store.record(sample_at("a", 1000.0))
    store.record(sample_at("b", 1025.0))
    assert set(store.latest(now=1026.0)) == {"a", "b"}
    assert set(store.latest(now=1031.0)) == {"b"}  # a is older than 3 intervals
    assert 0 < r.ttl(keyspace.sample("b")) <= 30


def test_store_is_bounded_by_live_nodes(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=1)
    for i in range(100):
        store.record(sample_at(f"n{i}", 1000.0 + i))
    # the index is pruned on every write: only nodes sampled within the TTL stay
    assert r.zcard(keyspace.SAMPLES) <= SAMPLE_TTL_INTERVALS + 1


def test_rates_since_the_previous_sample(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=10)
    first = store.record(sample_at("a", 1000.0, finished=10, busy=2))
    assert first["jobs"]["per_s"] is None
    second = store.record(sample_at("a", 1010.0, finished=30, busy=12))
    assert second["jobs"]["per_s"] == 2.0
    assert second["jobs"]["busy_fraction"] == 0.5  # 10 s busy over 10 s x 2 processes
    restarted = store.record(sample_at("a", 1020.0, finished=1, busy=0.1))
    assert restarted["jobs"]["per_s"] is None  # counters went back: a restart


def test_forget_removes_at_once(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=10)
    store.record(sample_at("a", 1000.0))
    store.forget("a")
    assert store.latest(now=1000.0) == {}
    assert r.zcard(keyspace.SAMPLES) == 0


def test_get_gives_one_nodes_current_sample(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=10)
    store.record(sample_at("a", 1000.0))
    assert store.get("a", now=1001.0) == store.latest(now=1001.0)["a"]
    assert store.get("a", now=1031.0) is None  # older than 3 intervals
    assert store.get("b", now=1001.0) is None


def test_junk_in_redis_is_ignored(r: fakeredis.FakeRedis) -> None:
    store = SampleStore(r, interval_s=10)
    r.zadd(keyspace.SAMPLES, {"x": 1000.0, "y": 1000.0})
    r.set(keyspace.sample("x"), b"not json")
    r.set(keyspace.sample("y"), json.dumps({"v": 99, "at": 1000.0}))
    assert store.latest(now=1001.0) == {}


def test_ttl_is_a_few_intervals_and_at_least_a_second() -> None:
    assert sample_ttl_s(15) == 45
    assert sample_ttl_s(0.2) == 1


# -- Celery wiring -------------------------------------------------------------------------------
def test_celery_options_enable_events_and_schedule_the_sample() -> None:
    opts = celery_options(Settings.from_env({"MAAS_SAMPLE_INTERVAL_S": "5"}))
    assert opts["worker_send_task_events"]
    entry = opts["beat_schedule"]["maas-sample"]
    assert entry["task"] == "maas.sample"
    assert entry["schedule"] == 5.0
    assert entry["options"]["expires"] == 5.0
    assert entry["options"]["exchange"] == "maas.monitor"
    assert opts["worker_autoscaler"] == "maas_worker.monitoring.autoscale:BacklogAutoscaler"
    # beat's sample request sends no task-sent event (jobs' is the producers' app's)
    assert opts["task_send_sent_event"] is False


def test_the_sample_task_sends_no_task_events_and_returns_nothing() -> None:
    # No row in Flower's task list, nothing in its Processed/Succeeded counts.
    from maas_worker.monitoring.tasks import sample

    assert sample.send_events is False
    assert sample.ignore_result is True
    assert sample.__annotations__["return"] in (None, "None")


def test_beat_asks_for_the_first_sample_as_it_starts_then_each_interval() -> None:
    from celery import Celery
    from celery.beat import ScheduleEntry

    app = Celery("t")
    entry = celery_options(Settings.from_env({"MAAS_SAMPLE_INTERVAL_S": "5"}))["beat_schedule"]
    first = ScheduleEntry(**dict(entry["maas-sample"], name="maas-sample", app=app))
    assert first.is_due() == (True, 5.0)  # due now, not one interval after beat starts
    assert next(first).is_due()[0] is False  # then every interval


def test_the_app_is_json_only_and_consumes_the_broadcast_queue() -> None:
    from maas_worker.app import celery_config

    conf = celery_config(Settings.from_env({}))
    assert conf["accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["event_serializer"] == "json"
    monitor = [q for q in conf["task_queues"] if q.name == "maas.monitor"]
    assert monitor and monitor[0].exchange.type == "fanout"
