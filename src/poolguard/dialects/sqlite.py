"""SQLite: there is no server, so the engine interrupts itself.

A progress handler, installed once per connection, runs in the executing thread every few
thousand virtual-machine instructions and aborts the statement once its deadline has passed
(SQLite then raises "interrupted" and rolls back an interrupted write). Setting a statement's
deadline is one store into a per-connection cell: no thread, no timer, no round trip. It
works the same for sqlite3 and aiosqlite (whose worker thread runs the handler).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
from sqlalchemy.util import await_only

from .base import Enforcer

_CELL_KEY = "poolguard.sqlite_deadline"
#: VM instructions between checks: about every 10-100 us of work, invisible on short statements.
_PROGRESS_STEPS = 2000
_SQLITE_INTERRUPT = 9


class _Deadline:
    """The per-connection cell the progress handler reads; ``at`` is a monotonic deadline."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> int:
        at = self.at
        return 1 if at is not None and time.monotonic() > at else 0


class SQLiteEnforcer(Enforcer):
    name = "sqlite"
    # Every statement stores its own deadline; there is no session setting to lean on.
    session_baseline = False
    # A deadline left behind must not interrupt what runs next on the connection: each
    # statement stores its own, and the guard clears it when the connection is checked in.
    # (COMMIT and ROLLBACK run a handful of VM instructions: far fewer than the handler's
    # period, so they are never interrupted.)
    tracks_transactions = True

    def on_connect(
        self, dbapi_connection: DBAPIConnection, info: dict[Any, Any], default_timeout: float | None
    ) -> None:
        cell = _Deadline()
        raw: Any = dbapi_connection
        if isinstance(raw, sqlite3.Connection):
            raw.set_progress_handler(cell, _PROGRESS_STEPS)
        else:  # SQLAlchemy's aiosqlite adapter: run it on aiosqlite's own thread
            await_only(raw._connection.set_progress_handler(cell, _PROGRESS_STEPS))
        info[_CELL_KEY] = cell

    def prepare(
        self,
        cursor: DBAPICursor,
        statement: str,
        timeout: float | None,
        context: ExecutionContext,
    ) -> str:
        cell = context._dbapi_connection.info.get(_CELL_KEY)  # type: ignore[attr-defined]
        if cell is not None:
            cell.at = None if timeout is None else time.monotonic() + timeout
        return statement

    def on_transaction_end(self, info: dict[Any, Any]) -> None:
        cell = info.get(_CELL_KEY)
        if cell is not None:
            cell.at = None

    def classify(self, exc: BaseException) -> str | None:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_INTERRUPT or (
            isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted"
        ):
            return "statement"
        return None
