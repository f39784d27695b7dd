"""The producer side: seal and submit jobs (``Client``), wait for and open results (``Job``);
``AsyncClient``, ``AsyncJob`` and ``as_completed`` for asyncio code."""

from __future__ import annotations

from maas_worker import _moved
from maas_worker.client.aio import AsyncClient, AsyncJob, as_completed
from maas_worker.client.client import Client
from maas_worker.client.job import Job

__all__ = ["AsyncClient", "AsyncJob", "Client", "Job", "as_completed"]

# Before 0.2 ``maas_worker.client`` was one module; its other names are in ``client.client``.
__getattr__ = _moved.forwarder("maas_worker.client", "maas_worker.client.client")
