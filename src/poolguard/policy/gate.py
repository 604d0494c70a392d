"""A bounded, fair wait in front of the connection pool.

SQLAlchemy fires no event before a checkout waits, and its pool waits up to 30 s in one
FIFO for everybody. The gate owns the wait instead: it counts the pool's capacity in slots,
grants them by priority class and first come first served, caps how many one partition
(a route, say) may hold while others wait, keeps a reserve for critical work, and never
lets a waiter wait longer than it was told. Sync waiters park on a lock; async waiters on
a future of their own event loop, so the loop is never blocked.

The state is guarded by one ``threading.Lock`` held only for a few dict operations, so it
is safe to share between threads and event loops.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from poolguard.core.budget import PRIORITY_RANK
from poolguard.policy.parking import park as _park
from poolguard.policy.parking import park_async as _park_async

__all__ = ["DEFAULT_PARTITION", "Gate", "GateSnapshot", "Ticket"]

DEFAULT_PARTITION = "default"
#: Seconds after its last grant during which a partition counts as active.
ACTIVE = 1.0
_MAX_TRACKED = 1024
_CRITICAL = PRIORITY_RANK["critical"]


class Ticket:
    """One held slot. Release it exactly once (:meth:`Gate.release` is idempotent)."""

    __slots__ = ("acquired_at", "partition", "rank", "released", "waited")

    def __init__(self, partition: str, rank: int, waited: float, acquired_at: float) -> None:
        self.partition = partition
        self.rank = rank
        self.waited = waited
        self.acquired_at = acquired_at
        self.released = False


class _Waiter:
    __slots__ = ("enqueued_at", "future", "granted", "lock", "loop", "partition", "rank", "thread")

    def __init__(self, partition: str, rank: int, now: float) -> None:
        self.partition = partition
        self.rank = rank
        self.enqueued_at = now
        self.granted = False
        self.lock: threading.Lock | None = None
        self.future: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0


@dataclass(frozen=True)
class GateSnapshot:
    capacity: int
    reserve: int
    partition_cap: int
    held: int
    waiting: int
    held_by_partition: dict[str, int]
    waiting_by_partition: dict[str, int]
    granted_total: int
    released_total: int
    timeouts_total: int


class Gate:
    """Slots for ``capacity`` connections, granted fairly.

    ``reserve`` slots are for critical work only; a partition may hold at most
    ``partition_cap`` slots while another partition waits (when nobody else waits it may
    use whatever is free: the gate is work-conserving).
    """

    def __init__(self, capacity: int, *, reserve: int = 0, max_share: float = 1.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or not 0 <= reserve < capacity:
            raise ValueError(
                f"critical_reserve must be an int in [0, capacity); got {reserve!r} "
                f"for a capacity of {capacity}"
            )
        if not isinstance(max_share, (int, float)) or not 0 < max_share <= 1:
            raise ValueError(f"partition_share must be in (0, 1], got {max_share!r}")
        self.capacity = capacity
        self.reserve = reserve
        self.partition_cap = max(1, math.floor(capacity * max_share))
        # A partition over its share may borrow free slots, but not the last ``headroom`` of
        # them while other partitions are active: a rogue route asking faster than anyone
        # else would otherwise take every slot between two healthy requests, and each healthy
        # request would then wait for a rogue one to finish (seconds) although it was never
        # over its own share.
        self.headroom = _headroom(capacity, reserve, self.partition_cap)
        self._slots = capacity  # the most held at once: more while a fleet member shrinks
        self._last_grant: dict[str, float] = {}
        self.active_window = ACTIVE  # how far back "recently granted" looks (fleet: further)
        self._lock = threading.Lock()
        # The fast paths take the lock through bound methods: ``with lock`` costs twice the
        # instructions on CPython 3.11 (its __enter__ parses arguments), and a checkout and
        # its return take it once each.
        self._lock_acquire = self._lock.acquire
        self._lock_release = self._lock.release
        self._held = 0
        self._held_by: dict[str, int] = {}
        self._waiting = 0
        self._waiting_by: dict[str, int] = {}
        self._queues: tuple[deque[_Waiter], ...] = tuple(deque() for _ in PRIORITY_RANK)
        self.granted_total = 0
        self.released_total = 0
        self.timeouts_total = 0
        # Releases per second over the last whole second: how fast the pool drains, for
        # Retry-After and for the shedder's "no capacity" judgement. Rolled by whoever reads
        # it (the middleware does for every request), not by every release.
        self._win_start = time.monotonic()
        self._win_base = 0
        self._last_rate = 0.0

    # -- policy ---------------------------------------------------------------------------
    def _eligible(self, partition: str, rank: int) -> bool:
        limit = self.capacity if rank == _CRITICAL else self.capacity - self.reserve
        if self._held >= limit:
            # Shrinking (fleet): slots leased above capacity serve partitions below their share.
            spare = self._slots - (self.capacity - limit)
            return self._held < spare and self._held_by.get(partition, 0) < self.partition_cap
        if self._held_by.get(partition, 0) >= self.partition_cap:
            others_waiting = self._waiting - self._waiting_by.get(partition, 0)
            if others_waiting > 0:
                return False
            if limit - self._held <= self.headroom and self._others_active(partition):
                return False
        return True

    def _others_active(self, partition: str) -> bool:
        """Whether another partition was granted a slot within ``active_window`` seconds."""
        since = time.monotonic() - self.active_window
        return any(t > since for p, t in self._last_grant.items() if p != partition)

    def _grant(self, partition: str) -> float:
        """Count a slot as held by ``partition``; returns the time of the grant."""
        self._held += 1
        self._held_by[partition] = self._held_by.get(partition, 0) + 1
        self.granted_total += 1
        last = self._last_grant
        if len(last) >= _MAX_TRACKED and partition not in last:
            last.clear()  # partitions named without bound: forget, at worst, some activity
        now = last[partition] = time.monotonic()
        return now

    def _dequeue(self, w: _Waiter) -> None:
        self._waiting -= 1
        n = self._waiting_by[w.partition] - 1
        if n:
            self._waiting_by[w.partition] = n
        else:
            del self._waiting_by[w.partition]

    def _dispatch(self) -> list[_Waiter]:
        """Grant whatever waiters are now eligible; returns them to be woken outside the lock."""
        woken: list[_Waiter] = []
        if not self._waiting:
            return woken
        for q in self._queues:
            if not q:
                continue
            i = 0
            while i < len(q) and self._held < self._slots:
                w = q[i]
                # Eligibility is judged with this waiter counted as not waiting.
                self._dequeue(w)
                if self._eligible(w.partition, w.rank):
                    del q[i]
                    self._grant(w.partition)
                    w.granted = True
                    woken.append(w)
                else:
                    self._waiting += 1
                    self._waiting_by[w.partition] = self._waiting_by.get(w.partition, 0) + 1
                    i += 1
        return woken

    @staticmethod
    def _wake(woken: list[_Waiter]) -> None:
        for w in woken:
            if w.lock is not None:
                w.lock.release()
            elif w.future is not None and w.loop is not None:
                if w.thread == threading.get_ident():
                    if not w.future.done():
                        w.future.set_result(None)
                else:
                    try:
                        w.loop.call_soon_threadsafe(_resolve, w.future)
                    except RuntimeError:  # loop closed: the waiter is gone with it
                        pass

    # -- acquiring --------------------------------------------------------------------------
    def try_acquire(self, partition: str, rank: int) -> Ticket | None:
        """The fast path: a slot now, or None if the caller must wait."""
        at = self.grant_now(partition, rank)
        return None if at is None else Ticket(partition, rank, 0.0, at)

    def grant_now(self, partition: str, rank: int) -> float | None:
        """:meth:`try_acquire` without a ticket: the time of the grant, or None.

        For a caller that tracks its slot itself (the checkout path's hold) and gives it
        back with :meth:`release_slot` exactly once. Nobody waiting, a slot free outside the
        reserve and the partition below its cap is the common case, and eligible for every
        rank: it is decided here without the full policy of :meth:`_eligible`.
        """
        self._lock_acquire()
        try:
            if self._waiting == 0 and (
                (
                    self._held < self.capacity - self.reserve
                    and self._held_by.get(partition, 0) < self.partition_cap
                )
                or self._eligible(partition, rank)
            ):
                return self._grant(partition)
        finally:
            self._lock_release()
        return None

    def _enqueue(self, w: _Waiter) -> bool:
        """Queue a waiter and dispatch; True when it was granted at once."""
        with self._lock:
            self._queues[w.rank].append(w)
            self._waiting += 1
            self._waiting_by[w.partition] = self._waiting_by.get(w.partition, 0) + 1
            woken = self._dispatch()
        granted_now = w.granted
        self._wake([x for x in woken if x is not w])
        return granted_now

    def _abandon(self, w: _Waiter, *, timed_out: bool = True) -> bool:
        """A waiter gives up; True if it had been granted meanwhile (it then owns a slot).

        ``timed_out`` is False for a waiter that was interrupted or cancelled: it leaves the
        queue the same way but is not counted as a time-out."""
        with self._lock:
            if w.granted:
                return True
            q = self._queues[w.rank]
            try:
                q.remove(w)
            except ValueError:  # interrupted before it was queued: nothing to undo
                return w.granted
            self._dequeue(w)
            if timed_out:
                self.timeouts_total += 1
            # Removing a waiter can make another partition's waiter eligible.
            woken = self._dispatch()
        self._wake(woken)
        return False

    def acquire(self, partition: str, rank: int, timeout: float) -> Ticket | None:
        """Wait up to ``timeout`` seconds for a slot from a thread; None when none came."""
        t = self.try_acquire(partition, rank)
        if t is not None:
            return t
        start = time.monotonic()
        w = _Waiter(partition, rank, start)
        lock = w.lock = threading.Lock()
        lock.acquire()
        try:
            if not self._enqueue(w) and not _park(lock, timeout) and not self._abandon(w):
                return None
            now = time.monotonic()
            return Ticket(partition, rank, now - start, now)
        except BaseException:
            # An exception raised inside the wait: a signal handler (Celery's soft time
            # limit, Ctrl-C). Leave the queue, and give back the slot if it was granted
            # meanwhile: nobody else would ever release it. ``granted`` is the truth, not
            # the lock: the handler may have run just after the lock was acquired.
            if self._abandon(w, timed_out=False):
                self.release_slot(partition)
            raise

    async def acquire_async(self, partition: str, rank: int, timeout: float) -> Ticket | None:
        """As :meth:`acquire`, parking on a future so the event loop keeps running.

        A cancelled waiter gives its place back, or its slot if it had just been granted one.
        """
        t = self.try_acquire(partition, rank)
        if t is not None:
            return t
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        w = _Waiter(partition, rank, start)
        w.loop = loop
        w.thread = threading.get_ident()
        w.future = loop.create_future()
        if not self._enqueue(w):
            try:
                await _park_async(w.future, timeout)
            except (asyncio.TimeoutError, TimeoutError):
                if not self._abandon(w):
                    return None
            except BaseException:
                if self._abandon(w, timed_out=False):
                    self.release_slot(partition)
                raise
        now = time.monotonic()
        return Ticket(partition, rank, now - start, now)

    # -- releasing ----------------------------------------------------------------------------
    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.release_slot(ticket.partition)

    def release_slot(self, partition: str) -> None:
        self._lock_acquire()
        try:
            self._held -= 1
            held_by = self._held_by
            n = held_by[partition] - 1
            if n:
                held_by[partition] = n
            else:
                del held_by[partition]
            self.released_total += 1
            if not self._waiting:  # the common case: nobody to hand the slot to
                return
            woken = self._dispatch()
        finally:
            self._lock_release()
        self._wake(woken)

    # -- observing ----------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return self._waiting

    def oldest_wait(self, now: float, partition: str | None = None) -> float:
        """How long the longest-waiting waiter (of ``partition``, if given) has waited;
        0.0 when nobody waits."""
        if not self._waiting:
            return 0.0
        with self._lock:
            if partition is None:
                heads = [q[0].enqueued_at for q in self._queues if q]
            elif partition not in self._waiting_by:
                return 0.0
            else:
                # Queues are in arrival order: the partition's first waiter in each is its
                # oldest there.
                heads = []
                for q in self._queues:
                    for w in q:
                        if w.partition == partition:
                            heads.append(w.enqueued_at)
                            break
        return now - min(heads) if heads else 0.0

    def waiting_in(self, partition: str) -> int:
        """Waiters of one partition (a plain read: exact enough for admission decisions)."""
        return self._waiting_by.get(partition, 0)

    def drain_rate(self, now: float) -> float:
        """Slots released per second, over the last whole second: how fast a busy pool
        drains, for Retry-After and the "no capacity" judgement.

        A window nobody read for two seconds or more measured a quiet pool (the middleware
        reads it for every request): it lowers nothing, or the first burst after a quiet
        spell would be judged by the quiet spell's rate and refused as a pool that cannot
        drain (seen in bench_closed_loop.py: one refusal each at 30 and 60 clients, in the
        warm-up after the app had idled 2.5 s). A wedged pool is still seen: the next whole
        window, read while requests arrive, counts no release.
        """
        if now - self._win_start >= 1.0:
            with self._lock:
                elapsed = now - self._win_start
                if elapsed >= 1.0:  # not rolled by another reader meanwhile
                    released = self.released_total
                    rate = (released - self._win_base) / elapsed
                    self._last_rate = rate if elapsed < 2.0 else max(rate, self._last_rate)
                    self._win_start = now
                    self._win_base = released
        return self._last_rate

    def forget_holders(self) -> None:
        """After ``fork()`` in the child: the parent's slots and waiters belong to threads
        and connections the child does not have, and would otherwise be counted forever."""
        with self._lock:
            self._held = 0
            self._held_by.clear()
            self._waiting = 0
            self._waiting_by.clear()
            for q in self._queues:
                q.clear()

    def snapshot(self) -> GateSnapshot:
        with self._lock:
            return GateSnapshot(
                capacity=self.capacity,
                reserve=self.reserve,
                partition_cap=self.partition_cap,
                held=self._held,
                waiting=self._waiting,
                held_by_partition=dict(self._held_by),
                waiting_by_partition=dict(self._waiting_by),
                granted_total=self.granted_total,
                released_total=self.released_total,
                timeouts_total=self.timeouts_total,
            )

    # -- fleet mode ---------------------------------------------------------------------------
    #: The capacity, reserve and partition cap the gate was built with, recorded by the first
    #: :meth:`set_capacity`: later capacities scale from these, never from a scaled value.
    _configured: tuple[int, int, int] | None = None

    def set_capacity(self, capacity: int, *, leased: int | None = None) -> int:
        """Move the number of slots (fleet mode: the connections this process holds leases for).

        The critical reserve and the partition cap scale with it from the values the gate was
        built with, so critical work keeps its reserve and a route its share whatever the
        capacity. 0 is allowed: every checkout then has to borrow first. Lowering it takes no
        slot away from its holder; raising it grants queued waiters at once. Lowered below
        what is held, it grants nothing until fewer than ``capacity`` are held, unless
        ``leased`` (slots the caller still holds) leaves up to the reserve and one headroom
        above those held, within ``leased``, for partitions below their share: a slow route
        shrinks as its holders return while light ones are served at once, not queued
        behind them. Returns the most slots the gate may hold: what must stay leased.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        with self._lock:
            if self._configured is None:
                self._configured = (self.capacity, self.reserve, self.partition_cap)
            cap0, reserve0, part0 = self._configured
            reserve = min(math.ceil(reserve0 * capacity / cap0), max(0, capacity - 1))
            part = max(1, (part0 * capacity) // cap0)
            self.capacity = capacity
            self.reserve = reserve
            self.partition_cap = part
            self.headroom = _headroom(capacity, reserve, part)
            room = self._held + reserve + max(1, self.headroom)
            spare = 0 if leased is None else min(leased, self._slots, room)
            self._slots = slots = max(capacity, spare)
            woken = self._dispatch()
        self._wake(woken)
        return slots

    @property
    def slots(self) -> int:
        """The most slots the gate may hold now: ``capacity``, or more while it shrinks."""
        return self._slots

    @property
    def configured_capacity(self) -> int:
        """The capacity the gate was built with (its pool's), whatever :meth:`set_capacity` did."""
        c = self._configured
        return self.capacity if c is None else c[0]


def _headroom(capacity: int, reserve: int, partition_cap: int) -> int:
    """Free slots a partition over its share may not take while others are active."""
    return max(0, min(max(1, (capacity - reserve - partition_cap) // 2), capacity - reserve - 1))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
