"""Quarantine: a circuit breaker per statement fingerprint.

A statement that keeps timing out (typically one fresh from a deploy) costs a connection
for its whole statement timeout every time it runs, so a handful of callers is enough to
starve the pool for everybody else. Once a fingerprint has timed out ``threshold`` times
within ``window`` seconds it is *opened*: refused at once, without touching the pool, for
a cool-down. After the cool-down exactly one caller is let through as a *probe*; if it
succeeds the breaker closes, if it times out again the breaker reopens with a cool-down
twice as long (up to ``max_cooldown``), so a query that stays broken costs one statement
timeout per cool-down instead of one per request.

The module is a pure policy: no I/O, no clock (``now`` is always passed in, monotonic
seconds), no SQLAlchemy. The caller reports what happened to each statement it let run.

Cost on the hot path: ``active`` is a plain attribute that is False unless something is
quarantined, so a guard that reads it first pays one attribute read per statement in the
normal case. :meth:`Quarantine.check` and :meth:`Quarantine.record_success` on a fingerprint
that is not quarantined are one dict look-up each and allocate nothing. A lock is taken
only when a breaker exists for the fingerprint, or on a time-out (rare by definition), so
one instance may be shared by every thread and event loop of a process.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from poolguard import validate

__all__ = ["MAX_TRACKED", "PROBE_RETRY", "Quarantine", "QuarantineEntry", "Transition"]

#: Most closed fingerprints whose recent time-outs are remembered. Past it the stalest is
#: forgotten: a fingerprint that has not timed out lately is the least likely to trip, and
#: an unbounded map keyed by statement would be a memory leak for apps that generate SQL.
MAX_TRACKED = 10_000

#: The longest Retry-After handed out while a probe is in flight: the probe may end any
#: moment (and close the breaker), so callers are told to come back soon rather than at
#: the worst case. Refusing them again is cheap.
PROBE_RETRY = 1.0

_NO_PROBE = -math.inf


@dataclass(frozen=True)
class Transition:
    """A change of a breaker's state, for telemetry and alerts.

    ``cooldown`` is how long the fingerprint is now refused before the next probe (0.0 when
    ``kind`` is "closed"). ``timeouts`` counts the time-outs of this quarantine episode:
    ``threshold`` when it opened, plus one per probe that timed out since.
    """

    kind: Literal["opened", "closed", "reopened"]
    fingerprint: str
    summary: str
    cooldown: float
    timeouts: int


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined fingerprint, for listings (``dataclasses.asdict`` makes it JSON).

    ``state`` is "open" while the cool-down runs and "half_open" once it is over: the next
    execution of the statement is (or already was) let through as the probe. ``opened_at``
    is when this episode began (reopening keeps it), ``retry_at`` when the current cool-down
    ends, ``trips`` how many times the breaker has opened in this episode.
    """

    fingerprint: str
    summary: str
    state: Literal["open", "half_open"]
    opened_at: float
    retry_at: float
    trips: int


class _Breaker:
    """The state of one open or half-open fingerprint (closed ones have no breaker)."""

    __slots__ = (
        "cooldown",
        "held",
        "opened_at",
        "probe_at",
        "probed",
        "retry_at",
        "summary",
        "timeouts",
        "trips",
    )

    def __init__(self, summary: str, now: float, cooldown: float, timeouts: int) -> None:
        self.summary = summary
        self.opened_at = now
        self.cooldown = cooldown
        self.retry_at = now + cooldown
        self.trips = 1
        self.timeouts = timeouts
        # When the probe in flight was let through; -inf when none is.
        self.probe_at = _NO_PROBE
        # Whether a probe has been let through since the cool-down ended. Until then the
        # breaker is open: outcomes reported for the fingerprint come from executions that
        # started before it opened, which say nothing about the statement now.
        self.probed = False
        # Fleet mode: no probe is let through here until the fleet grants one (see
        # :meth:`Quarantine.hold_probe`). Always False for a guard without a fleet.
        self.held = False


def _check_fingerprint(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"a fingerprint id must be a non-empty str, got {value!r}")
    return value


class Quarantine:
    """Circuit breakers keyed by statement fingerprint.

    ``threshold`` time-outs of one fingerprint within ``window`` seconds (stamps in
    ``(now - window, now]``) open its breaker for ``cooldown`` seconds; each failed probe
    doubles the cool-down, capped at ``max_cooldown``. Fingerprints in ``allow`` are never
    quarantined (a report that is known to be slow, say: its time-outs are the budget's
    business, not the quarantine's).

    A probe whose outcome is never reported (its caller crashed, or never ran it) must not
    keep the statement quarantined forever: once a probe has been in flight for
    ``cooldown`` seconds, the next caller is let through as a new probe.
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        window: float = 60.0,
        cooldown: float = 30.0,
        max_cooldown: float = 600.0,
        allow: Iterable[str] = (),
    ) -> None:
        self.threshold = validate.count("threshold", threshold)
        self.window = validate.seconds("window", window, limit=None)
        self.cooldown = validate.seconds("cooldown", cooldown, limit=None)
        self.max_cooldown = validate.seconds("max_cooldown", max_cooldown, limit=None)
        if self.max_cooldown < self.cooldown:
            raise ValueError(
                f"max_cooldown must be >= cooldown ({self.cooldown:g}), got {max_cooldown!r}"
            )
        if isinstance(allow, str):
            # A lone id would otherwise be allowed character by character.
            raise TypeError("allow must be an iterable of fingerprint ids, not a single str")
        #: True iff some fingerprint is open or half-open. Read it before :meth:`check` so
        #: that a process with nothing quarantined pays one attribute read per statement.
        #: Maintained by this class; do not assign it.
        self.active = False
        self._lock = threading.Lock()
        self._breakers: dict[str, _Breaker] = {}
        # Closed fingerprints' recent time-outs, ordered by their latest time-out (stalest
        # first) so that pruning and eviction pop from the front. At most ``threshold``
        # stamps each: that is all it takes to decide.
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self._max_tracked = MAX_TRACKED
        self._allowed: set[str] = {_check_fingerprint(fp) for fp in allow}

    # -- the hot path ---------------------------------------------------------------------------
    def check(self, fingerprint: str, now: float) -> float | None:
        """May this statement run now? None if so; otherwise seconds until it may (> 0).

        None is returned for a closed fingerprint and for the one probe let through once a
        cool-down is over; every other caller is refused until the probe is reported (or
        has been in flight for ``cooldown`` seconds and is presumed lost).
        """
        if fingerprint not in self._breakers:
            return None
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is None:
                return None
            left = b.retry_at - now
            if left > 0:
                return left
            if b.held:  # fleet mode: another member may be probing; ask again soon
                return PROBE_RETRY
            # The same expression decides and answers, so a refusal is always > 0.
            left = b.probe_at + self.cooldown - now
            if left <= 0:
                b.probe_at = now
                b.probed = True
                return None
            return left if left < PROBE_RETRY else PROBE_RETRY

    def record_success(self, fingerprint: str, now: float) -> Transition | None:
        """A statement ran to completion. Closes the breaker if it was being probed.

        For a fingerprint that is not quarantined (the normal case) this is a single dict
        look-up and allocates nothing.
        """
        if fingerprint not in self._breakers:
            return None
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is None or not b.probed:
                return None
            return self._close(fingerprint, b)

    def record_error(self, fingerprint: str, now: float) -> None:
        """A statement failed with something other than a time-out.

        If it was the probe, the probe is over without a verdict: the breaker stays
        half-open and the next caller may probe.
        """
        if fingerprint not in self._breakers:
            return
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is not None and b.probed:
                b.probe_at = _NO_PROBE

    def record_timeout(self, fingerprint: str, summary: str, now: float) -> Transition | None:
        """A statement ran past its timeout. Returns the transition it caused, if any.

        While closed, the time-out counts in the fingerprint's sliding window and the
        ``threshold``-th one within ``window`` opens the breaker. A time-out while
        half-open (the probe, presumably) reopens it with a doubled cool-down. A time-out
        while open comes from an execution that started before the breaker opened (or from
        a probe presumed lost) and changes nothing.
        """
        if fingerprint in self._allowed:
            return None
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is not None:
                if not b.probed:
                    return None
                b.trips += 1
                b.timeouts += 1
                b.cooldown = min(b.cooldown * 2.0, self.max_cooldown)
                b.retry_at = now + b.cooldown
                b.probe_at = _NO_PROBE
                b.probed = False
                b.summary = summary
                return Transition("reopened", fingerprint, summary, b.cooldown, b.timeouts)
            strikes = self._strikes
            stamps = strikes.get(fingerprint)
            if stamps is None:
                stamps = strikes[fingerprint] = deque(maxlen=self.threshold)
            else:
                strikes.move_to_end(fingerprint)
            stamps.append(now)
            if len(stamps) == self.threshold and now - stamps[0] < self.window:
                del strikes[fingerprint]
                self._breakers[fingerprint] = _Breaker(summary, now, self.cooldown, self.threshold)
                self.active = True
                return Transition("opened", fingerprint, summary, self.cooldown, self.threshold)
            self._prune(now)
            return None

    # -- by hand -------------------------------------------------------------------------------
    def release(self, fingerprint: str, now: float) -> Transition | None:
        """Close a fingerprint's breaker by hand; None if it was not quarantined.

        Its recent time-outs are forgotten too: whoever released it vouches for it.
        """
        with self._lock:
            self._strikes.pop(fingerprint, None)
            b = self._breakers.get(fingerprint)
            if b is None:
                return None
            return self._close(fingerprint, b)

    def allow(self, fingerprint: str) -> Transition | None:
        """Never quarantine this fingerprint; releases it if it is quarantined now.

        Returns the "closed" transition of that release, if there was one, so the caller
        can report it like any other.
        """
        fp = _check_fingerprint(fingerprint)
        with self._lock:
            self._allowed.add(fp)
            self._strikes.pop(fp, None)
            b = self._breakers.get(fp)
            return None if b is None else self._close(fp, b)

    def disallow(self, fingerprint: str) -> None:
        """Take a fingerprint off the allow-list: its time-outs count again from now on."""
        with self._lock:
            self._allowed.discard(fingerprint)

    # -- observing -----------------------------------------------------------------------------
    def entries(self, now: float) -> list[QuarantineEntry]:
        """The quarantined fingerprints, in the order they were first opened."""
        with self._lock:
            return [
                QuarantineEntry(
                    fingerprint=fp,
                    summary=b.summary,
                    state="open" if now < b.retry_at else "half_open",
                    opened_at=b.opened_at,
                    retry_at=b.retry_at,
                    trips=b.trips,
                )
                for fp, b in self._breakers.items()
            ]

    @property
    def allowed(self) -> frozenset[str]:
        """The allow-list as it stands."""
        return frozenset(self._allowed)

    @property
    def tracked(self) -> int:
        """How many closed fingerprints have recent time-outs on record (<= MAX_TRACKED)."""
        return len(self._strikes)

    # -- fleet mode ----------------------------------------------------------------------------
    # A fleet member applies the fleet's state here: breakers opened elsewhere, and the one
    # probe per cool-down that the fleet grants to a single member. Times arrive as seconds
    # from ``now`` (the fleet's store has its own clock; no wall clock is compared here).

    def apply_remote(
        self,
        fingerprint: str,
        summary: str,
        now: float,
        *,
        retry_in: float,
        cooldown: float,
        trips: int,
        timeouts: int,
        hold: bool,
    ) -> Transition | None:
        """Open (or align) a breaker to the fleet's state: refused until ``now + retry_in``.

        Returns "opened" when the fingerprint was not quarantined here, "reopened" when the
        fleet's episode has tripped more often than this breaker knew (a probe failed
        elsewhere), None when it only aligned the times. A probe running here for the same
        trip keeps running. Allow-listed fingerprints stay allowed (None).
        """
        fp = _check_fingerprint(fingerprint)
        if fp in self._allowed:
            return None
        with self._lock:
            b = self._breakers.get(fp)
            if b is None:
                self._strikes.pop(fp, None)
                b = self._breakers[fp] = _Breaker(summary, now, cooldown, timeouts)
                b.retry_at = now + retry_in
                b.trips = max(1, trips)
                b.held = hold
                self.active = True
                return Transition("opened", fp, summary, cooldown, timeouts)
            if trips < b.trips:
                return None  # this breaker is ahead (its probe failed here): the fleet follows
            reopened = trips > b.trips
            b.retry_at = now + retry_in
            b.cooldown = cooldown
            b.summary = summary
            b.timeouts = max(b.timeouts, timeouts)
            if reopened or retry_in > 0:
                b.trips = max(b.trips, trips)
                b.probe_at = _NO_PROBE
                b.probed = False
                b.held = hold
            if reopened:
                return Transition("reopened", fp, summary, cooldown, b.timeouts)
            return None

    def hold_probe(self, fingerprint: str) -> bool:
        """Let no probe of this fingerprint through here until :meth:`grant_probe`: the
        fleet lets exactly one member probe per cool-down. False if it is not quarantined."""
        return self._set_held(fingerprint, True)

    def grant_probe(self, fingerprint: str) -> bool:
        """This member may probe (the fleet granted it, or the fleet is out of reach and
        each member probes for itself). False if it is not quarantined."""
        return self._set_held(fingerprint, False)

    def _set_held(self, fingerprint: str, held: bool) -> bool:
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is None:
                return False
            b.held = held
            return True

    def probe_status(
        self, fingerprint: str, now: float
    ) -> Literal["open", "held", "ready", "probing"] | None:
        """Where a breaker stands: "open" (cool-down running), "probing" (a probe let through
        here is in flight), "held" (over, waiting for the fleet's grant), "ready" (the next
        caller probes); None when the fingerprint is not quarantined."""
        with self._lock:
            b = self._breakers.get(fingerprint)
            if b is None:
                return None
            if now < b.retry_at:
                return "open"
            if b.probe_at + self.cooldown > now:
                return "probing"
            return "held" if b.held else "ready"

    def retry_in(self, fingerprint: str, now: float) -> float | None:
        """Seconds left in a breaker's cool-down (<= 0 once it is over); None if closed."""
        b = self._breakers.get(fingerprint)
        return None if b is None else b.retry_at - now

    def quarantined_ids(self) -> list[str]:
        """The fingerprints open or half-open here, in the order they were opened."""
        with self._lock:
            return list(self._breakers)

    # -- internals (called with the lock held) --------------------------------------------------
    def _close(self, fingerprint: str, b: _Breaker) -> Transition:
        del self._breakers[fingerprint]
        self.active = bool(self._breakers)
        return Transition("closed", fingerprint, b.summary, 0.0, b.timeouts)

    def _prune(self, now: float) -> None:
        """Forget fingerprints whose latest time-out left the window, then cap the rest.

        The map is ordered by latest time-out, so both stop at the first keeper: amortised
        O(1) per recorded time-out.
        """
        strikes = self._strikes
        horizon = now - self.window
        while strikes:
            fp, stamps = next(iter(strikes.items()))
            if stamps[-1] > horizon:
                break
            del strikes[fp]
        while len(strikes) > self._max_tracked:
            strikes.popitem(last=False)
