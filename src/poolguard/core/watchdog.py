"""The watchdog: leak and saturation reports, work that must not sit on any request.

Its thread holds the guard's parts only through a weak reference, so a guarded engine that
the application drops is collected with its guard, pool and connections (the thread ends
when it finds the reference dead). Threads do not survive ``fork()``: a guard installed
before a fork (gunicorn ``--preload``) restarts its watchdog in the child and forgets the
parent's checkouts, which the child can never return (SQLAlchemy's recipe for forks,
``engine.dispose(close=False)``, gives the child a pool of its own).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from poolguard.errors import PoolGuardError

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["Watchdog"]

_live: weakref.WeakSet[Watchdog] = weakref.WeakSet()


class Watchdog:
    """Scans the guard's checkouts every ``min(1 s, hold_timeout / 4)``."""

    def __init__(self, parts: Parts) -> None:
        self._parts = weakref.ref(parts)
        self.period = min(1.0, parts.config.timeouts.hold_timeout / 4)
        self.name = f"poolguard-watchdog[{parts.pool_name}]"
        self.leaks_reported = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start()
        _live.add(self)

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run, args=(self._parts, self._stop, self.period), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def after_fork(self) -> None:
        parts = self._parts()
        if parts is None or self._stop.is_set():
            return
        parts.forget_checkouts()
        self.start()


def _run(ref: weakref.ref[Parts], stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        parts = ref()
        if parts is None:
            return  # the guard was collected
        try:
            scan(parts, time.monotonic())
        except Exception:  # pragma: no cover - the watchdog must never die
            parts.log.exception("poolguard watchdog failed")
        del parts


def scan(p: Parts, now: float) -> None:
    """One pass: report holds past ``hold_timeout``, then sustained saturation."""
    limit = p.config.timeouts.hold_timeout
    for record, hold in list(p.held.items()):
        if hold.reported or now - hold.since <= limit:
            continue
        hold.reported = True
        p.leaks_reported += 1
        summary = hold.fp.summary if hold.fp is not None else "no statement yet"
        partition = hold.partition
        msg = (
            f"connection held {now - hold.since:.1f} s (hold_timeout {limit:g} s), "
            f"checked out at {hold.where}, partition {partition}, last statement {summary}"
        )
        p.refused(PoolGuardError(msg), "leak", partition, hold.fp)
        alerted = p.alerts.emit(
            "leak",
            hold.where,
            msg,
            {"where": hold.where, "partition": partition, "summary": summary},
            now,
        )
        if not alerted:  # debounced: every leak still gets its one WARNING line
            p.log.warning(msg)
        if p.config.timeouts.reclaim_leaked:
            _reclaim(p, record)
    g = p.gate
    saturated = g.waiting > 0 and g.oldest_wait(now) > p.config.shed.target
    if p.saturation.observe(saturated, now):
        p.alerts.emit(
            "saturation",
            p.pool_name,
            f"pool {p.pool_name} saturated: {g.waiting} waiting, {g.held} of "
            f"{g.capacity} connections in use",
            {"pool": p.pool_name, "waiting": g.waiting, "held": g.held},
            now,
        )


def _reclaim(p: Parts, record: Any) -> None:
    """Close a leaked connection's DBAPI connection so the server ends its session.

    The server then rolls back its transaction and frees its locks: what hurts other
    requests. The pool slot stays counted until the holder returns (or drops) the
    connection, whose next use fails as a disconnect, so no one is handed a connection that
    another caller still holds. Async drivers need their event loop to close a connection,
    which this thread does not have: there the leak is only reported.
    """
    if p.is_async:
        p.log.warning("reclaim_leaked: cannot close an asyncio connection from the watchdog")
        return
    try:
        record.invalidate()
    except Exception as e:  # the driver may complain about a connection in use
        p.log.warning("reclaim_leaked: closing the leaked connection failed: %s", type(e).__name__)


def _after_fork_in_child() -> None:
    for w in list(_live):
        w.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
