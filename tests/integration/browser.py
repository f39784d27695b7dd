"""A headless Chromium driven over the Chrome DevTools protocol (no extra packages).

Debian's ``chromium`` is started with a fresh profile and a DevTools port;
the page is driven through its websocket with tornado's client (already a
dependency of Flower). Only what the Flower test needs: basic-auth login,
navigation, reading the page's text, a click, a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)
START_TIMEOUT_S = 30.0
#: Viewport (width, height) until `Page.viewport` sets another.
DEFAULT_VIEWPORT = (1600, 900)


def chromium_path() -> str | None:
    """Debian's chromium (or another Chromium/Chrome on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One browser tab, spoken to over CDP."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._auth: tuple[str, str] | None = None
        self._events: set[asyncio.Future[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._size = DEFAULT_VIEWPORT
        self._reader = asyncio.ensure_future(self._read())

    async def call(self, method: str, **params: Any) -> Any:
        """Send a command and wait for its result."""
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.write_message(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 30)

    async def _read(self) -> None:
        while True:
            raw = await self._ws.read_message()
            if raw is None:
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("DevTools connection closed"))
                return
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(msg["error"]))
                    else:
                        fut.set_result(msg.get("result"))
            else:
                for fut in self._waiters.pop(msg["method"], []):
                    if not fut.done():
                        fut.set_result(None)
                task = asyncio.ensure_future(self._on_event(msg["method"], msg.get("params", {})))
                self._events.add(task)  # keep a reference until it is done
                task.add_done_callback(self._events.discard)

    async def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Fetch.requestPaused":
            await self.call("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Fetch.authRequired":
            if self._auth is None:
                response = {"response": "CancelAuth"}
            else:
                response = {
                    "response": "ProvideCredentials",
                    "username": self._auth[0],
                    "password": self._auth[1],
                }
            await self.call(
                "Fetch.continueWithAuth",
                requestId=params["requestId"],
                authChallengeResponse=response,
            )

    async def login_with_basic_auth(self, user: str, password: str) -> None:
        """Answer every HTTP authentication challenge with these credentials."""
        self._auth = (user, password)
        await self.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])

    async def goto(self, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Navigate and wait for the new page's load event (its scripts have run)."""
        await self.call("Page.enable")
        loaded = self._next_event("Page.loadEventFired")
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout_s)

    def _next_event(self, method: str) -> asyncio.Future[None]:
        """A future set by the next ``method`` event (ask before causing the event)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(method, []).append(fut)
        return fut

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    async def text(self) -> str:
        """The page's visible text."""
        return str(await self.evaluate("document.body ? document.body.innerText : ''") or "")

    async def click(self, selector: str) -> None:
        """Click the element ``selector`` finds (fails if there is none)."""
        found = await self.evaluate(
            f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))"
        )
        if not found:
            raise AssertionError(f"nothing on the page matches {selector!r}")

    async def wait_until(self, expression: str, timeout_s: float = 10.0) -> None:
        """Poll a JavaScript expression until it is true (fail after the timeout)."""
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"never true in the page: {expression}")
            await asyncio.sleep(0.05)

    async def wait_for_text(
        self, *needles: str, timeout_s: float = 60.0, reload_s: float | None = None
    ) -> str:
        """Poll the page text until it contains every needle (fail after timeout).

        With ``reload_s``, reload the page that often while waiting.
        """
        deadline = time.monotonic() + timeout_s
        reload_at = time.monotonic() + (reload_s or timeout_s)
        text = ""
        while time.monotonic() < deadline:
            text = await self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() >= reload_at:
                await self.call("Page.reload")
                reload_at = time.monotonic() + (reload_s or timeout_s)
            await asyncio.sleep(0.25)
        raise AssertionError(f"page never showed {needles!r}; it showed:\n{text[:2000]}")

    async def viewport(self, width: int, height: int) -> None:
        """Size the viewport (CSS pixels, scale 1); set it before the page lays out."""
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self._size = (width, height)

    async def screenshot(self, path: Path, *, full_page: bool = False) -> None:
        """Save a PNG of the viewport, or with ``full_page`` of the whole page's height."""
        width, height = self._size
        if full_page:
            content = int(await self.evaluate("document.documentElement.scrollHeight"))
            await self.viewport(width, max(height, content))
        try:
            res = await self.call("Page.captureScreenshot", format="png")
        finally:
            if full_page:
                await self.viewport(width, height)
        path.write_bytes(base64.b64decode(res["data"]))

    def close(self) -> None:
        self._reader.cancel()
        self._ws.close()


@contextlib.asynccontextmanager
async def chromium(executable: str) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile; yields its first tab."""
    profile = Path(tempfile.mkdtemp(prefix="maas-chromium-"))
    proc = subprocess.Popen(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    page: Page | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        page = Page(await websocket_connect(url, max_message_size=64 * 1024 * 1024))
        yield page
    finally:
        if page is not None:
            page.close()
        # Its own session: the renderer and GPU helpers go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
