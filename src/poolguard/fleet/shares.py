"""Lease arithmetic: how many of the fleet's connections a member asks for, and uses.

Pure functions of what the member sees locally (its gate) and what the fleet said last (a
:class:`~poolguard.fleet.store.Reply`); no I/O and no clock. The invariants they keep:

- a member never uses more slots than it holds leases for: the gate is lowered *before* a
  smaller number goes to Redis, and raised only *after* Redis granted a larger one, so the
  fleet's checkouts never exceed the sum of live leases, which Redis keeps within the cap;
- a member's *base share* is ``min(pool, cap // members)``: it keeps it between round trips,
  so a checkout within it never waits on Redis; above it, it borrows what is free and gives
  back what it no longer uses at its next heartbeat, or at once (down to its base and what it
  holds) when another member is below its base share ("starving");
- without Redis a member falls back to its last known base share: every member doing so
  keeps the fleet within ``cap`` because the base shares sum to at most ``cap``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Plan", "base_share", "borrow_want", "degraded_capacity", "heartbeat_plan"]


def base_share(fair: int, pool: int) -> int:
    """The leases a member keeps without asking: its fair part of the cap, within its pool."""
    return max(0, min(pool, fair))


@dataclass(frozen=True)
class Plan:
    """One heartbeat's decision.

    ``lower_to`` is set (before the round trip) when the gate must shrink first; ``want`` is
    what to ask Redis for (never fewer than the slots held); ``keep`` the most the gate may
    use afterwards, whatever Redis grants.
    """

    lower_to: int | None
    want: int
    keep: int


def heartbeat_plan(
    *, capacity: int, held: int, waiting: int, base: int, pool: int, starving: bool
) -> Plan:
    """What to renew. Demand (held plus waiting) above the base share is asked for; leases
    beyond demand and base go back; when someone starves, everything above the base share
    that is not in use goes back and the gate stops using it."""
    demand = held + waiting
    keep = min(pool, base) if starving else min(pool, max(base, demand))
    lower_to = keep if keep < capacity else None
    return Plan(lower_to=lower_to, want=max(keep, held), keep=keep)


def borrow_want(*, leases: int, held: int, waiting: int, in_flight: int, pool: int) -> int:
    """A full gate asks for one more slot for each checkout that is waiting or borrowing."""
    return min(pool, max(leases, held + waiting + in_flight + 1))


def degraded_capacity(*, base: int, fallback: int, known: bool) -> int:
    """The local cap while Redis cannot be reached: the last known base share, or the
    configured fallback for a member that never reached Redis (it knows no share)."""
    return base if known else fallback
