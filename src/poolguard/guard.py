"""PoolGuard: the facade that wires the guard's parts to one engine and holds the public API.

Where each part hooks in, and why there, is told by the part itself:
:mod:`poolguard.core.checkout` (the gate in front of ``pool.connect``),
:mod:`poolguard.core.statements` (one ``do_execute`` listener that runs the statement) and
:mod:`poolguard.core.watchdog` (leak and saturation reports). Options are checked once, in
:mod:`poolguard.config`; every one is described in docs/configuration.md.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from poolguard.config import GuardConfig, GuardOptions
from poolguard.core.assemble import build_parts, fingerprint_id
from poolguard.core.budget import PRIORITIES, PRIORITY_RANK, Budget, scope_context
from poolguard.core.checkout import CheckoutPath
from poolguard.core.engines import pool_capacity, sync_engine_of
from poolguard.core.statements import StatementPath
from poolguard.core.watchdog import Watchdog
from poolguard.observe.refusals import MAX_PARTITIONS, OTHER
from poolguard.observe.state import GuardView
from poolguard.observe.telemetry import (
    PoolState,
)
from poolguard.policy.gate import DEFAULT_PARTITION
from poolguard.policy.shedding import Decision

if TYPE_CHECKING:
    # Only for annotations: importing SQLAlchemy's asyncio extension needs greenlet, which a
    # core install (SQLAlchemy 2.1 no longer pulls it in) does not have.
    from sqlalchemy.ext.asyncio import AsyncEngine
    from typing_extensions import Unpack

    from poolguard.fleet.protocol import Fleet

__all__ = ["PoolGuard", "active_guards"]

#: Every installed guard. Weak: a guard and its engine reference each other (the engine
#: through its listeners and ``_ENGINE_ATTR``), so an application that drops both gets both
#: collected; a mapping keyed by engine whose values hold the engine would keep them forever.
_guards: weakref.WeakSet[PoolGuard] = weakref.WeakSet()
_guards_lock = threading.Lock()
#: The engine attribute naming its guard (one guard per engine).
_ENGINE_ATTR = "_poolguard_guard"


def active_guards() -> list[PoolGuard]:
    """Every guard installed and not closed (the test suite's leak check reads it)."""
    with _guards_lock:
        return list(_guards)


class PoolGuard:
    """Protects one SQLAlchemy engine. Safe defaults with no arguments.

    The defaults: statements may run 5 s (no web request should wait longer on one
    statement, and it is short enough that a stuck statement frees its connection long before
    clients give up); a checkout waits at most 1 s (enough to ride out a burst, far below
    the 30 s SQLAlchemy default that turns a slow query into an outage); a connection held
    for 30 s is reported as a probable leak; a partition (route) may hold at most half of
    the pool while others wait; critical work keeps a tenth of the pool (at least one
    connection when the pool has four or more). Where the server can tell (PostgreSQL,
    MariaDB), a statement that keeps others waiting on its locks is blamed by its victims,
    and a quarantine cancels the copies of its statement still running.

    Every option is described in docs/configuration.md.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        fleet: Fleet | None = None,
        **options: Unpack[GuardOptions],
    ) -> None:
        sync_engine = sync_engine_of(engine)
        config = GuardConfig.from_options(**options)
        if fleet is not None and (
            isinstance(fleet, (str, bytes)) or not callable(getattr(fleet, "join", None))
        ):
            raise TypeError(f"fleet must be a RedisFleet or None, got {type(fleet).__name__}")
        self.config = config
        self.engine = engine
        self.sync_engine = sync_engine
        self._closed = False
        cap = config.gate.capacity or pool_capacity(sync_engine.pool)
        parts = build_parts(sync_engine, config, cap, _weak_pool_state(weakref.ref(self)))
        self._parts = parts
        self._view = GuardView(parts)
        self._checkout = CheckoutPath(parts)
        self._statements = StatementPath(parts)
        self._partition_names: set[str] = set()
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        with _guards_lock:
            if sync_engine.__dict__.get(_ENGINE_ATTR) is not None:
                raise RuntimeError(
                    "engine already has a PoolGuard installed; close() it before installing another"
                )
            sync_engine.__dict__[_ENGINE_ATTR] = self
            _guards.add(self)
        try:
            self._install()
            if fleet is not None:
                parts.fleet = fleet.join(
                    gate=parts.gate,
                    quarantine=parts.quarantine,
                    alerts=parts.alerts,
                    pool_capacity=cap,
                    on_transition=parts.on_transition,
                )
        except BaseException:
            self.close()
            raise
        self._watchdog = Watchdog(parts)

    # -- what the parts are, for users and tests ------------------------------------------
    gate = property(lambda self: self._parts.gate)
    quarantine = property(lambda self: self._parts.quarantine)
    enforcer = property(lambda self: self._parts.enforcer)
    telemetry = property(lambda self: self._parts.telemetry)
    alerts = property(lambda self: self._parts.alerts)
    pool_name = property(lambda self: self._parts.pool_name)
    statement_timeout = property(lambda self: self.config.timeouts.statement_timeout)
    checkout_timeout = property(lambda self: self.config.timeouts.checkout_timeout)
    hold_timeout = property(lambda self: self.config.timeouts.hold_timeout)
    lock_timeout = property(lambda self: self.config.timeouts.lock_timeout)
    blame_lock_holders = property(lambda self: self._parts.blame_lock_holders)
    cancel_quarantined = property(lambda self: self._parts.cancel_quarantined)

    # -- public API ------------------------------------------------------------------------
    def budget(
        self,
        deadline: float | None = None,
        *,
        statement_timeout: float | None = None,
        max_queries: int | None = None,
        max_db_time: float | None = None,
        max_connections: int | None = None,
        priority: str | None = None,
        partition: str | None = None,
    ) -> scope_context:
        """Open a budget scope: ``with guard.budget(deadline=1.5): ...`` (or ``async with``).

        Scopes nest and an inner one can only tighten. The scope is not tied to this guard:
        every guarded engine used inside it honours it. Partition names may come from input
        (a tenant, a queue): past 200 distinct names, further ones share ``"_OTHER"``, so
        statistics and metric attributes stay bounded.
        """
        if partition is not None and partition not in self._partition_names:
            if len(self._partition_names) >= MAX_PARTITIONS:
                partition = OTHER
            elif isinstance(partition, str):
                self._partition_names.add(partition)
        return scope_context(
            Budget(
                deadline=deadline,
                statement_timeout=statement_timeout,
                max_queries=max_queries,
                max_db_time=max_db_time,
                max_connections=max_connections,
                priority=priority,
                partition=partition,
            )
        )

    def admit(self, priority: str = "normal", partition: str | None = None) -> Decision:
        """Ask whether new work of this priority should start now (the middleware's check)."""
        rank = PRIORITY_RANK.get(priority)
        if rank is None:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
        now = time.monotonic()
        g = self._parts.gate
        p = partition or DEFAULT_PARTITION
        decision = self._parts.shedder(p).decide(
            rank,
            now,
            oldest_wait=g.oldest_wait(now, p),
            waiting=g.waiting_in(p),
            capacity=g.capacity,
            drain_rate=g.drain_rate(now),
            wait_bound=self.config.timeouts.checkout_timeout,
            growing=now - self._parts.grew_at < self.config.shed.interval,
        )
        if not decision.admit:
            self.record_refusal("shed", partition)
            self.telemetry.shed(
                reason=decision.reason or "shed", priority=priority, partition=partition
            )
        return decision

    def record_refusal(self, kind: str, partition: str | None) -> None:
        """Count a refusal made outside the guard (the middleware's), for ``stats()``."""
        self._parts.refusals.count(kind, partition)

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: pool, gate, refusals, quarantine, statements."""
        return self._view.snapshot()

    def quarantined(self) -> list[dict[str, Any]]:
        """The fingerprints refused right now, with when each will next be probed."""
        return self._view.quarantine()

    def release(self, fingerprint_or_sql: str) -> bool:
        """Release a quarantined statement by hand (its fingerprint id, or its SQL text)."""
        if not isinstance(fingerprint_or_sql, str) or not fingerprint_or_sql:
            raise TypeError(
                "release() takes a fingerprint id or the statement's SQL, got "
                f"{type(fingerprint_or_sql).__name__}"
            )
        fp_id = fingerprint_id(fingerprint_or_sql, self._parts.fingerprint)
        p = self._parts
        t = p.quarantine.release(fp_id, time.monotonic())
        if p.fleet is not None:
            p.fleet.released(fp_id)
        if t is not None:
            p.on_transition(t)
        return t is not None

    def close(self) -> None:
        """Remove every hook this guard installed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
        for target, name, fn in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()
        self._checkout.unpatch()
        p = self._parts
        if p.fleet is not None:
            p.fleet.close()
        p.telemetry.close()
        with _guards_lock:
            _guards.discard(self)
            if self.sync_engine.__dict__.get(_ENGINE_ATTR) is self:
                del self.sync_engine.__dict__[_ENGINE_ATTR]

    def __enter__(self) -> PoolGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def checked_out(self) -> int:
        """Connections this guard counts as checked out (0 when nothing leaked)."""
        return len(self._parts.held)

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        e, s, c = self.sync_engine, self._statements, self._checkout
        for name, fn, kw in (
            ("do_execute", s.on_do_execute, {}),
            ("do_executemany", s.on_do_executemany, {}),
            ("do_execute_no_params", s.on_do_execute_no_params, {}),
            ("handle_error", s.on_handle_error, {"retval": True}),
            ("connect", c.on_connect, {}),
            ("checkin", c.on_checkin, {}),
            ("detach", c.on_detach, {}),
        ):
            event.listen(e, name, fn, **kw)
            self._listeners.append((e, name, fn))
        c.patch(e.pool)


def _weak_pool_state(ref: weakref.ref[PoolGuard]) -> Callable[[], PoolState | None]:
    """The gauges' reader; weak, because a metrics SDK keeps its callbacks until the guard
    closes, and must not keep a dropped engine alive."""

    def read() -> PoolState | None:
        guard = ref()
        return guard._view.pool_state() if guard is not None else None

    return read
