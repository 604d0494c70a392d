"""PostgreSQL: ``statement_timeout`` enforced by the server.

Two modes, because PgBouncer in transaction pooling hands each transaction to whichever
server connection is free, so a session-level ``SET`` leaks to other clients and the startup
``options`` are dropped:

- ``session`` (default): ``SET statement_timeout`` once per new connection, committed, so
  statements at the default cost nothing; a statement that needs a different value gets
  ``SET LOCAL`` (scoped to its transaction, reverted by commit or rollback), at most once per
  transaction and value band.
- ``transaction``: nothing per connection; ``SET LOCAL`` on the first statement of every
  transaction. One extra round trip per transaction: the price of transaction pooling.

``SET`` takes no bind parameters, so the value is inlined as a validated integer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext

from .base import Enforcer, ms

_QUERY_CANCELED = "57014"
_LOCK_NOT_AVAILABLE = "55P03"
_LOCAL_KEY = "poolguard.pg_local"


class PostgreSQLEnforcer(Enforcer):
    name = "postgresql"

    def __init__(
        self,
        *,
        mode: str = "session",
        lock_timeout: float | None = None,
        idle_in_transaction_timeout: float | None = None,
    ) -> None:
        if mode not in ("session", "transaction"):
            raise ValueError(f"pg_timeout_mode must be 'session' or 'transaction', got {mode!r}")
        self.mode = mode
        self.session_baseline = mode == "session"
        self.lock_timeout = lock_timeout
        self.idle_in_transaction_timeout = idle_in_transaction_timeout

    def on_connect(
        self, dbapi_connection: DBAPIConnection, info: dict[Any, Any], default_timeout: float | None
    ) -> None:
        if self.mode != "session":
            return
        settings: list[tuple[str, int]] = []
        if default_timeout is not None:
            settings.append(("statement_timeout", ms(default_timeout)))
        if self.lock_timeout is not None:
            settings.append(("lock_timeout", ms(self.lock_timeout)))
        if self.idle_in_transaction_timeout is not None:
            settings.append(
                ("idle_in_transaction_session_timeout", ms(self.idle_in_transaction_timeout))
            )
        if not settings:
            return
        # One statement for all of them: one round trip, and it works with every driver
        # (asyncpg prepares statements, so "SET a; SET b" would not).
        calls = ", ".join(f"set_config('{name}', '{value}', false)" for name, value in settings)
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"SELECT {calls}")
            cur.fetchall()
        finally:
            cur.close()
        # Commit so a later rollback cannot revert the session default.
        dbapi_connection.commit()

    def prepare(
        self,
        cursor: DBAPICursor,
        statement: str,
        timeout: float | None,
        context: ExecutionContext,
    ) -> str:
        want = 0 if timeout is None else ms(timeout)
        conn: Any = context.root_connection
        txn = conn._transaction
        info = context._dbapi_connection.info  # type: ignore[attr-defined]
        cached = info.get(_LOCAL_KEY)
        if cached is not None and cached[0] is txn:
            have = cached[1]
            # Inside the band [want, want + slack] the value already set serves: time left
            # shrinks with every statement, and re-sending SET each time would cost a round
            # trip per statement near a deadline. The slack bounds the overshoot.
            if have != 0 and want != 0 and want <= have <= want + max(50, want // 10):
                return statement
            if have == want:
                return statement
        cursor.execute(f"SET LOCAL statement_timeout = {int(want)}")
        info[_LOCAL_KEY] = (txn, want)
        return statement

    def classify(self, exc: BaseException) -> str | None:
        code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if code == _QUERY_CANCELED:
            return "statement"
        if code == _LOCK_NOT_AVAILABLE:
            return "lock"
        return None
