"""The HTTP surface: Starlette routes around `Gateway` (service.py).

Every route under ``/v1`` checks the bearer token first, before a byte of the
body is read, so a flood of requests without a valid token costs one SHA-256
and a comparison each. Bodies are read as they stream in, against a size cap
(``413`` as soon as it is passed, not after the whole body) and a deadline
(``408``): a slow or endless body holds a connection for a bounded time.
"""

from __future__ import annotations

import asyncio
import binascii
import gc
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from maas_worker.gateway import metrics as metrics_mod
from maas_worker.gateway.openapi import document
from maas_worker.gateway.service import (
    UNAVAILABLE_RETRY_S,
    Gateway,
    Reply,
    accepted_item,
    error,
)
from maas_worker.settings import Settings

#: ``Content-Type`` of one envelope (``POST /v1/jobs``).
ENVELOPE_TYPE = "application/octet-stream"
#: ``Content-Type`` of a batch (``POST /v1/jobs:batch``).
BATCH_TYPE = "application/json"


class _Refused(Exception):
    """A request refused before the service sees it (size, time, type, credential)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body.get("message", ""))
        self.reply = reply


def _respond(reply: Reply) -> Response:
    headers = dict(reply.headers)
    if reply.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(reply.retry_after_s)))
    if reply.status in (408, 413):
        # The rest of the body is not read: the connection cannot carry another request.
        headers["Connection"] = "close"
    if reply.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="maas-worker"'
    return JSONResponse(reply.body, status_code=reply.status, headers=headers)


def _bearer(gateway: Gateway, request: Request) -> str:
    """The tenant the request's bearer token proves, or `_Refused` (401)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    tenant = gateway.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        gateway.metrics.refused("bad_bearer")
        raise _Refused(
            error(401, "unauthorized", "missing or invalid bearer token (docs/gateway.md)")
        )
    return tenant


def _content_type(request: Request, expected: str) -> None:
    given = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if given != expected:
        raise _Refused(
            error(415, "unsupported_media_type", f"send the body as Content-Type: {expected}")
        )


async def _body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The body, read as it streams: `_Refused` 413 past ``cap`` bytes, 408 past the deadline."""
    too_big = error(413, "too_large", f"the body is larger than {cap} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _Refused(too_big)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _Refused(too_big)
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(
            error(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s")
        ) from None
    return b"".join(chunks)


Handler = Callable[[Gateway, Request], Awaitable[Response]]


def _route(path: str, method: str, handler: Handler, name: str) -> Route:
    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        started = time.perf_counter()
        try:
            response = await handler(gateway, request)
        except _Refused as refused:
            response = _respond(refused.reply)
        gateway.metrics.request(method, name, response.status_code, time.perf_counter() - started)
        return response

    return Route(path, endpoint, methods=[method], name=name)


async def submit(gateway: Gateway, request: Request) -> Response:
    """``POST /v1/jobs``: one sealed envelope, raw bytes."""
    tenant = _bearer(gateway, request)
    _content_type(request, ENVELOPE_TYPE)
    s = gateway.settings.gateway
    raw = await _body(request, gateway.max_envelope_bytes, s.body_timeout_s)
    (reply,) = await gateway.submit(tenant, [raw])
    return _respond(reply)


async def submit_batch(gateway: Gateway, request: Request) -> Response:
    """``POST /v1/jobs:batch``: ``{"envelopes": [base64, ...]}``; one status per item."""
    tenant = _bearer(gateway, request)
    _content_type(request, BATCH_TYPE)
    s = gateway.settings.gateway
    raw = await _body(request, s.max_batch_bytes, s.body_timeout_s)
    try:
        doc = json.loads(raw)
        items = doc["envelopes"]
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise TypeError
        # Strict (an alphabet and padding check in C): what b64decode(validate=True)
        # accepts, without its regular expression over each envelope.
        envelopes = [binascii.a2b_base64(i, strict_mode=True) for i in items]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return _respond(
            error(400, "malformed", 'the body must be {"envelopes": [<base64 envelope>, ...]}')
        )
    if not 1 <= len(envelopes) <= s.max_batch:
        return _respond(
            error(
                413,
                "too_many",
                f"a batch holds 1 to {s.max_batch} envelopes (MAAS_GATEWAY_MAX_BATCH)",
            )
        )
    items = [
        _item(r) if isinstance(r, Reply) else accepted_item(r)
        for r in await gateway.submit_items(tenant, envelopes)
    ]
    # Laid out by hand (an item a job: compact JSON, as JSONResponse writes it).
    return Response('{"items":[' + ",".join(items) + "]}", status_code=200, media_type=BATCH_TYPE)


def _item(reply: Reply) -> str:
    """A batch answer's item for an envelope not queued by this request (compact JSON)."""
    extra = {"retry_after": reply.retry_after_s} if reply.retry_after_s else {}
    return json.dumps(
        {"status": reply.status, **reply.body, **extra},
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    )


async def status(gateway: Gateway, request: Request) -> Response:
    """``GET /v1/jobs/{job_id}[?wait=S]``."""
    tenant = _bearer(gateway, request)
    wait_text = request.query_params.get("wait", "0")
    try:
        wait_s = float(wait_text)
        if not 0 <= wait_s <= 3600:
            raise ValueError
    except ValueError:
        return _respond(error(400, "bad_wait", "wait is a number of seconds, 0 to 3600"))
    return _respond(await gateway.status(tenant, request.path_params["job_id"], wait_s))


async def cancel(gateway: Gateway, request: Request) -> Response:
    """``DELETE /v1/jobs/{job_id}``."""
    tenant = _bearer(gateway, request)
    return _respond(await gateway.cancel(tenant, request.path_params["job_id"]))


async def healthz(gateway: Gateway, request: Request) -> Response:
    """``GET /healthz``: 200 while Redis answers, else 503."""
    if await gateway.healthy():
        return JSONResponse({"ok": True})
    return _respond(error(503, "unavailable", "Redis does not answer", UNAVAILABLE_RETRY_S))


async def metrics(gateway: Gateway, request: Request) -> Response:
    """``GET /metrics``: Prometheus text."""
    return PlainTextResponse(gateway.metrics.render(), media_type=metrics_mod.CONTENT_TYPE)


async def openapi(gateway: Gateway, request: Request) -> Response:
    """``GET /openapi.json``: the API's OpenAPI 3.1 document (docs/gateway-openapi.json)."""
    return JSONResponse(document())


def create_app(settings: Settings, gateway: Gateway | None = None) -> Starlette:
    """The ASGI application; the `Gateway` is made at startup (or given, for tests)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gw = gateway or Gateway(settings)
        app.state.gateway = gw
        # Everything made so far lives as long as the process: out of the cyclic
        # collector's way, so its full passes over a busy gateway's heap cost
        # less (what a batch allocates per envelope triggers them often).
        gc.freeze()
        try:
            yield
        finally:
            await gw.aclose()

    routes = [
        _route("/v1/jobs", "POST", submit, "submit"),
        _route("/v1/jobs:batch", "POST", submit_batch, "submit_batch"),
        _route("/v1/jobs/{job_id}", "GET", status, "status"),
        _route("/v1/jobs/{job_id}", "DELETE", cancel, "cancel"),
        _route("/healthz", "GET", healthz, "healthz"),
        _route("/metrics", "GET", metrics, "metrics"),
        _route("/openapi.json", "GET", openapi, "openapi"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def run(settings: Settings, *, log_level: str = "info") -> None:
    """Serve until stopped (SIGINT/SIGTERM), over TLS when a certificate is configured."""
    import uvicorn

    g = settings.gateway
    uvicorn.run(
        create_app(settings),
        host=g.address,
        port=g.port,
        ssl_certfile=str(g.tls_cert) if g.tls_cert else None,
        ssl_keyfile=str(g.tls_key) if g.tls_key else None,
        log_level=log_level,
        # Behind a load balancer the client address is in X-Forwarded-For; the
        # gateway uses it only in its access log.
        proxy_headers=True,
        server_header=False,
    )
