"""The monitoring plane: resource samples, Prometheus metrics and exporter, fleet, autoscaling.

Nothing here is imported by producers (``maas_worker.client``): psutil and prometheus-client
are worker extras.
"""

from __future__ import annotations

from maas_worker import _moved

# Before 0.2 ``maas_worker.monitoring`` was the module now at ``monitoring.samples``;
# forwarded lazily, so importing the package loads no psutil.
__getattr__ = _moved.forwarder("maas_worker.monitoring", "maas_worker.monitoring.samples")
