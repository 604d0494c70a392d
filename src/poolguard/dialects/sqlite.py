"""SQLite: there is no server, so the engine interrupts itself.

A progress handler, installed once per connection, runs in the executing thread every few
thousand virtual-machine instructions and aborts the statement once its deadline has passed
(SQLite then raises "interrupted" and rolls back an interrupted write). Setting a statement's
deadline is one store into a per-connection cell: no thread, no timer, no round trip. It
works the same for sqlite3 and aiosqlite (whose worker thread runs the handler).

A lock wait is SQLite's busy handler, which runs no VM instruction and so never calls the
progress handler: left alone, a writer blocked by another would wait the driver's 5 s busy
timeout whatever its deadline. So ``lock_timeout`` becomes the connection's busy timeout, and
a tightened statement brings it down to half its time-out at most (a ``PRAGMA``, a local
call, sent only when the value leaves its band). A lock wait then fails as "database is
locked", reported as ``cause="lock"``, and an interrupt is always the statement's own work.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
from sqlalchemy.util import await_only

from poolguard.dialects.base import Enforcer, ms, query

_CELL_KEY = "poolguard.sqlite_deadline"
#: VM instructions between checks: about every 10-100 us of work, invisible on short statements.
_PROGRESS_STEPS = 2000
_SQLITE_INTERRUPT = 9
_SQLITE_BUSY = 5


class _Deadline:
    """The per-connection cell the progress handler reads; ``at`` is a monotonic deadline.
    ``busy_ms`` is the connection's busy timeout as last set (None: the driver's own)."""

    __slots__ = ("at", "busy_ms")

    def __init__(self) -> None:
        self.at: float | None = None
        self.busy_ms: int | None = None

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

    def __init__(self, *, lock_timeout: float | None = None) -> None:
        self.lock_timeout = lock_timeout
        self._lock_ms = None if lock_timeout is None else ms(lock_timeout)

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
        if self._lock_ms is not None:
            _set_busy_timeout(dbapi_connection, self._lock_ms)
            cell.busy_ms = self._lock_ms

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
            busy = self._busy_ms(timeout)
            have = cell.busy_ms
            # Inside [busy - slack, busy] the value already set serves: a shrinking deadline
            # would otherwise cost a PRAGMA per statement.
            if (
                busy != have
                and busy is not None
                and (have is None or not busy - max(50, busy // 10) <= have <= busy)
            ):
                _set_busy_timeout(context._dbapi_connection, busy)  # type: ignore[attr-defined]
                cell.busy_ms = busy
        return statement

    def _busy_ms(self, timeout: float | None) -> int | None:
        lock = self._lock_ms
        if lock is None or timeout is None or timeout * 500 >= lock:  # half the time-out, in ms
            return lock
        return max(1, int(timeout * 500))

    def lock_timeout_for(self, timeout: float | None) -> float | None:
        busy = self._busy_ms(timeout)
        return None if busy is None else busy / 1000

    def on_transaction_end(self, info: dict[Any, Any]) -> None:
        cell = info.get(_CELL_KEY)
        if cell is not None:
            cell.at = None

    def timeout_is_own(self, timeout: float | None) -> bool:
        # SQLite waits for a lock in its busy handler, which runs no VM instruction and so
        # never calls the progress handler: an interrupt is always the statement's own work.
        return True

    def classify(self, exc: BaseException) -> str | None:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_INTERRUPT or (
            isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted"
        ):
            return "statement"
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if (code is not None and code & 0xFF == _SQLITE_BUSY) or (
            code is None
            and isinstance(exc, sqlite3.OperationalError)
            and str(exc) == "database is locked"
        ):
            return "lock"
        return None


def _set_busy_timeout(dbapi_connection: Any, busy_ms: int) -> None:
    query(dbapi_connection, f"PRAGMA busy_timeout = {int(busy_ms)}")
