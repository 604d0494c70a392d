"""What the guard knows about each connection: checkouts in flight and per-connection state.

Both live outside ``connection.info``, which is the application's dictionary: a checkout's
:class:`Hold` is keyed by its pool record in the guard's own map, and the per-connection
:class:`ConnState` hangs on the record under a private attribute, tied to the DBAPI
connection it was made for (a reconnect replaces the DBAPI connection and so the state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from poolguard.core.budget import BudgetScope
from poolguard.core.origin import Origin, describe
from poolguard.observe.fingerprint import Fingerprint

__all__ = ["ConnState", "Hold", "conn_state"]

#: The record attribute (records have a ``__dict__``) holding a :class:`ConnState`.
_STATE_ATTR = "_poolguard_state"


@dataclass(eq=False, slots=True)
class Hold:
    """One checkout in flight: what the gate, the budget and the leak report need."""

    #: The gate partition whose slot it holds (given back when the hold ends).
    partition: str
    scope: BudgetScope | None
    since: float
    origin: Origin | None
    conn: ConnState
    fp: Fingerprint | None = None
    reported: bool = False
    #: The statement executing on the connection right now, and since when (monotonic).
    running: Fingerprint | None = None
    running_since: float = 0.0
    #: A cancel was sent for the running statement (its fingerprint was quarantined).
    cancelled: bool = False

    @property
    def where(self) -> str:
        """Where the checkout began, formatted only when a report needs it."""
        return describe(self.origin)


@dataclass(eq=False)
class ConnState:
    """poolguard's state for one DBAPI connection.

    ``dbapi`` is held strongly on purpose: comparing identities is how a reconnect is
    noticed, and a strong reference means a new connection can never reuse the address of
    the one this state was made for.
    """

    dbapi: Any
    #: The guard that prepared the connection (None: not prepared yet).
    owner: object | None = None
    #: The dialect enforcer's own keys (cached time-outs, the SQLite deadline cell...).
    info: dict[Any, Any] = field(default_factory=dict)
    #: The server's session id, when blame or cancel need it.
    backend_pid: int | None = None
    #: Monotonic time the pool created the connection (None once reported).
    created_at: float | None = None


def conn_state(record: Any) -> ConnState:
    """The state for ``record``'s current DBAPI connection, made fresh after a reconnect."""
    state: ConnState | None = record.__dict__.get(_STATE_ATTR)
    dbapi = record.dbapi_connection
    if state is None or state.dbapi is not dbapi:
        state = ConnState(dbapi)
        record.__dict__[_STATE_ATTR] = state
    return state


def forget(record: Any) -> None:
    """Drop the state (the guard is closing)."""
    record.__dict__.pop(_STATE_ATTR, None)
