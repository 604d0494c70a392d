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

A busy timeout the application configured itself (``connect_args={"timeout": ...}``, or a
``creator``) is kept, and caps the lock wait instead of ``lock_timeout``, unless
``lock_timeout`` was given explicitly: only the driver's default (5 s) is replaced.

Connections are told apart by what they can do, not by their class alone: sqlite3's, and
anything else with a ``set_progress_handler`` (pysqlite3, ``module=`` replacements, a
``creator`` that returns a delegating wrapper), get the handler in the executing thread;
an adapted async connection (SQLAlchemy's aiosqlite adapter) gets it on its driver's own
thread. A connection with neither still works, without an interrupt: the enforcement is then
reported as ``"none"`` (``stats()["settings"]["timeout_enforcement"]``), with one warning.
"""

from __future__ import annotations

import inspect
import logging
import sqlite3
import time
from typing import Any

from sqlalchemy.engine.interfaces import (
    AdaptedConnection,
    DBAPIConnection,
)
from sqlalchemy.util import await_only

from poolguard.dialects.base import Context, Enforcer, Info, Seconds, ms, query

_CELL_KEY = "poolguard.sqlite_deadline"
#: VM instructions between checks: about every 10-100 us of work, invisible on short statements.
_PROGRESS_STEPS = 2000
_SQLITE_INTERRUPT = 9
_SQLITE_BUSY = 5
#: ``sqlite3.connect(timeout=5.0)``: the busy timeout of sqlite3, pysqlite3 and aiosqlite
#: when nobody configured one. Any other value was configured on purpose and is kept.
_DRIVER_DEFAULT_BUSY_MS = 5000
#: ``PRAGMA busy_timeout`` takes a C int: a larger value silently becomes 0 (no wait at all).
_MAX_BUSY_MS = 2**31 - 1
#: What ``stats()["settings"]["timeout_enforcement"]`` says when a connection cannot be
#: interrupted: statements run without a time-out on the database.
UNENFORCED = "none"

log = logging.getLogger("poolguard")


_UNDECIDED = object()
_monotonic = time.monotonic


class _Deadline:
    """The per-connection cell the progress handler reads; ``at`` is a monotonic deadline.
    ``busy_ms`` is the connection's busy timeout as last set (None: the driver's own);
    ``lock_ms`` the lock wait it allows a statement at its longest (None: left alone);
    ``configured_ms`` the busy timeout the connection had before poolguard touched it."""

    __slots__ = ("at", "busy_for", "busy_ms", "configured_ms", "lock_ms")

    def __init__(self) -> None:
        self.at: float | None = None
        self.busy_ms: int | None = None
        self.lock_ms: int | None = None
        self.configured_ms: int | None = None
        #: The time-out object ``busy_ms`` was last decided for: statements at the guard's
        #: default pass the same float, so the steady state skips the decision.
        self.busy_for: object = _UNDECIDED

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

    def __init__(
        self, *, lock_timeout: float | None = None, replace_busy_timeout: bool = False
    ) -> None:
        """``replace_busy_timeout``: True when the user gave ``lock_timeout`` explicitly;
        it then replaces a busy timeout configured on the connection too."""
        self.lock_timeout = lock_timeout
        self._lock_ms = None if lock_timeout is None else min(ms(lock_timeout), _MAX_BUSY_MS)
        self.replace_busy_timeout = replace_busy_timeout
        #: The lock wait limit reported for lock time-outs: ``lock_timeout``, or the busy
        #: timeout kept from the connections' own configuration.
        self._reported_ms = self._lock_ms
        self._warned: set[str] = set()

    def on_connect(
        self, dbapi_connection: DBAPIConnection, info: dict[Any, Any], default_timeout: float | None
    ) -> None:
        # A connection a previous guard already saw keeps its cell: it knows what the busy
        # timeout was before poolguard changed it.
        cell = info.get(_CELL_KEY)
        if not isinstance(cell, _Deadline):
            cell = _Deadline()
        cell.at = None
        cell.busy_for = _UNDECIDED
        raw: Any = dbapi_connection
        if not _install_progress_handler(raw, cell):
            self._unenforced(raw)
        info[_CELL_KEY] = cell
        if self._lock_ms is None:
            return
        if cell.configured_ms is None:
            cell.configured_ms = _read_busy_timeout(raw)
        configured = cell.configured_ms
        if configured is None:
            # It answers no PRAGMA (a test double, a wrapper without cursors): there is no
            # busy timeout to set either, and failing the checkout would fail the app.
            return
        replace = self.replace_busy_timeout
        if not replace and configured != _DRIVER_DEFAULT_BUSY_MS:
            # Configured on purpose (connect_args, a creator): it stays the lock wait.
            cell.lock_ms = cell.busy_ms = configured
            if configured != self._reported_ms:
                self._reported_ms = configured
                log.info(
                    "poolguard: keeping the SQLite busy timeout configured on the connection "
                    "(%d ms) as its lock wait; pass lock_timeout= to replace it",
                    configured,
                )
            return
        cell.lock_ms = self._lock_ms
        _set_busy_timeout(dbapi_connection, self._lock_ms)
        cell.busy_ms = self._lock_ms

    def _unenforced(self, raw: object) -> None:
        """No way to interrupt this connection: say so once per type, and in stats()."""
        self.name = UNENFORCED
        kind = f"{type(raw).__module__}.{type(raw).__qualname__}"
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "poolguard: SQLite connections of type %s have no set_progress_handler: "
                "statement time-outs are not enforced on the database (budgets, the gate "
                "and quarantine still apply)",
                kind,
            )

    def prepare(self, statement: str, timeout: Seconds, context: Context, info: Info) -> str:
        cell = info.get(_CELL_KEY)
        if cell is not None:
            cell.at = None if timeout is None else _monotonic() + timeout
            if timeout is cell.busy_for:
                return statement
            cell.busy_for = timeout
            busy = _busy_ms(cell.lock_ms, timeout)
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

    def lock_timeout_for(self, timeout: float | None) -> float | None:
        busy = _busy_ms(self._reported_ms, timeout)
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
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+, pysqlite3
        # By name, not by class: pysqlite3 and other sqlite3-compatible modules raise their
        # own OperationalError.
        operational = isinstance(exc, sqlite3.OperationalError) or (
            type(exc).__name__ == "OperationalError"
        )
        if code == _SQLITE_INTERRUPT or (operational and str(exc) == "interrupted"):
            return "statement"
        if (code is not None and code & 0xFF == _SQLITE_BUSY) or (
            code is None and operational and str(exc) == "database is locked"
        ):
            return "lock"
        return None


def _busy_ms(lock: int | None, timeout: float | None) -> int | None:
    """The busy timeout for a statement: the lock wait, or half its time-out when that is
    shorter (in ms); None leaves the connection's own."""
    if lock is None or timeout is None or timeout * 500 >= lock:
        return lock
    return max(1, int(timeout * 500))


def _install_progress_handler(raw: Any, cell: _Deadline) -> bool:
    """Install ``cell`` as the connection's progress handler; False when it has none.

    An adapted async connection (SQLAlchemy's aiosqlite adapter) runs the handler on its
    driver's own thread, where its statements execute; anything with a synchronous
    ``set_progress_handler`` takes it directly. Looked up with ``getattr``: wrappers that
    delegate by ``__getattr__`` are recognised too.
    """
    if isinstance(raw, sqlite3.Connection):
        raw.set_progress_handler(cell, _PROGRESS_STEPS)
        return True
    if isinstance(raw, AdaptedConnection):
        driver = raw.driver_connection
        install = getattr(driver, "set_progress_handler", None)
        if install is not None and inspect.iscoroutinefunction(install):
            await_only(install(cell, _PROGRESS_STEPS))
            return True
    install = getattr(raw, "set_progress_handler", None)
    if callable(install) and not inspect.iscoroutinefunction(install):
        install(cell, _PROGRESS_STEPS)
        return True
    return False


def _read_busy_timeout(dbapi_connection: Any) -> int | None:
    """The connection's busy timeout in ms, or None when it cannot be read."""
    try:
        rows = query(dbapi_connection, "PRAGMA busy_timeout")
        return int(rows[0][0])
    except Exception:  # a wrapper without cursors, a driver that refuses PRAGMAs
        return None


def _set_busy_timeout(dbapi_connection: Any, busy_ms: int) -> None:
    query(dbapi_connection, f"PRAGMA busy_timeout = {min(int(busy_ms), _MAX_BUSY_MS)}")
