"""A failed statement's outcome, built once and handed to every part that learns from it.

The success path stays inline in :mod:`poolguard.core.statements` (it runs for every
statement, and an object per statement would cost more than the rest of the path); a
failure is rare enough to be described in full, by name, and recorded in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from poolguard.core.budget import BudgetScope
from poolguard.observe.fingerprint import Fingerprint

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["Outcome", "Outcomes"]


@dataclass(eq=False)
class Outcome:
    """What happened to one statement that failed."""

    fp: Fingerprint
    start_ns: int
    end_ns: int
    #: The time-out the statement ran under (None: no limit).
    timeout: float | None
    scope: BudgetScope | None
    error: BaseException | None
    #: "statement", "lock" or "quarantined" (cancelled by poolguard); None: not a time-out.
    cause: str | None = None
    #: The limit that fired (the lock wait for "lock"), for the error and telemetry.
    limit: float | None = None
    #: The time-out counts towards the statement's quarantine.
    strike: bool = False

    @property
    def elapsed(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def partition(self) -> str | None:
        return self.scope.partition if self.scope is not None else None

    @property
    def timed_out(self) -> bool:
        return self.cause is not None


class Outcomes:
    """Hands a failure to the statistics, the budget, the quarantine, lock blame, the fleet
    and telemetry, in that order."""

    def __init__(self, parts: Parts) -> None:
        self.p = parts

    def failed(self, o: Outcome) -> None:
        p = self.p
        fp = o.fp
        p.stats.record(fp, o.elapsed, error=True, timeout=o.timed_out)
        if o.scope is not None:
            o.scope.record_statement(o.elapsed, timed_out=o.timed_out)
        now = p.clock()
        q = p.quarantine
        if o.strike:
            t = q.record_timeout(fp.id, fp.summary, now)
            if p.fleet is not None:
                p.fleet.strike(fp.id, fp.summary)
            if t is not None:
                p.on_transition(t)
        elif o.cause != "quarantined" and q.active:  # an open breaker needs no word
            q.record_error(fp.id, now)
        if o.cause == "lock" and p.blame is not None:
            p.blame.victim_waited(since=now - o.elapsed)
        p.telemetry.statement(
            fp, o.start_ns, o.end_ns, partition=o.partition, timeout=o.timeout, error=o.error
        )
