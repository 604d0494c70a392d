"""PostgreSQL: ``statement_timeout`` and ``lock_timeout`` enforced by the server.

Two modes, because PgBouncer in transaction pooling hands each transaction to whichever
server connection is free, so a session-level ``SET`` leaks to other clients and the startup
``options`` are dropped:

- ``session`` (default): the settings go in once per new connection, committed, so
  statements at the default cost nothing; a statement that needs a different time-out gets
  transaction-local settings (reverted by commit or rollback), at most once per transaction
  and value band.
- ``transaction``: nothing per connection; transaction-local settings on the first
  statement of every transaction. One extra round trip per transaction: the price of
  transaction pooling.

A tightened statement time-out brings ``lock_timeout`` down with it (to half of it at most):
otherwise a lock victim whose deadline is nearly spent would fail as a statement time-out,
indistinguishable from the lock holder, and could be quarantined in its place.
"""

from __future__ import annotations

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

_QUERY_CANCELED = "57014"
_LOCK_NOT_AVAILABLE = "55P03"
_LOCAL_KEY = "poolguard.pg_local"
# Sessions of this database that block another one waiting for a lock and are not waiting
# themselves: pg_blocking_pids also names the waiters ahead in the queue, which are victims
# too. pg_blocking_pids takes the lock manager's locks briefly: poolguard asks rarely (see
# poolguard.blame).
_BLOCKERS = (
    "SELECT DISTINCT b.pid FROM pg_stat_activity w, unnest(pg_blocking_pids(w.pid)) AS b(pid) "
    "WHERE w.wait_event_type = 'Lock' AND w.datname = current_database() "
    "AND b.pid NOT IN (SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock')"
)


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
        extra = ["pg_backend_pid()"] if self.verify_ids else []
        if settings or extra:
            row = run_settings(dbapi_connection, settings, local=False, extra=extra)
            if extra:
                info[SERVER_ID] = row[-1]
            # Commit so a later rollback cannot revert the session default.
            dbapi_connection.commit()

    def lock_timeout_for(self, timeout: float | None) -> float | None:
        lock = self._lock_ms(0 if timeout is None else ms(timeout))
        return None if lock is None else lock / 1000

    def _lock_ms(self, want: int) -> int | None:
        """A lock wait gets at most half of a tightened statement's time, so that a victim
        of a lock holder fails as a lock wait (and earns no quarantine strike) even when a
        deadline has cut its statement time-out below the configured ``lock_timeout``."""
        if self.lock_timeout is None:
            return None
        lock = ms(self.lock_timeout)
        return lock if want == 0 else min(lock, max(1, want // 2))

    def prepare(self, statement: str, timeout: Seconds, context: Context, info: Info) -> str:
        want = 0 if timeout is None else ms(timeout)
        conn: Any = context.root_connection
        txn = conn._transaction
        dbapi_connection: Any = context._dbapi_connection  # type: ignore[attr-defined]
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
        settings = [("statement_timeout", want)]
        lock = self._lock_ms(want)
        if lock is not None:
            # Always sent with the statement time-out, so a lowered value never outlives the
            # band it was set for; it costs nothing, being the same statement.
            settings.append(("lock_timeout", lock))
        if self.mode == "transaction" and self.idle_in_transaction_timeout is not None:
            idle = ms(self.idle_in_transaction_timeout)
            settings.append(("idle_in_transaction_session_timeout", idle))
        # A cursor of its own: the statement's cursor may be a server-side one (stream_results,
        # yield_per), which can run only the one statement it declares.
        run_settings(dbapi_connection, settings, local=True)
        info[_LOCAL_KEY] = (txn, want)
        return statement

    can_blame = True

    def backend_pid(self, dbapi_connection: DBAPIConnection, info: dict[Any, Any]) -> int | None:
        # In transaction mode (PgBouncer) nothing is asked at connect: no id is trusted.
        raw: Any = dbapi_connection
        conn_info = getattr(raw, "info", None)  # psycopg 3
        pid = getattr(conn_info, "backend_pid", None)
        if pid is None and hasattr(raw, "get_backend_pid"):  # psycopg2
            pid = raw.get_backend_pid()
        inner: Any = getattr(raw, "_connection", None)  # SQLAlchemy's asyncpg adapter
        if pid is None and hasattr(inner, "get_server_pid"):
            pid = inner.get_server_pid()
        return trusted_id(pid, info)

    def blocking_pids(self, dbapi_connection: DBAPIConnection) -> list[int]:
        return [int(row[0]) for row in query(dbapi_connection, _BLOCKERS)]

    def cancel_backends(self, dbapi_connection: DBAPIConnection, pids: list[int]) -> None:
        ids = ", ".join(str(int(pid)) for pid in pids)
        query(dbapi_connection, f"SELECT pg_cancel_backend(p) FROM unnest(ARRAY[{ids}]::int[]) p")

    def was_cancelled(self, exc: BaseException) -> bool:
        return self.classify(exc) == "statement"  # 57014, as for statement_timeout

    def classify(self, exc: BaseException) -> str | None:
        code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if code == _QUERY_CANCELED:
            return "statement"
        if code == _LOCK_NOT_AVAILABLE:
            return "lock"
        return None


def run_settings(
    dbapi_connection: Any,
    settings: list[tuple[str, int]],
    *,
    local: bool,
    extra: list[str] | None = None,
) -> tuple[Any, ...]:
    """Apply settings in one statement: one round trip, and it works with every driver
    (asyncpg prepares statements, so "SET a; SET b" would not). ``SET`` takes no bind
    parameters, so values are inlined as validated integers. ``extra`` expressions ride
    along in the same row; the row is returned."""
    scope = "true" if local else "false"
    calls = [f"set_config('{name}', '{int(value)}', {scope})" for name, value in settings]
    rows = query(dbapi_connection, "SELECT " + ", ".join(calls + (extra or [])))
    return tuple(rows[0]) if rows else ()
