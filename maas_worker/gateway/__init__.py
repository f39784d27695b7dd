"""The HTTP gateway: submit sealed jobs and read sealed results from any language.

``maas-worker gateway`` (docs/gateway.md) serves `create_app` with uvicorn.
A plane of its own, above the client it drives (one `AsyncClient` per tenant,
lanes.py) and below the CLI; it imports nothing of the worker or monitoring
planes. It holds MAC keys only (tenancy/gatekeys.py): it authenticates
envelopes and cannot open them.
"""

from maas_worker.gateway.http import create_app, run
from maas_worker.gateway.service import Gateway, Reply

__all__ = ["Gateway", "Reply", "create_app", "run"]
