"""The checkout path: the gate in front of ``pool.connect`` and the pool events behind it.

SQLAlchemy fires no event before a checkout waits, so the gate wraps the pool's ``connect``
(an instance attribute, which ``Engine.dispose()``'s ``recreate()`` is followed to); the
gate slot is given back by the pool's ``checkin`` and ``detach`` events, which fire for every
way a checkout ends, including invalidation and garbage collection. Pool events cost
nothing measurable; no Connection-level event is used (any one of them switches on
SQLAlchemy's per-execute event plumbing: +6 us per statement, +20 us per checkout).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from poolguard.core.budget import PRIORITIES, PRIORITY_RANK, BudgetScope
from poolguard.core.budget import _current as _scope_var
from poolguard.core.holds import ConnState, Hold, conn_state
from poolguard.core.origin import checkout_origin
from poolguard.errors import PoolSaturated
from poolguard.observe.telemetry import METER_PROVIDER
from poolguard.policy.gate import DEFAULT_PARTITION, Gate
from poolguard.policy.shedding import estimate_retry_after

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["CheckoutPath"]


class CheckoutPath:
    """Gates every checkout, records it as a :class:`Hold`, and prepares new connections."""

    def __init__(self, parts: Parts) -> None:
        self.p = parts
        self.gate: Gate = parts.gate
        self.held: dict[Any, Hold] = parts.held
        self.checkout_timeout = parts.config.timeouts.checkout_timeout
        self.telemetry = parts.telemetry
        self._patched: weakref.WeakSet[Pool] = weakref.WeakSet()
        #: The enforcer's, read once: it is fixed for the guard's life.
        self.tracks_transactions = parts.enforcer.tracks_transactions
        self.closed = False

    # -- installing on the pool -------------------------------------------------------------
    def patch(self, pool: Pool) -> None:
        """Put the gate in front of ``pool.connect`` and follow ``pool.recreate()``.

        A pool that ``recreate()`` made for another engine (``copy.copy(engine)`` then
        ``dispose()`` on the copy) is not the guarded engine's: it is passed through, so two
        pools never share one gate's capacity.
        """
        cls = type(pool)
        original_connect = cls.connect.__get__(pool)
        original_recreate = cls.recreate.__get__(pool)
        engine = self.p.engine
        checkout = self.checkout

        def connect() -> Any:
            if engine.pool is not pool:
                return original_connect()
            return checkout(original_connect)

        def recreate() -> Pool:
            new: Pool = original_recreate()
            if not self.closed:
                self.patch(new)
            return new

        pool.connect = connect  # type: ignore[method-assign]
        pool.recreate = recreate  # type: ignore[method-assign]
        self._patched.add(pool)

    def unpatch(self) -> None:
        self.closed = True
        for pool in list(self._patched):
            pool.__dict__.pop("connect", None)
            pool.__dict__.pop("recreate", None)
        self._patched.clear()

    # -- the checkout -------------------------------------------------------------------------
    def checkout(self, original: Callable[[], Any]) -> Any:
        scope = _scope_var.get()
        if scope is not None:
            partition = scope.partition or DEFAULT_PARTITION
            rank = PRIORITY_RANK[scope.priority]
            scope.admit_connection()
        else:
            partition, rank = DEFAULT_PARTITION, 1
        # The slot is tracked by the hold (no Ticket): the hold is popped from ``held``
        # exactly once, which gives the slot back exactly once.
        gate = self.gate
        try:
            since = gate.grant_now(partition, rank)
            if since is None:
                now = time.monotonic()
                since = self._wait(scope, partition, rank, now)
            else:
                now = since
                if rank:
                    # Critical work skips the queue (reserve, priority), so its near-zero
                    # waits say nothing about the queue: only other work's waits feed CoDel.
                    # A zero wait changes only a shedder whose queue stands (it ends the
                    # episode).
                    shedder = self.p.shedders.get(partition) or self.p.shedder(partition)
                    if shedder.standing:
                        shedder.observe(0.0, now)
                # Zero waits belong in the wait-time histogram too, when a meter records.
                tel = self.telemetry
                if tel.metered or (
                    tel.meter_pending
                    and tel.metrics_api[METER_PROVIDER] is not None
                    and tel.went_live()
                ):
                    tel.no_wait(partition=partition, priority=PRIORITIES[rank])
            try:
                fairy = original()
            except sa_exc.TimeoutError as err:
                gate.release_slot(partition)
                raise PoolSaturated(
                    waited=time.monotonic() - now,
                    limit=self.checkout_timeout,
                    reason="pool_timeout",
                    partition=partition,
                ) from err
            except BaseException as err:
                gate.release_slot(partition)
                if isinstance(err, Exception):  # not a cancel or Ctrl-C: the connect failed
                    self.p.connection_failed(time.monotonic())
                raise
        except BaseException:
            if scope is not None:
                scope.release_connection()
            raise
        record = fairy._connection_record
        if record in self.held:
            # SingletonThreadPool and StaticPool hand one connection to overlapping
            # checkouts; it is returned once, so only the first checkout holds a slot.
            gate.release_slot(partition)
            if scope is not None:
                scope.release_connection()
            return fairy
        state = conn_state(record)
        self.held[record] = Hold(partition, scope, since, checkout_origin(), state)
        if state.owner is not self.p.identity:
            self._prepare(fairy, record, state, now)
        return fairy

    def _prepare(self, fairy: Any, record: Any, state: ConnState, now: float) -> None:
        """Install the default time-out on a connection this guard has not seen yet.

        Done at its first checkout rather than in the ``connect`` event so that connections
        pooled before the guard was installed are covered too.
        """
        p = self.p
        try:
            p.enforcer.on_connect(
                fairy.dbapi_connection, state.info, p.config.timeouts.statement_timeout
            )
        except BaseException:
            fairy.invalidate()
            fairy.close()
            raise
        if p.track_pids:
            state.backend_pid = p.enforcer.backend_pid(fairy.dbapi_connection, state.info)
        state.owner = p.identity
        if state.created_at is not None:
            p.telemetry.connection_created(time.monotonic() - state.created_at)
            state.created_at = None

    def _wait(self, scope: BudgetScope | None, partition: str, rank: int, now: float) -> float:
        """Wait for a slot (borrowing one from the fleet first); returns when it was granted."""
        limit, reason = self.checkout_timeout, "checkout_timeout"
        if scope is not None and scope.deadline_at is not None:
            left = scope.deadline_at - now
            if left < limit:
                limit, reason = max(0.0, left), "deadline"
        p = self.p
        is_async = p.is_async and in_greenlet()
        fleet = p.fleet
        if fleet is not None and (await_only(fleet.borrow_async()) if is_async else fleet.borrow()):
            granted = self.gate.grant_now(partition, rank)
            if granted is not None:
                return granted
        start_ns = time.time_ns()
        if is_async:
            got = await_only(self.gate.acquire_async(partition, rank, limit))
        else:
            got = self.gate.acquire(partition, rank, limit)
        end_ns = time.time_ns()
        priority = PRIORITIES[rank]
        p.telemetry.pool_wait(
            start_ns, end_ns, partition=partition, priority=priority, acquired=got is not None
        )
        waited = (end_ns - start_ns) / 1e9
        if rank:
            p.shedder(partition).observe(waited, time.monotonic())
        if scope is not None:
            scope.record_pool_wait(waited)
        if got is None:
            g = self.gate
            err = PoolSaturated(
                waited=waited,
                limit=limit,
                reason=reason,
                partition=partition,
                retry_after=estimate_retry_after(g.waiting, g.drain_rate(time.monotonic())),
            )
            p.refused(err, "saturated", partition)
            raise err
        return got.acquired_at

    # -- the end of a checkout ----------------------------------------------------------------
    def on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        hold = self.release(record)
        if self.tracks_transactions:
            state = hold.conn if hold is not None else record.__dict__.get("_poolguard_state")
            if state is not None:
                self.p.enforcer.on_transaction_end(state.info)

    def on_detach(self, dbapi_connection: Any, record: Any) -> None:
        self.release(record)

    def release(self, record: Any) -> Hold | None:
        """End ``record``'s checkout, if it is one of ours; returns its hold."""
        hold = self.held.pop(record, None)
        if hold is None:
            return None
        self.gate.release_slot(hold.partition)
        if hold.scope is not None:
            hold.scope.release_connection()
        # How long it was held matters only to a meter, a statement's row and a leak's
        # report: a checkout that ran no statement, unmetered, reads no clock.
        fp = hold.fp
        metered = self.telemetry.metered  # brought up to date by the checkout
        if fp is None and not metered and not hold.reported:
            return hold
        used = time.monotonic() - hold.since
        p = self.p
        if metered:
            p.telemetry.connection_used(used)
        if fp is not None:
            p.stats.record_hold(fp, used)
        if hold.reported:
            p.log.info("connection checked out at %s returned after %.1f s", hold.where, used)
        return hold

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        now = time.monotonic()
        # A storm sign unless it is a QueuePool growing within its own bound (a burst
        # opening the overflow): a record that had a connection before is reconnecting
        # (its connection was invalidated), and a pool that keeps nothing (NullPool) opens
        # a server session for every checkout.
        pool = self.p.engine.pool
        growing = (
            isinstance(pool, QueuePool)
            and "_poolguard_state" not in record.__dict__
            and pool.size() + pool.overflow() <= self.gate.capacity
        )
        conn_state(record).created_at = now
        self.p.connection_opened(now, reconnect=not growing)
