"""What every dialect enforcer offers the guard.

The guard knows each statement's effective time-out; an enforcer makes the database honour
it. The contract that keeps the hot path lean: a connection gets the guard's default
time-out once, when it is created (``on_connect``), and ``prepare`` is only consulted when a
statement needs a different one, so the steady state costs no round trip at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection, ExecutionContext

#: poolguard's own state for one connection (never the application's ``connection.info``).
Info = dict[Any, Any]
#: A time-out in seconds; None: no limit.
Seconds = float | None
Context = ExecutionContext


class Enforcer:
    """Base enforcer; also the fallback for databases poolguard has no server knob for."""

    name = "none"
    #: True when ``on_connect`` installs the default time-out on every new connection, so
    #: statements at the default need no per-statement work.
    session_baseline = True

    #: True when the enforcer keeps per-transaction state that commit and rollback end.
    tracks_transactions = False

    #: The session's lock wait limit in seconds (None: the server's own setting).
    lock_timeout: float | None = None

    def on_connect(
        self, dbapi_connection: DBAPIConnection, info: dict[Any, Any], default_timeout: float | None
    ) -> None:
        """Install the default time-out on a new connection (``info``: poolguard's own state
        for that connection)."""

    def prepare(self, statement: str, timeout: Seconds, context: Context, info: Info) -> str:
        """Make ``timeout`` apply to this one statement; return the statement to run.
        ``info`` is the connection's own state (what ``on_connect`` was given), never the
        application's ``connection.info``."""
        return statement

    def on_transaction_end(self, info: dict[Any, Any]) -> None:
        """A transaction ended: forget any per-transaction setting."""

    def classify(self, exc: BaseException) -> str | None:
        """Name the time-out ``exc`` reports, or None when it is not one.

        ``"statement"``: the statement ran past its time-out (it counts towards quarantine);
        ``"lock"``: it waited too long for a lock someone else holds. A lock wait is the
        victim's time-out, not the culprit's, so it never counts towards quarantine.
        """
        return None

    #: True when the server can say who blocks a lock waiter (see poolguard.blame) and can
    #: cancel another session's statement: both need the sessions' ids.
    can_blame = False
    #: Set by the guard when it will use session ids: ``on_connect`` then also reads the id
    #: the server gives the session, to check the driver's against it.
    verify_ids = False

    def backend_pid(self, dbapi_connection: DBAPIConnection, info: dict[Any, Any]) -> int | None:
        """The server session's id, or None when it cannot be trusted.

        The driver knows an id from the handshake (no round trip), but behind a pooler
        (PgBouncer, ProxySQL) that id is the pooler's, not the server's: a cancel sent to it
        could stop another client's statement. So it is used only when it matches what the
        server itself said in ``on_connect`` (stored in ``info`` under :data:`SERVER_ID`).
        """
        return None

    def blocking_pids(self, dbapi_connection: DBAPIConnection) -> list[int]:
        """The sessions that block others waiting for a lock right now (one round trip on a
        connection of poolguard's own)."""
        return []

    def cancel_backends(self, dbapi_connection: DBAPIConnection, pids: list[int]) -> None:
        """Cancel what these sessions are running (one round trip on a connection of
        poolguard's own)."""

    def was_cancelled(self, exc: BaseException) -> bool:
        """True when ``exc`` reports a statement stopped by a cancel (``cancel_backends``)."""
        return False

    def lock_timeout_for(self, timeout: float | None) -> float | None:
        """The longest a statement with this time-out waits for a lock before the server
        reports it as a lock wait (``"lock"``); None when the server's setting applies."""
        return self.lock_timeout

    def timeout_is_own(self, timeout: float | None) -> bool:
        """True when a statement time-out at ``timeout`` proves the statement itself ran too
        long. False when it may have been a lock wait (the lock wait limit is not below the
        statement's): such a statement may be the victim of a lock holder, and quarantining
        victims would take the healthy path down with the rogue one."""
        lock = self.lock_timeout_for(timeout)
        return lock is None or timeout is None or lock < timeout


class ClientSideOnly(Enforcer):
    """For a database without a known server-side time-out: budgets, the gate and quarantine
    still apply; statements are not interrupted."""

    def __init__(self, dialect_name: str) -> None:
        self.name = dialect_name
        self.session_baseline = False


#: Where ``on_connect`` keeps the session id the server reported, in the record's info.
SERVER_ID = "poolguard.server_session_id"


def trusted_id(driver_id: object, info: dict[Any, Any]) -> int | None:
    """The driver's session id if the server reported the same one, else None."""
    if isinstance(driver_id, int) and driver_id == info.get(SERVER_ID):
        return driver_id
    return None


def query(dbapi_connection: Any, sql: str) -> list[Any]:
    """Run one statement of poolguard's own on a cursor of its own and return its rows.

    A cursor of its own because the statement's cursor may be a server-side one (it runs
    only the statement it declares); the rows are always read, because some drivers
    (asyncpg's adapter) keep an unread result bound to the connection."""
    cur = dbapi_connection.cursor()
    try:
        cur.execute(sql)
        return list(cur.fetchall()) if cur.description is not None else []
    finally:
        cur.close()


def ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (0 means "no limit" to PostgreSQL and MySQL)."""
    return max(1, int(seconds * 1000))
