"""A read-only view of one guard's state: what ``stats()`` returns, and what an operations
page or a release comparison reads, so that both see the same figures.

Every method returns plain, JSON-serialisable data, and nothing in it is a literal or a
bound parameter (statements appear as fingerprints and literal-free summaries).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import QueuePool

from poolguard.observe.telemetry import PoolState
from poolguard.policy.quarantine import QuarantineEntry

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["STATS_VERSION", "GuardView"]

#: Bumped when a key of ``stats()`` changes meaning or goes away (new keys do not bump it),
#: so that two releases' snapshots can be compared by a tool.
STATS_VERSION = 2


class GuardView:
    def __init__(self, parts: Parts) -> None:
        self._p = parts

    def pool_state(self) -> PoolState:
        p = self._p
        pool = p.engine.pool
        gate = p.gate
        idle = pool.checkedin() if isinstance(pool, QueuePool) else 0
        idle_max = pool.size() if isinstance(pool, QueuePool) else gate.capacity
        return PoolState(
            idle=idle,
            used=gate.held,
            max=gate.capacity,
            idle_max=idle_max,
            idle_min=0,
            pending=gate.waiting,
        )

    def pool(self) -> dict[str, Any]:
        p = self._p
        ps = self.pool_state()
        return {
            "name": p.pool_name,
            "dialect": p.engine.dialect.name,
            "capacity": p.gate.capacity,
            "used": ps.used,
            "idle": ps.idle,
        }

    def gate(self) -> dict[str, Any]:
        g = self._p.gate.snapshot()
        return {
            "capacity": g.capacity,
            "critical_reserve": g.reserve,
            "partition_cap": g.partition_cap,
            "held": g.held,
            "waiting": g.waiting,
            "held_by_partition": g.held_by_partition,
            "waiting_by_partition": g.waiting_by_partition,
            "granted_total": g.granted_total,
            "timeouts_total": g.timeouts_total,
        }

    def quarantine(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [entry_dict(e, now) for e in self._p.quarantine.entries(now)]

    def snapshot(self) -> dict[str, Any]:
        p = self._p
        now = time.monotonic()
        settings = p.config.settings()
        settings["timeout_enforcement"] = p.enforcer.name
        own = p.own_sessions
        out: dict[str, Any] = {
            "version": STATS_VERSION,
            "pool": self.pool(),
            "gate": self.gate(),
            "settings": settings,
            "shedding": {"levels": {k: s.level(now) for k, s in list(p.shedders.items())}},
            "refusals": p.refusals.snapshot(),
            "leaks_reported": p.leaks_reported,
            "lock_holders_blamed": own.blamed if own is not None else 0,
            "quarantined_cancelled": own.cancelled_total if own is not None else 0,
            "quarantine": self.quarantine(),
            "statements": p.stats.snapshot(),
        }
        if p.fleet is not None:
            out["fleet"] = p.fleet.snapshot()
        return out


def entry_dict(e: QuarantineEntry, now: float) -> dict[str, Any]:
    return {
        "fingerprint": e.fingerprint,
        "summary": e.summary,
        "state": e.state,
        "retry_in": round(max(0.0, e.retry_at - now), 3),
        "trips": e.trips,
    }
