"""The middleware's in-flight limit: requests admitted and not yet finished, per guard.

One counter per guard, shared by every middleware on it (two apps on one guard share one
limit). It is a backstop, not the means of refusal: refusing follows the pool (the gate's
queue, CoDel's verdict in ``guard.admit()``), and a busy app whose pool keeps up never meets
this limit. Measured before it became a backstop (a limit of twice the pool, a route share
of one pool): 30 closed-loop clients on a fast route got 15 to 35 refusals in ~1,700
requests, with the pool never full.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from poolguard.core.budget import PRIORITY_RANK

if TYPE_CHECKING:
    from poolguard.guard import PoolGuard

__all__ = ["MIN_BACKSTOP", "InFlight", "default_limit", "in_flight_for"]

#: The smallest default limit: above FastAPI's 40 threads and SQLAlchemy's default pool of
#: 15 together, and above what 60 closed-loop clients keep in flight (bench_closed_loop.py:
#: 0 refusals), so only work that piles up where the pool cannot see it reaches it.
MIN_BACKSTOP = 100


def default_limit(capacity: int) -> int:
    """The default ``max_inflight``: four rounds of the pool, at least :data:`MIN_BACKSTOP`."""
    return max(MIN_BACKSTOP, 4 * capacity)


class InFlight:
    """Requests admitted and not finished, for one guard, with a ceiling per priority and,
    under contention, a share per partition.

    The ceilings are ``limit // 2`` for sheddable work, ``limit`` for normal work and
    ``limit + limit // 2`` for critical work: a backstop for work that piles up where the
    gate cannot see it (an ``async def`` handler awaiting something else, a thread pool's
    queue), with half a limit of headroom kept for critical work.

    The share per partition (route) applies only while the caller says the pool is
    contended (the route's queue at the gate stands): then a route may keep in flight
    ``partition_cap`` requests, twice its share of the pool (what it holds plus as many
    queued behind), so a rogue route's slow requests cannot take every thread and place in
    flight from healthy routes. While connections are free or nobody waits, any route may
    use what is free: there is nobody to be fair to.
    """

    __slots__ = (
        "_lock",
        "by_partition",
        "ceilings",
        "count",
        "limit",
        "partition_cap",
        "shed_until",
    )

    def __init__(self, limit: int, partition_cap: int) -> None:
        self.limit = limit
        ceilings = [0, 0, 0]
        ceilings[PRIORITY_RANK["critical"]] = limit + limit // 2
        ceilings[PRIORITY_RANK["normal"]] = limit
        ceilings[PRIORITY_RANK["sheddable"]] = max(1, limit // 2)
        self.ceilings = tuple(ceilings)
        self.partition_cap = max(1, partition_cap)
        self.count = 0
        self.by_partition: dict[str, int] = {}
        #: Partitions whose queue CoDel found standing, until when (monotonic seconds).
        #: Partitions are route templates (bounded by the app's routes) or "_OTHER".
        self.shed_until: dict[str, float] = {}
        # One guard may serve several event loops (servers in threads): a lock held for an
        # increment costs ~0.1 us uncontended.
        self._lock = threading.Lock()

    def enter(self, rank: int, partition: str, contended: bool = False) -> bool:
        """Admit one request of priority ``rank`` to ``partition``; False: over a limit.

        Critical work (rank 0) is never held to the partition share.
        """
        with self._lock:
            count = self.count
            if count >= self.ceilings[rank]:
                return False
            mine = self.by_partition.get(partition, 0)
            if contended and rank and mine >= self.partition_cap:
                return False
            self.count = count + 1
            self.by_partition[partition] = mine + 1
            return True

    def shed(self, partition: str, until: float) -> None:
        """CoDel refused ``partition`` for queue delay: its queue stands until ``until``."""
        self.shed_until[partition] = until

    def recently_shed(self, partition: str, now: float) -> bool:
        return self.shed_until.get(partition, 0.0) > now

    def of(self, partition: str) -> int:
        """Requests of ``partition`` in flight (a plain read)."""
        return self.by_partition.get(partition, 0)

    def leave(self, partition: str) -> None:
        with self._lock:
            self.count -= 1
            # A partition with nothing left in flight is dropped: the table stays as small
            # as what is in flight.
            n = self.by_partition.pop(partition) - 1
            if n:
                self.by_partition[partition] = n


_in_flight: weakref.WeakKeyDictionary[PoolGuard, InFlight] = weakref.WeakKeyDictionary()
_in_flight_lock = threading.Lock()


def in_flight_for(guard: PoolGuard, limit: int) -> InFlight:
    """The guard's shared in-flight counter: two apps on one guard share one limit."""
    with _in_flight_lock:
        counter = _in_flight.get(guard)
        if counter is None:
            # Twice the route's share of the pool: the connections it may hold while others
            # wait, and as many again queued for them.
            cap = 2 * guard.gate.partition_cap
            counter = _in_flight[guard] = InFlight(limit, min(cap, limit))
        elif counter.limit != limit:
            raise ValueError(
                f"max_inflight={limit} conflicts with another PoolGuardMiddleware on the same "
                f"guard, which uses {counter.limit}: one guard has one in-flight limit"
            )
        return counter
