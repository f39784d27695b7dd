"""The gateway's few Prometheus counters, written as text (no prometheus-client dependency).

One process, one event loop: plain dictionaries, no locks. The text format
is Prometheus' exposition format 0.0.4.
"""

from __future__ import annotations

from collections import Counter

#: ``Content-Type`` of `Metrics.render`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters of requests, enqueued jobs and refusals, and request time."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, str, int]] = Counter()
        self._refusals: Counter[str] = Counter()
        self._enqueued = 0
        self._seconds = 0.0
        self._count = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self._requests[(method, route, status)] += 1
        self._seconds += seconds
        self._count += 1

    def refused(self, reason: str) -> None:
        """Count one refused envelope (its audit reason)."""
        self._refusals[reason] += 1

    def enqueued(self, n: int) -> None:
        """Count ``n`` jobs put on a queue."""
        self._enqueued += n

    def render(self) -> str:
        """The exposition text."""
        lines = [
            "# HELP maas_gateway_requests_total HTTP requests answered (method, route, status).",
            "# TYPE maas_gateway_requests_total counter",
        ]
        for (method, route, status), n in sorted(self._requests.items()):
            lines.append(
                f'maas_gateway_requests_total{{method="{method}",route="{route}",'
                f'status="{status}"}} {n}'
            )
        lines += [
            "# HELP maas_gateway_refusals_total Envelopes refused, by audit reason.",
            "# TYPE maas_gateway_refusals_total counter",
        ]
        for reason, n in sorted(self._refusals.items()):
            lines.append(f'maas_gateway_refusals_total{{reason="{reason}"}} {n}')
        lines += [
            "# HELP maas_gateway_jobs_enqueued_total Jobs put on a queue.",
            "# TYPE maas_gateway_jobs_enqueued_total counter",
            f"maas_gateway_jobs_enqueued_total {self._enqueued}",
            "# HELP maas_gateway_request_seconds Time spent answering requests.",
            "# TYPE maas_gateway_request_seconds summary",
            f"maas_gateway_request_seconds_sum {self._seconds:.6f}",
            f"maas_gateway_request_seconds_count {self._count}",
        ]
        return "\n".join(lines) + "\n"
