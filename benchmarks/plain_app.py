"""Plain Celery baseline for the benchmarks: the same echo job with no security.

Same broker, same worker settings as maas-worker (JSON only, late ack,
prefetch 1, no STARTED state), results through Celery's own Redis backend.
Started as ``celery -A benchmarks.plain_app worker``; configured from
``BENCH_BROKER_URL``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

app = Celery("plain")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,
    # 1 as maas-worker's pool; benchmarks/throughput.py raises it (BENCH_PREFETCH) for
    # plain Celery's best rate.
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "1")),
    task_track_started=False,
    task_default_queue="plain",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    # The same event settings as maas-worker (Flower sees queued jobs), so the
    # baseline pays for the same task-sent/received/succeeded events.
    worker_send_task_events=True,
    task_send_sent_event=True,
)


@app.task(name="plain.echo")
def echo(inputs: Any) -> dict[str, Any]:
    """Return the input, like maas-worker's `echo` model."""
    return {"echo": inputs}
