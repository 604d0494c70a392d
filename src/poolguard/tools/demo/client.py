"""The in-process client: one GET through ASGI, measured from its intended send time.

It behaves like an HTTP server towards the application: it sends the request body, reports
``http.disconnect`` when its user gives up, and never cancels the application itself
(servers do not), so abandoned ``def`` handlers keep their thread and connection exactly as
they would behind uvicorn. No httpx and no socket: the demo runs on the core installation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ERROR", "GAVE_UP", "ASGIApp", "DemoRequest", "send_request"]

#: Outcomes other than a status code.
GAVE_UP = "gave up"
ERROR = "error"

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


@dataclass
class DemoRequest:
    """One request as its client saw it."""

    kind: str
    intended: float
    outcome: str = ""  # the status code as text, GAVE_UP or ERROR
    latency: float = math.nan
    task: asyncio.Future[None] | None = None


async def send_request(app: ASGIApp, path: str, ex: DemoRequest, patience: float) -> None:
    """GET ``path`` through ASGI and wait at most until ``ex.intended + patience``.

    Like an HTTP server, this sends the (empty) body, then reports ``http.disconnect`` once
    the client gives up or the response is complete; it never cancels the application.
    """
    loop = asyncio.get_running_loop()
    disconnected = asyncio.Event()
    answered = loop.create_future()
    status: list[int] = []
    body_sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if not answered.done():
                answered.set_result(None)
            disconnected.set()

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"demo.local")],
        "client": ("127.0.0.1", 50000),
        "server": ("demo.local", 80),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    ex.task = task
    left = ex.intended + patience - time.monotonic()
    done, _ = await asyncio.wait((answered, task), timeout=max(0.0, left))
    now = time.monotonic()
    if answered.done() and status:
        ex.outcome = str(status[0])
    elif task.done():
        # The application raised without answering (Starlette answers 500 and re-raises).
        ex.outcome = str(status[0]) if status else ERROR
        if not task.cancelled():
            task.exception()  # retrieved: the outcome says it all
    else:
        ex.outcome = GAVE_UP
        disconnected.set()
        now = max(now, ex.intended + patience)
    ex.latency = now - ex.intended
    if not done:
        answered.cancel()
