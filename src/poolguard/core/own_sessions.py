"""Lock-holder blame and cancel-on-quarantine: the work poolguard does on server sessions
of its own. The judging is pure (:mod:`poolguard.policy.blame`); this is the I/O around it.

Both open a DBAPI connection outside the pool and the gate, because the pooled ones belong
to the application (a victim's transaction is aborted and is the application's to roll
back); the pool's creator runs the engine's ``do_connect`` hooks (credentials providers)
as for any connection, and the connection is closed before the call returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.util.concurrency import in_greenlet

from poolguard.policy.blame import Blocker, LockBlame, Victim

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["OwnSessions"]

_T = TypeVar("_T")


class OwnSessions:
    """Asks the server who blocks whom, and cancels a quarantined statement's copies."""

    def __init__(self, parts: Parts) -> None:
        self.p = parts
        self.judge = LockBlame()
        self.cancelled_total = 0

    @property
    def blamed(self) -> int:
        return self.judge.blamed

    def victim_waited(self, since: float) -> None:
        """A victim's lock wait ended: strike the statement of ours that kept it waiting.
        Best effort: a failure to ask the server costs the victim nothing more."""
        running = [
            Blocker(h.conn.backend_pid, h.running.id, h.running.summary, h.running_since)
            for h in list(self.p.held.values())
            if h.running is not None and h.conn.backend_pid is not None
        ]
        if not running:
            return  # none of ours is running a statement: nothing to ask the server
        now = time.monotonic()
        try:
            blamed = self.judge.judge(
                Victim(since, now, tuple(running)),
                now,
                lambda: self._on_own_connection(self.p.enforcer.blocking_pids),
            )
        except Exception as e:
            self.p.log.debug(
                "poolguard: could not ask which sessions block others: %s", type(e).__name__
            )
            return
        for culprit in blamed:
            self.judge.blamed += 1
            t = self.p.quarantine.record_timeout(culprit.fingerprint, culprit.summary, now)
            if self.p.fleet is not None:
                self.p.fleet.strike(culprit.fingerprint, culprit.summary)
            if t is not None:
                self.p.on_transition(t)

    def cancel_running(self, fingerprint: str) -> None:
        """Cancel the executions of a just-quarantined statement that are still running on
        this guard's connections: each holds a connection, maybe locks, until its own
        time-out, which is exactly the harm the quarantine is there to stop."""
        pids = []
        for hold in list(self.p.held.values()):
            fp, pid = hold.running, hold.conn.backend_pid
            if fp is not None and fp.id == fingerprint and pid is not None:
                hold.cancelled = True
                pids.append(pid)
        if not pids:
            return
        try:
            self._on_own_connection(lambda raw: self.p.enforcer.cancel_backends(raw, pids))
        except Exception as e:
            self.p.log.debug(
                "poolguard: could not cancel quarantined statements: %s", type(e).__name__
            )
            return
        self.cancelled_total += len(pids)

    def _on_own_connection(self, work: Callable[[Any], _T]) -> _T:
        if self.p.is_async and not in_greenlet():
            raise RuntimeError("an async driver connects only inside SQLAlchemy's greenlet")
        raw = self.p.engine.pool._invoke_creator(None)  # type: ignore[arg-type]
        try:
            return work(raw)
        finally:
            raw.close()
