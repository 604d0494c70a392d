"""What one phase measured: every exchange, the pool's high-water marks, and percentiles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from poolguard.tools.demo.client import DemoRequest
from poolguard.tools.demo.scenario import HEALTHY, ROGUE

__all__ = ["PhaseResult", "percentile"]


@dataclass
class PhaseResult:
    """What one phase measured: every exchange, and the pool's high-water marks."""

    name: str
    protected: bool
    duration: float
    exchanges: list[DemoRequest] = field(default_factory=list)
    capacity: int = 0
    max_checked_out: int = 0
    max_waiting: int = 0
    max_in_flight: int = 0
    quarantine_events: int = 0
    quarantined_at: float | None = None
    alerts: list[str] = field(default_factory=list)
    endpoint_threads: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[DemoRequest]:
        return [e for e in self.exchanges if e.kind == kind]

    def healthy_ok(self) -> int:
        return sum(1 for e in self.of(HEALTHY) if e.outcome.startswith("2"))

    def healthy_success(self) -> float:
        sent = len(self.of(HEALTHY))
        return self.healthy_ok() / sent if sent else 0.0

    def healthy_latency(self, q: float) -> float:
        return percentile([e.latency for e in self.of(HEALTHY)], q)

    def outcomes(self, kind: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.of(kind):
            counts[e.outcome] = counts.get(e.outcome, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), kv[0])))

    def to_json(self) -> dict[str, Any]:
        healthy = self.of(HEALTHY)
        return {
            "protected": self.protected,
            "duration_s": self.duration,
            "healthy": {
                "sent": len(healthy),
                "ok": self.healthy_ok(),
                "success_rate": round(self.healthy_success(), 4),
                "p50_ms": _ms(self.healthy_latency(0.50)),
                "p99_ms": _ms(self.healthy_latency(0.99)),
                "max_ms": _ms(max((e.latency for e in healthy), default=math.nan)),
                "outcomes": self.outcomes(HEALTHY),
            },
            "rogue": {"sent": len(self.of(ROGUE)), "outcomes": self.outcomes(ROGUE)},
            "pool": {
                "capacity": self.capacity,
                "max_checked_out": self.max_checked_out,
                "max_waiting": self.max_waiting,
                "max_in_flight": self.max_in_flight,
            },
            "quarantine": {
                "events": self.quarantine_events,
                "first_at_s": None
                if self.quarantined_at is None
                else round(self.quarantined_at, 2),
            },
            "alerts": self.alerts,
            "endpoint_threads": self.endpoint_threads,
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
