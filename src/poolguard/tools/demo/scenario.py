"""The load the demo puts on its application: rates, patience, durations, and the schedule.

Open loop: requests go out on a fixed schedule whatever happens to earlier ones, so a stalled
server cannot slow the load down and hide its own stall (coordinated omission).
"""

from __future__ import annotations

__all__ = [
    "CONTRAST_DURATION",
    "DEFAULT_DURATION",
    "HEALTHY",
    "HEALTHY_RATE",
    "MAX_DURATION",
    "MIN_DURATION",
    "PATIENCE",
    "ROGUE",
    "ROGUE_RATE",
    "ROGUE_SECONDS",
    "schedule",
]

#: Healthy requests sent per second (split over two endpoints).
HEALTHY_RATE = 40.0
#: Rogue requests sent per second.
ROGUE_RATE = 2.5
#: Seconds a client waits for its answer before it gives up (and disconnects).
PATIENCE = 6.0
#: Seconds the rogue query runs when nothing stops it.
ROGUE_SECONDS = 20.0
#: Default seconds per phase: two phases and the clients' patience fit in under 30 s.
DEFAULT_DURATION = 10.0
MIN_DURATION = 1.0
MAX_DURATION = 600.0
#: Seconds per phase below which the outage has little time to show: the rogue fills the
#: unprotected pool after about 6 s (15 connections at ROGUE_RATE).
CONTRAST_DURATION = 8.0

#: The two kinds of request.
HEALTHY = "healthy"
ROGUE = "rogue"


def schedule(
    duration: float, healthy_rate: float, rogue_rate: float
) -> list[tuple[float, str, str]]:
    """(offset, kind, path) for every request of a phase, in order: a fixed, even schedule."""
    plan: list[tuple[float, str, str]] = []
    n = int(duration * healthy_rate)
    for i in range(n):
        path = f"/items/{i % 1000 + 1}" if i % 2 == 0 else f"/customers/{i % 200}/orders"
        plan.append((i / healthy_rate, HEALTHY, path))
    # The first rogue request comes a quarter period in: just after the deploy.
    m = int(duration * rogue_rate)
    plan.extend(((j + 0.25) / rogue_rate, ROGUE, "/recommendations") for j in range(m))
    plan.sort(key=lambda p: p[0])
    return plan
