"""PoolGuard: wires budgets, the gate, time-outs, quarantine and telemetry to one engine.

Where each part hooks in, and why there:

- The gate wraps the pool's ``connect`` (SQLAlchemy fires no event before a checkout
  waits) and is released by the pool's ``checkin`` and ``detach`` events, which fire for
  every way a checkout ends, including invalidation and garbage collection.
- Statements go through one ``do_execute`` listener (and its ``executemany`` and
  ``no_params`` siblings) that runs the statement itself: measured at 0.5 us per statement,
  against 3.6 us for a ``before``/``after_cursor_execute`` pair.
- ``handle_error`` turns a server-side time-out into :class:`QueryTimeout`, after
  SQLAlchemy has done its own bookkeeping for the failed statement.
- The default time-out is set once per new connection (pool ``connect`` event), so the
  steady state costs no round trip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from poolguard.core.budget import PRIORITY_RANK, Budget, BudgetScope, _check_seconds, scope_context
from poolguard.core.budget import _current as _scope_var
from poolguard.core.budget import current_scope as _current_scope
from poolguard.core.origin import checkout_origin
from poolguard.dialects import Enforcer, enforcer_for
from poolguard.errors import (
    BudgetExceeded,
    PoolGuardError,
    PoolSaturated,
    QueryQuarantined,
    QueryTimeout,
)
from poolguard.observe.alerts import Alert, Alerter, SaturationDetector, StormDetector
from poolguard.observe.fingerprint import Fingerprint, fingerprint
from poolguard.observe.stats import StatsRegistry
from poolguard.observe.telemetry import (
    PoolState,
    Telemetry,
    db_system_name,
    instrumented_by_opentelemetry,
)
from poolguard.policy.blame import Blocker, LockBlame, Victim
from poolguard.policy.gate import DEFAULT_PARTITION, Gate, Ticket
from poolguard.policy.quarantine import Quarantine, Transition
from poolguard.policy.shedding import CoDelShedder, Decision, estimate_retry_after

if TYPE_CHECKING:
    # Only for annotations: importing SQLAlchemy's asyncio extension needs greenlet, which a
    # core install (SQLAlchemy 2.1 no longer pulls it in) does not have.
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["PoolGuard", "active_guards"]

log = logging.getLogger("poolguard")

_guards: weakref.WeakKeyDictionary[Engine, PoolGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()

#: Capacity assumed for pools that do not bound themselves (NullPool, StaticPool...).
_UNBOUNDED_POOL_CAPACITY = 10
_READY = "poolguard.ready"
#: The server session id of a pooled connection, in its record's info (PostgreSQL pid,
#: MySQL/MariaDB connection id).
_PID_KEY = "poolguard.backend_pid"
_T = TypeVar("_T")
#: Partitions with a shedder of their own; further ones share the default partition's.
_MAX_SHEDDERS = 1000
#: Stands in for the budget scope while the pool creates a connection: statements run then
#: (the dialect's first-connect queries, users' connect listeners) are the connection's own.
_CONNECTING = BudgetScope(Budget())


@dataclass(eq=False)
class _Hold:
    """One checkout in flight: what the gate, the budget and the leak report need."""

    ticket: Ticket
    scope: BudgetScope | None
    since: float
    origin: tuple[CodeType, int] | None
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
        if self.origin is None:
            return "<unknown>"
        code, line = self.origin
        return f"{code.co_filename}:{line} in {code.co_name}"


def active_guards() -> list[PoolGuard]:
    """Every guard installed and not closed (the test suite's leak check reads it)."""
    with _guards_lock:
        return list(_guards.values())


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
    and a quarantine cancels the copies of its statement still running: a rogue lock holder
    is otherwise caught only after three of its own time-outs.

    Every option is described in docs/configuration.md.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        statement_timeout: float = 5.0,
        checkout_timeout: float = 1.0,
        hold_timeout: float = 30.0,
        reclaim_leaked: bool = False,
        blame_lock_holders: bool = True,
        cancel_quarantined: bool = True,
        capacity: int | None = None,
        critical_reserve: int | None = None,
        partition_share: float = 0.5,
        pg_timeout_mode: Literal["session", "transaction"] = "session",
        lock_timeout: float | Literal["auto"] | None = "auto",
        idle_in_transaction_timeout: float | None = None,
        quarantine_threshold: int = 3,
        quarantine_window: float = 60.0,
        quarantine_cooldown: float = 30.0,
        quarantine_allow: Iterable[str] = (),
        shed_target: float = 0.005,
        shed_interval: float = 0.1,
        trace_statements: Literal["all", "slow", "off"] = "all",
        slow_statement_threshold: float = 0.1,
        on_alert: Callable[[Alert], None] | None = None,
        alert_debounce: float = 60.0,
        pool_name: str | None = None,
        max_fingerprints: int = 1000,
        operation_metrics: bool = False,
        exception_events: bool = True,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        sync_engine = _sync_engine_of(engine)
        self.statement_timeout: float = _check_seconds(  # type: ignore[assignment]
            "statement_timeout", statement_timeout, allow_none=False
        )
        self.checkout_timeout: float = _check_seconds(  # type: ignore[assignment]
            "checkout_timeout", checkout_timeout, allow_none=False
        )
        self.hold_timeout: float = _check_seconds(  # type: ignore[assignment]
            "hold_timeout", hold_timeout, allow_none=False
        )
        if lock_timeout == "auto":
            # Shorter than the statement time-out, so a request stuck behind another's lock
            # fails as a lock wait (never quarantined) while the lock holder's own statement
            # is the one that hits statement_timeout and gets quarantined.
            lock_timeout = self.statement_timeout / 2
        _check_seconds("lock_timeout", lock_timeout)
        self.lock_timeout = lock_timeout
        _check_seconds("idle_in_transaction_timeout", idle_in_transaction_timeout)
        _check_seconds("slow_statement_threshold", slow_statement_threshold, allow_none=False)
        _check_seconds("alert_debounce", alert_debounce, allow_none=False)
        if pg_timeout_mode not in ("session", "transaction"):
            raise ValueError(
                f"pg_timeout_mode must be 'session' or 'transaction', got {pg_timeout_mode!r}"
            )
        if trace_statements not in ("all", "slow", "off"):
            raise ValueError(
                f"trace_statements must be 'all', 'slow' or 'off', got {trace_statements!r}"
            )
        if isinstance(partition_share, bool) or not isinstance(partition_share, (int, float)):
            raise TypeError(
                f"partition_share must be a float, got {type(partition_share).__name__}"
            )
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if (
            isinstance(max_fingerprints, bool)
            or not isinstance(max_fingerprints, int)
            or (max_fingerprints < 1)
        ):
            raise ValueError(f"max_fingerprints must be an int >= 1, got {max_fingerprints!r}")

        if not isinstance(reclaim_leaked, bool):
            raise TypeError(f"reclaim_leaked must be a bool, got {type(reclaim_leaked).__name__}")
        self.reclaim_leaked = reclaim_leaked
        for name, flag in (
            ("blame_lock_holders", blame_lock_holders),
            ("cancel_quarantined", cancel_quarantined),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.engine = engine
        self.sync_engine = sync_engine
        self._is_async = sync_engine.dialect.is_async
        pool = sync_engine.pool
        cap = capacity if capacity is not None else _pool_capacity(pool)
        if critical_reserve is None:
            critical_reserve = cap // 10 if cap >= 10 else (1 if cap >= 4 else 0)
        self.gate = Gate(cap, reserve=critical_reserve, max_share=float(partition_share))
        self.enforcer: Enforcer = enforcer_for(
            sync_engine.dialect,
            pg_mode=pg_timeout_mode,
            lock_timeout=lock_timeout,
            idle_in_transaction_timeout=idle_in_transaction_timeout,
        )
        self._baseline = self.enforcer.session_baseline
        #: Only where the server can say who blocks whom (PostgreSQL, MariaDB).
        self.blame_lock_holders = blame_lock_holders and self.enforcer.can_blame
        #: Also only where sessions have ids poolguard can name to the server.
        self.cancel_quarantined = cancel_quarantined and self.enforcer.can_blame
        self._track_pids = self.blame_lock_holders or self.cancel_quarantined
        self.enforcer.verify_ids = self._track_pids
        self._blame = LockBlame()
        with _option_prefix("quarantine_"):
            self.quarantine = Quarantine(
                threshold=quarantine_threshold,
                window=quarantine_window,
                cooldown=quarantine_cooldown,
                max_cooldown=max(600.0, quarantine_cooldown)
                if isinstance(quarantine_cooldown, (int, float))
                else 600.0,
            )
        if isinstance(quarantine_allow, str):
            raise TypeError(
                "quarantine_allow must be an iterable of fingerprints or SQL, not a str"
            )
        for item in quarantine_allow:
            self.quarantine.allow(_as_fingerprint_id(item))
        with _option_prefix("shed_"):
            CoDelShedder(target=shed_target, interval=shed_interval)  # validates both
        self.shed_target = float(shed_target)
        self.shed_interval = float(shed_interval)
        # One CoDel per partition: a route whose waiters queue because it is over its share
        # of the pool says nothing about the queue other routes see; shedding them for it
        # would turn one rogue route into an outage again.
        self._shedders: dict[str, CoDelShedder] = {}
        self._stats = StatsRegistry(max_fingerprints=max_fingerprints)
        self.pool_name = pool_name or _default_pool_name(sync_engine)
        self.telemetry = Telemetry(
            pool_name=self.pool_name,
            db_system=db_system_name(sync_engine.dialect),
            pool_state=self._pool_state,
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
            trace_statements=trace_statements,
            slow_statement_threshold=slow_statement_threshold,
            # opentelemetry-instrumentation-sqlalchemy already traces statements: never twice.
            statement_spans=not instrumented_by_opentelemetry(sync_engine),
            operation_metrics=operation_metrics,
            exception_events=exception_events,
        )
        self.alerts = Alerter(on_alert, debounce=alert_debounce)
        #: Zero waits belong in the wait-time histogram too, but only cost anything with an SDK.
        self._wait_metric = True
        self._saturation = SaturationDetector()
        self._storm = StormDetector(threshold=max(10, 2 * cap))
        self._held: dict[Any, _Hold] = {}
        self._token = object()
        self._leaks_reported = 0
        self._cancelled_total = 0
        self._closed = False
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        self._patched_pools: weakref.WeakSet[Pool] = weakref.WeakSet()

        with _guards_lock:
            if sync_engine in _guards:
                raise RuntimeError(
                    "engine already has a PoolGuard installed; close() it before installing another"
                )
            _guards[sync_engine] = self
        try:
            self._install()
        except BaseException:
            with _guards_lock:
                _guards.pop(sync_engine, None)
            raise
        self._stop = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"poolguard-watchdog[{self.pool_name}]", daemon=True
        )
        self._watchdog.start()

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
        every guarded engine used inside it honours it.
        """
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
        rank = PRIORITY_RANK[priority]
        now = time.monotonic()
        g = self.gate
        p = partition or DEFAULT_PARTITION
        decision = self._shedder(p).decide(
            rank,
            now,
            oldest_wait=g.oldest_wait(now, p),
            waiting=g.waiting_in(p),
            capacity=g.capacity,
            drain_rate=g.drain_rate(now),
        )
        if not decision.admit:
            self.telemetry.shed(
                reason=decision.reason or "shed", priority=priority, partition=partition
            )
        return decision

    def _shedder(self, partition: str) -> CoDelShedder:
        s = self._shedders.get(partition)
        if s is None:
            if len(self._shedders) >= _MAX_SHEDDERS:  # partitions named without bound
                partition = DEFAULT_PARTITION
            s = self._shedders.setdefault(
                partition, CoDelShedder(target=self.shed_target, interval=self.shed_interval)
            )
        return s

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: pool, gate, quarantine and per-statement statistics."""
        now = time.monotonic()
        g = self.gate.snapshot()
        ps = self._pool_state()
        return {
            "pool": {
                "name": self.pool_name,
                "dialect": self.sync_engine.dialect.name,
                "capacity": g.capacity,
                "used": ps.used,
                "idle": ps.idle,
            },
            "gate": {
                "capacity": g.capacity,
                "critical_reserve": g.reserve,
                "partition_cap": g.partition_cap,
                "held": g.held,
                "waiting": g.waiting,
                "held_by_partition": g.held_by_partition,
                "waiting_by_partition": g.waiting_by_partition,
                "granted_total": g.granted_total,
                "timeouts_total": g.timeouts_total,
            },
            "settings": {
                "statement_timeout": self.statement_timeout,
                "checkout_timeout": self.checkout_timeout,
                "hold_timeout": self.hold_timeout,
                "timeout_enforcement": self.enforcer.name,
            },
            "shedding": {"levels": {p: sh.level(now) for p, sh in list(self._shedders.items())}},
            "leaks_reported": self._leaks_reported,
            "lock_holders_blamed": self._blame.blamed,
            "quarantined_cancelled": self._cancelled_total,
            "quarantine": [_entry_dict(e) for e in self.quarantine.entries(now)],
            "statements": self._stats.snapshot(),
        }

    def quarantined(self) -> list[dict[str, Any]]:
        """The fingerprints refused right now, with when each will next be probed."""
        return [_entry_dict(e) for e in self.quarantine.entries(time.monotonic())]

    def release(self, fingerprint_or_sql: str) -> bool:
        """Release a quarantined statement by hand (its fingerprint id, or its SQL text)."""
        t = self.quarantine.release(_as_fingerprint_id(fingerprint_or_sql), time.monotonic())
        if t is not None:
            self._on_transition(t)
        return t is not None

    def close(self) -> None:
        """Remove every hook this guard installed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for target, name, fn in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()
        for pool in list(self._patched_pools):
            pool.__dict__.pop("connect", None)
            pool.__dict__.pop("recreate", None)
        self._patched_pools.clear()
        self.telemetry.close()
        with _guards_lock:
            if _guards.get(self.sync_engine) is self:
                del _guards[self.sync_engine]
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=2)

    def __enter__(self) -> PoolGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def checked_out(self) -> int:
        """Connections this guard counts as checked out (0 when nothing leaked)."""
        return len(self._held)

    # -- installation -------------------------------------------------------------------------
    def _listen(self, target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        self._listeners.append((target, name, fn))

    def _install(self) -> None:
        e = self.sync_engine
        self._listen(e, "do_execute", self._on_do_execute)
        self._listen(e, "do_executemany", self._on_do_executemany)
        self._listen(e, "do_execute_no_params", self._on_do_execute_no_params)
        self._listen(e, "handle_error", self._on_handle_error, retval=True)
        self._listen(e, "connect", self._on_connect)
        self._listen(e, "checkin", self._on_checkin)
        self._listen(e, "detach", self._on_detach)
        # No Connection/Engine-level listener here, on purpose: any one of them switches on
        # SQLAlchemy's event plumbing for every execute and every Connection (measured:
        # +6 us per statement, +20 us per checkout). Pool and dialect events do not.
        self._patch_pool(e.pool)

    def _patch_pool(self, pool: Pool) -> None:
        """Put the gate in front of ``pool.connect``, and follow ``Engine.dispose()``, which
        replaces the pool with ``pool.recreate()`` (its events move to the new pool; an
        instance attribute does not)."""
        cls = type(pool)
        original_connect = cls.connect.__get__(pool)
        original_recreate = cls.recreate.__get__(pool)
        guard = self

        def connect() -> Any:
            return guard._checkout(original_connect)

        def recreate() -> Pool:
            new: Pool = original_recreate()
            if not guard._closed:
                guard._patch_pool(new)
            return new

        pool.connect = connect  # type: ignore[method-assign]
        pool.recreate = recreate  # type: ignore[method-assign]
        self._patched_pools.add(pool)

    # -- checkout -----------------------------------------------------------------------------
    def _checkout(self, original: Callable[[], Any]) -> Any:
        scope = _current_scope()
        if scope is _CONNECTING:  # a connect listener checking out another connection
            scope = None
        if scope is not None:
            partition = scope.partition or DEFAULT_PARTITION
            rank = PRIORITY_RANK[scope.priority]
            scope.admit_connection()
        else:
            partition, rank = DEFAULT_PARTITION, 1
        try:
            ticket = self.gate.try_acquire(partition, rank)
            now = time.monotonic()
            if ticket is None:
                ticket = self._wait_for_slot(scope, partition, rank, now)
            else:
                if rank:
                    # Critical work skips the queue (reserve, priority), so its near-zero
                    # waits say nothing about the queue: only other work's waits feed CoDel.
                    self._shedder(partition).observe(0.0, now)
                if self._wait_metric:
                    t = time.time_ns()
                    self.telemetry.pool_wait(
                        t, t, partition=partition, priority=_PRIORITY_NAME[rank], acquired=True
                    )
            # Statements run while connecting (the dialect's first-connect queries, users'
            # connect listeners) belong to the connection, not to the caller's budget.
            token = _scope_var.set(_CONNECTING)
            try:
                fairy = original()
            except sa_exc.TimeoutError as err:
                self.gate.release(ticket)
                raise PoolSaturated(
                    waited=time.monotonic() - now,
                    limit=self.checkout_timeout,
                    reason="pool_timeout",
                    partition=partition,
                ) from err
            except BaseException:
                self.gate.release(ticket)
                raise
            finally:
                _scope_var.reset(token)
        except BaseException:
            if scope is not None:
                scope.release_connection()
            raise
        record = fairy._connection_record
        if record in self._held:
            # SingletonThreadPool and StaticPool hand one connection to overlapping
            # checkouts; it is returned once, so only the first checkout holds a slot.
            self.gate.release(ticket)
            if scope is not None:
                scope.release_connection()
            return fairy
        self._held[record] = _Hold(ticket, scope, ticket.acquired_at, checkout_origin())
        info = fairy.info
        if info.get(_READY) is not self._token:
            self._prepare_connection(fairy, info, now)
        return fairy

    def _prepare_connection(self, fairy: Any, info: dict[Any, Any], now: float) -> None:
        """Install the default time-out on a connection this guard has not seen yet.

        Done at its first checkout rather than in the ``connect`` event so that connections
        pooled before the guard was installed are covered too; the record's info is cleared
        whenever its DBAPI connection is replaced, so the marker cannot outlive it.
        """
        try:
            self.enforcer.on_connect(fairy.dbapi_connection, info, self.statement_timeout)
        except BaseException:
            fairy.invalidate()
            fairy.close()
            raise
        if self._track_pids:
            info[_PID_KEY] = self.enforcer.backend_pid(fairy.dbapi_connection, info)
        info[_READY] = self._token
        if info.pop("poolguard.created_at", None) is not None:
            self.telemetry.connection_created(time.monotonic() - now)

    def _wait_for_slot(
        self, scope: BudgetScope | None, partition: str, rank: int, now: float
    ) -> Ticket:
        limit, reason = self.checkout_timeout, "checkout_timeout"
        if scope is not None and scope.deadline_at is not None:
            left = scope.deadline_at - now
            if left < limit:
                limit, reason = max(0.0, left), "deadline"
        start_ns = time.time_ns()
        if self._is_async and in_greenlet():
            ticket = await_only(self.gate.acquire_async(partition, rank, limit))
        else:
            ticket = self.gate.acquire(partition, rank, limit)
        end_ns = time.time_ns()
        priority = _PRIORITY_NAME[rank]
        self.telemetry.pool_wait(
            start_ns, end_ns, partition=partition, priority=priority, acquired=ticket is not None
        )
        waited = (end_ns - start_ns) / 1e9
        if rank:
            self._shedder(partition).observe(waited, time.monotonic())
        if scope is not None:
            scope.record_pool_wait(waited)
        if ticket is None:
            err = PoolSaturated(
                waited=waited,
                limit=limit,
                reason=reason,
                partition=partition,
                retry_after=self._retry_after(),
            )
            self.telemetry.refusal(err, kind="saturated", partition=partition)
            raise err
        return ticket

    def _retry_after(self) -> float:
        g = self.gate
        return estimate_retry_after(g.waiting, g.drain_rate(time.monotonic()))

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        hold = self._held.pop(record, None)
        if hold is not None:
            self._end_hold(hold)
        if self.enforcer.tracks_transactions:
            self.enforcer.on_transaction_end(record.info)

    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        hold = self._held.pop(record, None)
        if hold is not None:
            self._end_hold(hold)

    def _end_hold(self, hold: _Hold) -> None:
        self.gate.release(hold.ticket)
        if hold.scope is not None:
            hold.scope.release_connection()
        used = time.monotonic() - hold.since
        self.telemetry.connection_used(used)
        if hold.fp is not None:
            self._stats.record_hold(hold.fp, used)
        if hold.reported:
            log.info("connection checked out at %s returned after %.1f s", hold.where, used)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        now = time.monotonic()
        record.info["poolguard.created_at"] = now
        if self._storm.observe(now):
            self.alerts.emit(
                "connection_storm",
                self.pool_name,
                f"connection storm on pool {self.pool_name}: more than "
                f"{self._storm.threshold} new connections within {self._storm.window:g} s",
                {"pool": self.pool_name, "threshold": self._storm.threshold},
                now,
            )

    # -- statements ---------------------------------------------------------------------------
    def _on_do_execute(
        self, cursor: DBAPICursor, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._run(cursor, statement, parameters, context, 0)

    def _on_do_executemany(
        self, cursor: DBAPICursor, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._run(cursor, statement, parameters, context, 1)

    def _on_do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext
    ) -> bool:
        return self._run(cursor, statement, None, context, 2)

    def _run(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext,
        how: int,
    ) -> bool:
        scope = _current_scope()
        if scope is _CONNECTING:
            return False  # let SQLAlchemy run it as if poolguard were not there
        fp = fingerprint(statement)
        now = time.monotonic()
        q = self.quarantine
        if q.active:
            wait = q.check(fp.id, now)
            if wait is not None:
                self._refuse_quarantined(fp, wait, scope)
        default = self.statement_timeout
        if scope is None:
            timeout: float | None = default
        else:
            try:
                timeout = scope.admit_statement(default, now)
            except BudgetExceeded as err:
                if q.active:  # it may have been let through as a quarantine probe
                    q.record_error(fp.id, now)
                self._stats.record_refusal(fp, "budget")
                self.telemetry.refusal(
                    err, kind="budget", partition=scope.partition, fingerprint=fp
                )
                raise
        if timeout != default or not self._baseline:
            try:
                statement = self.enforcer.prepare(cursor, statement, timeout, context)
            except BaseException:
                if q.active:
                    q.record_error(fp.id, now)
                raise
        dialect = context.dialect
        hold = self._held.get(context._dbapi_connection._connection_record)  # type: ignore[attr-defined]
        if hold is not None:
            hold.running = fp
            hold.running_since = now
        t0 = time.time_ns()
        try:
            if how == 0:
                dialect.do_execute(cursor, statement, parameters, context)
            elif how == 1:
                dialect.do_executemany(cursor, statement, parameters, context)
            else:
                dialect.do_execute_no_params(cursor, statement, context)
        except BaseException as err:
            cancelled = False
            if hold is not None:
                hold.running = None
                cancelled, hold.cancelled = hold.cancelled, False
            self._statement_failed(err, fp, timeout, t0, scope, context, cancelled)
            raise
        t1 = time.time_ns()
        elapsed = (t1 - t0) / 1e9
        self._stats.record(fp, elapsed)
        if scope is not None:
            scope.record_statement(elapsed)
        if q.active:
            t = q.record_success(fp.id, now)
            if t is not None:
                self._on_transition(t)
        if hold is not None:
            hold.running = None
            hold.cancelled = False  # a cancel that came too late found nothing to stop
            hold.fp = fp
        self.telemetry.statement(
            fp, t0, t1, partition=scope.partition if scope else None, timeout=timeout, error=None
        )
        return True

    def _refuse_quarantined(self, fp: Fingerprint, wait: float, scope: BudgetScope | None) -> None:
        partition = scope.partition if scope is not None else None
        err = QueryQuarantined(
            fingerprint=fp.id, summary=fp.summary, retry_after=wait, partition=partition
        )
        self._stats.record_refusal(fp, "quarantined")
        self.telemetry.refusal(err, kind="quarantined", partition=partition, fingerprint=fp)
        raise err

    def _statement_failed(
        self,
        err: BaseException,
        fp: Fingerprint,
        timeout: float | None,
        t0: int,
        scope: BudgetScope | None,
        context: ExecutionContext,
        cancelled: bool = False,
    ) -> None:
        t1 = time.time_ns()
        elapsed = (t1 - t0) / 1e9
        cause = self.enforcer.classify(err)
        if cancelled and self.enforcer.was_cancelled(err):
            cause = "quarantined"  # stopped by poolguard's cancel: no time-out of its own
        timed_out = cause is not None
        self._stats.record(fp, elapsed, error=True, timeout=timed_out)
        if scope is not None:
            scope.record_statement(elapsed, timed_out=timed_out)
        now = time.monotonic()
        partition = scope.partition if scope is not None else None
        if cause is not None:
            enforcer = self.enforcer
            limit = (enforcer.lock_timeout_for(timeout) if cause == "lock" else timeout) or elapsed
            context._poolguard_timeout = (fp, limit, elapsed, partition, cause)  # type: ignore[attr-defined]
            # Only a time-out that cannot have been a lock wait earns a strike: the victims
            # of a lock holder must not be quarantined in its place.
            if cause == "quarantined":
                pass  # its breaker is open already
            elif cause == "statement" and enforcer.timeout_is_own(timeout):
                t = self.quarantine.record_timeout(fp.id, fp.summary, now)
                if t is not None:
                    self._on_transition(t)
            elif self.quarantine.active:
                self.quarantine.record_error(fp.id, now)
            if cause == "lock" and self.blame_lock_holders:
                self._blame_lock_holders(waited_since=now - elapsed)
        elif self.quarantine.active:
            self.quarantine.record_error(fp.id, now)
        self.telemetry.statement(fp, t0, t1, partition=partition, timeout=timeout, error=err)

    def _blame_lock_holders(self, waited_since: float) -> None:
        """A victim's lock wait ended: strike the statement of ours that kept it waiting.
        Best effort: a failure to ask the server costs the victim nothing more."""
        running = []
        for record, hold in list(self._held.items()):
            fp = hold.running
            pid = record.info.get(_PID_KEY)
            if fp is not None and pid is not None:
                running.append(Blocker(pid, fp.id, fp.summary, hold.running_since))
        if not running:
            return  # none of ours is running a statement: nothing to ask the server
        now = time.monotonic()
        try:
            blamed = self._blame.judge(
                Victim(waited_since, now, tuple(running)), now, self._ask_blocking_pids
            )
        except Exception as e:
            log.debug("poolguard: could not ask which sessions block others: %s", type(e).__name__)
            return
        for culprit in blamed:
            self._blame.blamed += 1
            t = self.quarantine.record_timeout(culprit.fingerprint, culprit.summary, now)
            if t is not None:
                self._on_transition(t)

    def _ask_blocking_pids(self) -> list[int]:
        return self._on_own_connection(self.enforcer.blocking_pids)

    def _on_own_connection(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work`` on a DBAPI connection of poolguard's own, outside the pool and the
        gate: the connections in the pool belong to the application (a victim's transaction
        is aborted and is the application's to roll back). The pool's creator runs the
        engine's do_connect hooks (credentials providers) as for any connection."""
        if self._is_async and not in_greenlet():
            raise RuntimeError("an async driver connects only inside SQLAlchemy's greenlet")
        raw = self.sync_engine.pool._invoke_creator(None)  # type: ignore[arg-type]
        try:
            return work(raw)
        finally:
            raw.close()

    def _cancel_running(self, fingerprint: str) -> None:
        """Cancel the executions of a just-quarantined statement that are still running on
        this guard's connections: each holds a connection, maybe locks, until its own
        time-out, which is exactly the harm the quarantine is there to stop. Best effort."""
        pids = []
        for record, hold in list(self._held.items()):
            fp = hold.running
            pid = record.info.get(_PID_KEY)
            if fp is not None and fp.id == fingerprint and pid is not None:
                hold.cancelled = True
                pids.append(pid)
        if not pids:
            return
        try:
            self._on_own_connection(lambda raw: self.enforcer.cancel_backends(raw, pids))
        except Exception as e:
            log.debug("poolguard: could not cancel quarantined statements: %s", type(e).__name__)
            return
        self._cancelled_total += len(pids)

    def _on_handle_error(self, ctx: Any) -> BaseException | None:
        info = getattr(ctx.execution_context, "_poolguard_timeout", None)
        if info is None:
            return None
        fp, timeout, elapsed, partition, cause = info
        err = QueryTimeout(
            fingerprint=fp.id,
            summary=fp.summary,
            normalized=fp.normalized,
            timeout=timeout,
            elapsed=elapsed,
            orig=ctx.original_exception,
            partition=partition,
            cause=cause,
        )
        kind = "cancelled" if cause == "quarantined" else "timeout"
        self.telemetry.refusal(err, kind=kind, partition=partition, fingerprint=fp, timeout=timeout)
        return err

    def _on_transition(self, t: Transition) -> None:
        self.telemetry.quarantine(t)
        kind: Literal["quarantine_opened", "quarantine_closed"] = (
            "quarantine_closed" if t.kind == "closed" else "quarantine_opened"
        )
        verb = {"opened": "quarantined", "reopened": "quarantined again", "closed": "released"}
        self.alerts.emit(
            kind,
            t.fingerprint,
            f"statement {t.summary} [{t.fingerprint}] {verb[t.kind]}"
            + (f" for {t.cooldown:.0f} s after {t.timeouts} time-outs" if t.cooldown else ""),
            {"fingerprint": t.fingerprint, "summary": t.summary, "cooldown": t.cooldown},
            time.monotonic(),
        )
        if t.kind != "closed" and self.cancel_quarantined:
            self._cancel_running(t.fingerprint)

    # -- watchdog -----------------------------------------------------------------------------
    def _watch(self) -> None:
        """Reports leaks and sustained saturation: work that must not sit on any request."""
        period = min(1.0, self.hold_timeout / 4)
        while not self._stop.wait(period):
            try:
                self._scan(time.monotonic())
            except Exception:  # pragma: no cover - the watchdog must never die
                log.exception("poolguard watchdog failed")

    def _scan(self, now: float) -> None:
        for record, hold in list(self._held.items()):
            if not hold.reported and now - hold.since > self.hold_timeout:
                hold.reported = True
                self._leaks_reported += 1
                summary = hold.fp.summary if hold.fp is not None else "no statement yet"
                partition = hold.ticket.partition
                msg = (
                    f"connection held {now - hold.since:.1f} s (hold_timeout "
                    f"{self.hold_timeout:g} s), checked out at {hold.where}, partition "
                    f"{partition}, last statement {summary}"
                )
                self.telemetry.refusal(
                    PoolGuardError(msg), kind="leak", partition=partition, fingerprint=hold.fp
                )
                alerted = self.alerts.emit(
                    "leak",
                    hold.where,
                    msg,
                    {"where": hold.where, "partition": partition, "summary": summary},
                    now,
                )
                if not alerted:  # debounced: every leak still gets its one WARNING line
                    log.warning(msg)
                if self.reclaim_leaked:
                    self._reclaim(record)
        g = self.gate
        saturated = g.waiting > 0 and g.oldest_wait(now) > self.shed_target
        if self._saturation.observe(saturated, now):
            self.alerts.emit(
                "saturation",
                self.pool_name,
                f"pool {self.pool_name} saturated: {g.waiting} waiting, {g.held} of "
                f"{g.capacity} connections in use",
                {"pool": self.pool_name, "waiting": g.waiting, "held": g.held},
                now,
            )

    def _reclaim(self, record: Any) -> None:
        """Close a leaked connection's DBAPI connection so the server ends its session.

        The server then rolls back its transaction and frees its locks: what hurts other
        requests. The pool slot stays counted until the holder returns (or drops) the
        connection, whose next use fails as a disconnect, so no one is handed a connection
        that another caller still holds. Async drivers need their event loop to close a
        connection, which this thread does not have: there the leak is only reported.
        """
        if self._is_async:
            log.warning("reclaim_leaked: cannot close an asyncio connection from the watchdog")
            return
        try:
            record.invalidate()
        except Exception as e:  # the driver may complain about a connection in use
            log.warning(
                "reclaim_leaked: closing the leaked connection failed: %s", type(e).__name__
            )

    # -- helpers ------------------------------------------------------------------------------
    def _pool_state(self) -> PoolState:
        pool = self.sync_engine.pool
        used = self.gate.held
        idle = pool.checkedin() if isinstance(pool, QueuePool) else 0
        idle_max = pool.size() if isinstance(pool, QueuePool) else self.gate.capacity
        return PoolState(
            idle=idle,
            used=used,
            max=self.gate.capacity,
            idle_max=idle_max,
            idle_min=0,
            pending=self.gate.waiting,
        )


_PRIORITY_NAME = {v: k for k, v in PRIORITY_RANK.items()}


@contextlib.contextmanager
def _option_prefix(prefix: str) -> Iterator[None]:
    """Re-raise a component's validation error under the guard's option name."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{prefix}{e}") from None


def _sync_engine_of(engine: object) -> Engine:
    """The Engine behind ``engine``. An AsyncEngine can only exist once SQLAlchemy's asyncio
    extension was imported, so it is looked up in ``sys.modules`` rather than imported."""
    if isinstance(engine, Engine):
        return engine
    ext = sys.modules.get("sqlalchemy.ext.asyncio")
    if ext is not None and isinstance(engine, ext.AsyncEngine):
        _require_greenlet()
        sync: Engine = engine.sync_engine
        return sync
    raise TypeError(
        f"engine must be a sqlalchemy Engine or AsyncEngine, got {type(engine).__name__}"
    )


def _require_greenlet() -> None:
    if importlib.util.find_spec("greenlet") is None:
        raise ImportError(
            "guarding an AsyncEngine needs greenlet: pip install 'poolguard[asyncio]' "
            "(or 'sqlalchemy[asyncio]')"
        )


def _pool_capacity(pool: Pool) -> int:
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow
        if overflow < 0:
            return max(pool.size(), _UNBOUNDED_POOL_CAPACITY)
        return pool.size() + overflow
    return _UNBOUNDED_POOL_CAPACITY


def _default_pool_name(engine: Engine) -> str:
    url = engine.url
    host = url.host or ""
    port = f":{url.port}" if url.port else ""
    db = url.database or ""
    return f"{host}{port}/{db}" if host else f"{url.get_backend_name()}:{db or 'memory'}"


def _as_fingerprint_id(item: str) -> str:
    if len(item) == 16 and all(c in "0123456789abcdef" for c in item):
        return item
    return fingerprint(item).id


def _entry_dict(e: Any) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "fingerprint": e.fingerprint,
        "summary": e.summary,
        "state": e.state,
        "retry_in": round(max(0.0, e.retry_at - now), 3),
        "trips": e.trips,
    }
