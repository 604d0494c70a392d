"""The middleware's in-flight limit: requests admitted and not yet finished, per guard.

One counter per guard, shared by every middleware on it (two apps on one guard share one
limit), with a ceiling per priority and a share per partition.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import TYPE_CHECKING

from poolguard.core.budget import PRIORITY_RANK

if TYPE_CHECKING:
    from poolguard.guard import PoolGuard

__all__ = ["InFlight", "in_flight_for"]


class InFlight:
    """Requests admitted and not finished, for one guard, with a ceiling per priority and a
    share per partition.

    The ceilings are ``limit // 2`` for sheddable work, ``limit`` for normal work and
    ``limit + limit // 2`` for critical work: with the default limit of twice the pool's
    capacity, sheddable work stops once the pool could be full, normal work once a whole
    pool's worth is queued behind it, and critical work keeps half a limit of headroom (the
    gate also serves it first and keeps it a reserve).

    A partition (route) may hold at most ``share`` of the limit once half of it is in use:
    a rogue route's slow requests pile up in flight (25 requests/s of 0.8 s each keep 20 in
    flight) and would otherwise take every place, refusing healthy routes at the door. Below
    half the limit there is no contention and any route may use what is free.
    """

    __slots__ = ("_lock", "by_partition", "ceilings", "count", "limit", "partition_cap")

    def __init__(self, limit: int, share: float) -> None:
        self.limit = limit
        ceilings = [0, 0, 0]
        ceilings[PRIORITY_RANK["critical"]] = limit + limit // 2
        ceilings[PRIORITY_RANK["normal"]] = limit
        ceilings[PRIORITY_RANK["sheddable"]] = max(1, limit // 2)
        self.ceilings = tuple(ceilings)
        self.partition_cap = max(1, math.floor(limit * share))
        self.count = 0
        self.by_partition: dict[str, int] = {}
        # One guard may serve several event loops (servers in threads): a lock held for an
        # increment costs ~0.1 us uncontended.
        self._lock = threading.Lock()

    def enter(self, rank: int, partition: str) -> bool:
        with self._lock:
            count = self.count
            if count >= self.ceilings[rank]:
                return False
            mine = self.by_partition.get(partition, 0)
            if mine >= self.partition_cap and count >= self.limit // 2 and rank:
                return False
            self.count = count + 1
            self.by_partition[partition] = mine + 1
            return True

    def leave(self, partition: str) -> None:
        with self._lock:
            self.count -= 1
            n = self.by_partition[partition] - 1
            if n:
                self.by_partition[partition] = n
            else:
                del self.by_partition[partition]


_in_flight: weakref.WeakKeyDictionary[PoolGuard, InFlight] = weakref.WeakKeyDictionary()
_in_flight_lock = threading.Lock()


def in_flight_for(guard: PoolGuard, limit: int) -> InFlight:
    """The guard's shared in-flight counter: two apps on one guard share one limit."""
    with _in_flight_lock:
        counter = _in_flight.get(guard)
        if counter is None:
            share = guard.gate.partition_cap / guard.gate.capacity
            counter = _in_flight[guard] = InFlight(limit, share)
        elif counter.limit != limit:
            raise ValueError(
                f"max_inflight={limit} conflicts with another PoolGuardMiddleware on the same "
                f"guard, which uses {counter.limit}: one guard has one in-flight limit"
            )
        return counter
