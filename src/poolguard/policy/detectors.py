"""Detectors: when a stream of observations becomes something a human should hear about.

Pure policy, like the rest of this package: each takes the time as an argument and does no
I/O, so its edge cases are tested with a fake clock, and the parts that feed it decide what
an observation is. The alerts they lead to are debounced and delivered by
:class:`poolguard.observe.alerts.Alerter`.
"""

from __future__ import annotations

from collections import deque

from poolguard import validate as v

__all__ = ["SaturationDetector", "StormDetector"]


class SaturationDetector:
    """Says once when the pool has been saturated for ``sustain`` seconds without a break.

    A moment of saturation is normal (a burst the gate absorbs); minutes of it are an incident.
    The detector re-arms only after a non-saturated observation, so one incident gives one
    alert however long it lasts (and the alerter's debounce covers flapping).
    """

    def __init__(self, *, sustain: float = 5.0) -> None:
        self.sustain = v.seconds("sustain", sustain, zero=True)
        self._since: float | None = None
        self._fired = False

    def observe(self, saturated: bool, now: float) -> bool:
        if not saturated:
            self._since = None
            self._fired = False
            return False
        if self._since is None:
            self._since = now
        if not self._fired and now - self._since >= self.sustain:
            self._fired = True
            return True
        return False

    @property
    def saturated_since(self) -> float | None:
        """The clock reading when the current run of saturation began, if one is going on."""
        return self._since


class StormDetector:
    """Says when the signs of a connection storm exceed ``threshold`` within ``window``.

    A sign is a connection attempt that failed or a connection that had to be opened again
    (a reconnect after its predecessor was invalidated): what clients retrying against a
    struggling database, or a pool reconnecting after a failover, look like from the pool.
    The pool opening its own overflow for a burst, and closing it again afterwards, is not
    a sign: measured before this rule, a healthy burst of twice the pool fired this alert
    (issue #9), although every connection it opened was one the pool is configured to open.
    The caller feeds only signs (:meth:`~poolguard.core.parts.Parts.connection_opened`
    and ``connection_failed``).

    After firing it stays quiet until the rate falls below ``threshold / 2`` (hysteresis),
    so a rate hovering at the threshold does not alert on every attempt. Memory is bounded:
    only the last ``threshold + 1`` signs are kept, which is all it takes to know whether
    more than ``threshold`` fell within the window.
    """

    def __init__(self, *, threshold: int, window: float = 10.0) -> None:
        self.threshold = v.count("threshold", threshold)
        self.window = v.seconds("window", window)
        self._attempts: deque[tuple[float, bool]] = deque(maxlen=threshold + 1)
        self._storming = False

    def observe(self, now: float, failed: bool = False) -> bool:
        """Count one sign (a reconnect, or a failed attempt); True when it starts a storm."""
        self._attempts.append((now, bool(failed)))
        n = self._recent(now)
        if self._storming:
            if n < self.threshold / 2:
                self._storming = False
            return False
        if n > self.threshold:
            self._storming = True
            return True
        return False

    @property
    def storming(self) -> bool:
        return self._storming

    def counts(self, now: float) -> tuple[int, int]:
        """(signs, failed attempts) within the window, counted up to ``threshold + 1``."""
        start = now - self.window
        attempts = failed = 0
        for t, f in reversed(self._attempts):
            if t <= start:
                break
            attempts += 1
            failed += f
        return attempts, failed

    def _recent(self, now: float) -> int:
        start = now - self.window
        n = 0
        for t, _ in reversed(self._attempts):
            if t <= start:
                break
            n += 1
        return n
