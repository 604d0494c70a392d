"""MySQL and MariaDB: statement time-outs enforced by the server, with no extra round trip.

The default goes in once per connection as a session variable. A statement that needs a
different value carries it in its own text, so nothing else is sent:

- MariaDB: ``max_statement_time`` (seconds, any statement); per statement
  ``SET STATEMENT max_statement_time=N FOR <statement>``.
  A tightened time-out brings ``innodb_lock_wait_timeout`` down with it, in the same
  ``SET STATEMENT`` (to half of it, in whole seconds): MariaDB's ``max_statement_time`` also
  ends lock waits, so otherwise a lock victim would fail as a statement time-out.
- MySQL: ``max_execution_time`` (milliseconds, read-only SELECT only); per statement the
  optimizer hint ``SELECT /*+ MAX_EXECUTION_TIME(N) */``. MySQL has no server-side limit for
  writes: the budget and the gate still bound them, the server does not.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection

from poolguard.dialects.base import (
    SERVER_ID,
    Context,
    Enforcer,
    Info,
    Seconds,
    ms,
    query,
    trusted_id,
)

_MARIADB_TIMEOUT = 1969  # ER_STATEMENT_TIMEOUT
_MYSQL_TIMEOUT = 3024  # ER_QUERY_TIMEOUT
_LOCK_WAIT_TIMEOUT = 1205  # ER_LOCK_WAIT_TIMEOUT
_QUERY_INTERRUPTED = 1317  # ER_QUERY_INTERRUPTED: what KILL QUERY leaves
# Sessions holding an InnoDB lock that another transaction waits for, and not waiting
# themselves (a waiting request can also block later ones: those are victims too).
_MARIADB_BLOCKERS = (
    "SELECT DISTINCT b.trx_mysql_thread_id FROM information_schema.innodb_lock_waits w "
    "JOIN information_schema.innodb_trx b ON b.trx_id = w.blocking_trx_id "
    "WHERE b.trx_state <> 'LOCK WAIT'"
)


class MySQLEnforcer(Enforcer):
    name = "mysql"

    def __init__(self, *, lock_timeout: float | None = None) -> None:
        self.is_mariadb: bool | None = None
        self.lock_timeout = lock_timeout
        # InnoDB counts whole seconds, at least one.
        self._session_lock = None if lock_timeout is None else max(1, math.ceil(lock_timeout))

    def _detect(self, dbapi_connection: Any) -> bool:
        if self.is_mariadb is None:
            rows = query(dbapi_connection, "SELECT VERSION()")
            self.is_mariadb = "mariadb" in str(rows[0][0]).lower() if rows else False
        return self.is_mariadb

    def on_connect(
        self, dbapi_connection: DBAPIConnection, info: dict[Any, Any], default_timeout: float | None
    ) -> None:
        mariadb = self._detect(dbapi_connection)
        if self.verify_ids:
            rows = query(dbapi_connection, "SELECT CONNECTION_ID()")
            info[SERVER_ID] = int(rows[0][0]) if rows else None
        cur = dbapi_connection.cursor()
        try:
            if self._session_lock is not None:
                cur.execute(f"SET SESSION innodb_lock_wait_timeout = {self._session_lock}")
            if default_timeout is None:
                return
            if mariadb:
                cur.execute(f"SET SESSION max_statement_time = {default_timeout:.3f}")
            else:
                cur.execute(f"SET SESSION max_execution_time = {ms(default_timeout)}")
        finally:
            cur.close()

    def prepare(self, statement: str, timeout: Seconds, context: Context, info: Info) -> str:
        if self.is_mariadb:
            secs = 0.0 if timeout is None else max(0.001, timeout)
            lock = self._lock_secs(timeout)
            if lock != self._session_lock:
                return (
                    f"SET STATEMENT max_statement_time={secs:.3f}, "
                    f"innodb_lock_wait_timeout={lock} FOR {statement}"
                )
            return f"SET STATEMENT max_statement_time={secs:.3f} FOR {statement}"
        head = statement.lstrip()[:6]
        if head.upper() == "SELECT":
            n = 0 if timeout is None else ms(timeout)
            i = len(statement) - len(statement.lstrip()) + 6
            return f"{statement[:i]} /*+ MAX_EXECUTION_TIME({n}) */{statement[i:]}"
        return statement

    def _lock_secs(self, timeout: float | None) -> int | None:
        lock = self._session_lock
        if lock is None or timeout is None or not self.is_mariadb:
            return lock  # MySQL's optimizer hints cannot set the lock wait per statement
        return max(1, min(lock, int(timeout // 2)))

    def lock_timeout_for(self, timeout: float | None) -> float | None:
        lock = self._lock_secs(timeout)
        return None if lock is None else float(lock)

    #: Connection ids come with the handshake; KILL QUERY cancels on MySQL and MariaDB. Who
    #: blocks whom is asked of MariaDB only (MySQL 8 moved it to performance_schema).
    can_blame = True

    def backend_pid(self, dbapi_connection: DBAPIConnection, info: dict[Any, Any]) -> int | None:
        raw: Any = dbapi_connection
        inner: Any = getattr(raw, "_connection", raw)  # SQLAlchemy's aiomysql adapter
        thread_id = getattr(inner, "thread_id", None)
        return trusted_id(thread_id() if callable(thread_id) else None, info)

    def blocking_pids(self, dbapi_connection: DBAPIConnection) -> list[int]:
        if not self.is_mariadb:
            return []
        return [int(row[0]) for row in query(dbapi_connection, _MARIADB_BLOCKERS)]

    def cancel_backends(self, dbapi_connection: DBAPIConnection, pids: list[int]) -> None:
        cur = dbapi_connection.cursor()
        try:
            for pid in pids:
                try:
                    cur.execute(f"KILL QUERY {int(pid)}")
                except Exception:  # it may have ended meanwhile (unknown thread)
                    continue
        finally:
            cur.close()

    def was_cancelled(self, exc: BaseException) -> bool:
        args: tuple[Any, ...] = getattr(exc, "args", ())
        return bool(args) and args[0] in (_QUERY_INTERRUPTED, _MARIADB_TIMEOUT, _MYSQL_TIMEOUT)

    def classify(self, exc: BaseException) -> str | None:
        args: tuple[Any, ...] = getattr(exc, "args", ())
        code = args[0] if args else None
        if code in (_MARIADB_TIMEOUT, _MYSQL_TIMEOUT):
            return "statement"
        if code == _LOCK_WAIT_TIMEOUT:
            return "lock"
        return None
