"""What a guard asks of a fleet: the seam between one process's guard and shared state.

A guard works alone (``fleet=None``): its gate's capacity is its pool's and its quarantine is
its own. With a fleet, the guard calls :meth:`Fleet.join` once and then tells the member what
happens locally; the member moves the local gate's capacity (``Gate.set_capacity``) and applies
remote quarantine state to the local :class:`~poolguard.policy.quarantine.Quarantine`. The
guard never waits on the fleet's store except in :meth:`FleetMember.borrow`, which runs only
when the local gate is full and makes at most one bounded round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from poolguard.observe.alerts import Alerter
    from poolguard.policy.gate import Gate
    from poolguard.policy.quarantine import Quarantine, Transition

__all__ = ["Fleet", "FleetMember", "JoinParts"]


class _JoinRequired(TypedDict):
    gate: Gate
    quarantine: Quarantine
    alerts: Alerter
    pool_capacity: int


class JoinParts(_JoinRequired, total=False):
    """What a guard hands its fleet when it joins (:meth:`Fleet.join`'s keywords), declared
    once: every implementation takes exactly these. ``on_transition`` is optional."""

    on_transition: Callable[[Transition], None] | None


class FleetMember(Protocol):
    """One guard's membership of a fleet."""

    def borrow(self) -> bool:
        """The local gate is full: try to lease more of the fleet's capacity (one round trip
        at most, with a short socket time-out). True when the gate's capacity was raised."""
        ...

    async def borrow_async(self) -> bool:
        """As :meth:`borrow`, for async engines: never blocks the event loop."""
        ...

    def strike(self, fingerprint: str, summary: str) -> None:
        """A statement earned a quarantine strike here. Must not block the caller."""
        ...

    def transition(self, t: Transition) -> None:
        """The local quarantine opened or closed a breaker (tell the others)."""
        ...

    def released(self, fingerprint: str) -> None:
        """``guard.release()`` was called here: release it everywhere."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """``guard.stats()["fleet"]``: JSON-serialisable."""
        ...

    def close(self) -> None:
        """Leave the fleet: return leases, stop background work. Idempotent."""
        ...


class Fleet(Protocol):
    """A fleet configuration (``RedisFleet(...)``); one member per guarded engine."""

    def join(self, **parts: Unpack[JoinParts]) -> FleetMember:
        """Join once per guard. ``on_transition`` (optional) is called, from the member's
        threads, for every breaker change applied from the fleet (opened, reopened or
        closed elsewhere), so the guard can report it and cancel running copies of a
        statement opened elsewhere; the member ignores the guard's echo of it through
        :meth:`FleetMember.transition`."""
        ...
