"""Watching for a client that goes away, while the handler runs.

A server reports a disconnect only through ``receive``, which the handler reads only while
it wants the body; so a watcher task reads it throughout and feeds the handler from a
bounded buffer, and cancels the handler when the client is gone. Kept apart from the
middleware because it is the one part that depends on how each event loop cancels.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from starlette.types import Message, Receive

__all__ = [
    "MAX_READ_AHEAD",
    "Receiver",
    "ResponseProgress",
    "on_asyncio",
    "run_cancel_once",
    "run_in_cancel_scope",
]

#: Request body bytes read ahead of the handler. The disconnect watcher has to keep reading
#: the server's ``receive`` to see ``http.disconnect``; beyond this it waits for the handler
#: to consume the body, so an upload is never buffered whole in memory.
MAX_READ_AHEAD = 64 * 1024


@dataclass
class ResponseProgress:
    """What has happened to one response so far."""

    started: bool = False
    complete: bool = False
    abandoned: bool = False


class Receiver:
    """Reads the server's ``receive`` in a watcher task and feeds the app from a buffer.

    The watcher has to keep reading to notice ``http.disconnect`` while the handler is busy
    elsewhere; buffering what it reads means the handler still gets every body chunk, in
    order. Read-ahead stops at :data:`MAX_READ_AHEAD` bytes until the handler catches up.
    """

    __slots__ = (
        "_arrived",
        "_buffer",
        "_buffered",
        "_direct",
        "_drained",
        "_error",
        "_receive",
        "disconnected",
    )

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer: deque[Message] = deque()
        self._buffered = 0
        self._arrived: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        self._error: Exception | None = None
        self._direct = False
        self.disconnected = False

    async def pump(self) -> None:
        """Read until the client disconnects (or the server's receive fails).

        Once the body is complete a server has nothing more to say but ``http.disconnect``,
        and its ``receive`` blocks until then. One that answers at once with anything else
        cannot be watched (reading it would spin): the watcher stops and the handler reads
        the server directly from then on.
        """
        body_done = False
        try:
            while not self.disconnected:
                while self._buffered >= MAX_READ_AHEAD:
                    self._drained = anyio.Event()
                    await self._drained.wait()
                message = await self._receive()
                kind = message["type"]
                if kind == "http.disconnect":
                    self.disconnected = True
                elif body_done:
                    self._buffer.append(message)
                    self._direct = True
                    return
                else:
                    if kind == "http.request":
                        self._buffered += len(message.get("body", b""))
                        body_done = not message.get("more_body", False)
                    self._buffer.append(message)
                self._wake()
        except Exception as exc:  # a broken server: the handler sees it at its next receive
            self._error = exc
        finally:
            self._wake()

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    async def receive(self) -> Message:
        while not self._buffer:
            if self.disconnected:
                return {"type": "http.disconnect"}
            if self._direct:
                return await self._receive()
            if self._error is not None:
                raise self._error
            if self._arrived is None:
                self._arrived = anyio.Event()
            await self._arrived.wait()
        message = self._buffer.popleft()
        if message["type"] == "http.request":
            self._buffered -= len(message.get("body", b""))
            if self._drained is not None and self._buffered < MAX_READ_AHEAD:
                self._drained.set()
                self._drained = None
        return message


# -- running the handler ----------------------------------------------------------------------
# Why two ways: asyncpg, cancelled, sends the server a CancelRequest from a task of its own,
# and SQLAlchemy then returns or closes the connection, which needs a few awaits. asyncio
# cancels once, so those awaits run and the server stops the statement. An anyio cancel scope
# cancels again at every await until the scope exits: SQLAlchemy falls back to terminating the
# connection, which kills asyncpg's pending CancelRequest, and the statement keeps running on
# the server (measured: pg_sleep(3) still active 1.6 s after the cancel). So on asyncio the
# handler gets a task of its own and a single cancel; elsewhere (trio) a cancel scope.
def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _watch(
    receiver: Receiver, progress: ResponseProgress, cancel: Callable[[], object]
) -> None:
    await receiver.pump()
    # After the response is complete servers report http.disconnect at once (uvicorn does):
    # background tasks that run then must not be cancelled.
    if receiver.disconnected and not progress.complete:
        progress.abandoned = True
        cancel()


async def run_cancel_once(
    app: Awaitable[None], receiver: Receiver, progress: ResponseProgress
) -> Exception | None:
    """Run ``app`` in its own task (it inherits the budget scope); return what it raised."""
    task = asyncio.ensure_future(app)
    watcher = asyncio.ensure_future(_watch(receiver, progress, task.cancel))
    try:
        await asyncio.wait((task,))
    except BaseException:
        # Cancelled from outside (server shutdown, an enclosing time-out): the handler
        # winds down first, so the budget scope and the in-flight slot outlive it.
        task.cancel()
        await asyncio.wait((task,))
        raise
    finally:
        watcher.cancel()
    if task.cancelled():
        if progress.abandoned:
            return None
        raise asyncio.CancelledError  # the handler cancelled itself: not an answer
    exc = task.exception()
    if exc is None or isinstance(exc, Exception):
        return exc
    raise exc  # KeyboardInterrupt, SystemExit: never answered with a 503


async def run_in_cancel_scope(
    app: Awaitable[None], receiver: Receiver, progress: ResponseProgress
) -> Exception | None:
    """As :func:`run_cancel_once`, for event loops other than asyncio (trio)."""
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch, receiver, progress, tg.cancel_scope.cancel)
        try:
            await app
        except Exception as exc:
            # Kept, not raised here: raised inside the task group it would come out wrapped
            # in an ExceptionGroup.
            error = exc
        finally:
            tg.cancel_scope.cancel()
    return error
