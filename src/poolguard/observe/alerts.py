"""Alerts: a debounced channel for the few events a human should hear about.

Metrics tell the story after the fact; an alert says "now". poolguard raises one for a pool
saturated for seconds on end, a storm of new connections (the retry spiral that finishes off a
struggling database), a leaked connection, and a statement quarantined or released.

Under an incident the same condition fires many times a second, so alerts are debounced per
``(kind, key)``: at most one per ``debounce`` seconds, and the next one that gets through says
how many were suppressed. Every alert is a structured WARNING on the ``poolguard.alerts``
logger and, optionally, a call to the application's callback (to page, post to chat, ...).
A failing callback is logged and swallowed: alerting must never break the request that
happened to trigger it.

The detectors are pure: they take the time as an argument and do no I/O, so their edge cases
are tested with a fake clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "Alert",
    "AlertKind",
    "Alerter",
    "SaturationDetector",
    "StormDetector",
]

AlertKind = Literal[
    "saturation", "connection_storm", "leak", "quarantine_opened", "quarantine_closed"
]
ALERT_KINDS: frozenset[str] = frozenset(get_args(AlertKind))

_LOGGER = logging.getLogger("poolguard.alerts")

#: Debounce entries kept before expired ones are pruned: keys are pool names, code locations
#: and fingerprint ids, so this is only a guard against an unbounded stream of distinct keys.
_MAX_KEYS = 4096


@dataclass(frozen=True)
class Alert:
    """One alert. ``attributes`` hold literal-free values only; ``at`` is ``time.time()``."""

    kind: AlertKind
    message: str
    attributes: Mapping[str, str | int | float]
    at: float


class _Debounce:
    __slots__ = ("last", "suppressed")

    def __init__(self, last: float) -> None:
        self.last = last
        self.suppressed = 0


class Alerter:
    """Debounces, logs and forwards alerts.

    ``emit`` takes the caller's clock reading (``time.monotonic()`` is the natural choice) so
    that debouncing is immune to wall-clock jumps and testable; the alert itself is stamped
    with ``time.time()`` for people and log pipelines. Safe to call from any thread.
    """

    def __init__(
        self,
        callback: Callable[[Alert], None] | None = None,
        *,
        debounce: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        if (
            isinstance(debounce, bool)
            or not isinstance(debounce, (int, float))
            or not math.isfinite(debounce)
            or debounce < 0
        ):
            raise ValueError(f"debounce must be a finite number of seconds >= 0, got {debounce!r}")
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        self.callback = callback
        self.debounce = float(debounce)
        self.logger = logger if logger is not None else _LOGGER
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], _Debounce] = {}

    def emit(
        self,
        kind: AlertKind,
        key: str,
        message: str,
        attributes: Mapping[str, str | int | float],
        now: float,
    ) -> bool:
        """Raise an alert unless one of the same ``(kind, key)`` went out within ``debounce``.

        Returns True when the alert was emitted. A suppressed alert is only counted; the next
        emitted one carries ``attributes["suppressed"]`` with that count (absent when nothing
        was suppressed).
        """
        if kind not in ALERT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(sorted(ALERT_KINDS))}; got {kind!r}")
        with self._lock:
            k = (kind, key)
            st = self._state.get(k)
            if st is not None and now - st.last < self.debounce:
                st.suppressed += 1
                return False
            suppressed = st.suppressed if st is not None else 0
            if st is None:
                if len(self._state) >= _MAX_KEYS:
                    self._prune(now)
                self._state[k] = _Debounce(now)
            else:
                st.last = now
                st.suppressed = 0
        attrs: dict[str, str | int | float] = dict(attributes)
        if suppressed:
            attrs["suppressed"] = suppressed
        alert = Alert(kind=kind, message=message, attributes=attrs, at=time.time())
        self.logger.warning(
            "poolguard alert %s: %s",
            kind,
            message,
            extra={"poolguard_alert": kind, "poolguard": dict(attrs)},
        )
        if self.callback is not None:
            try:
                self.callback(alert)
            except Exception as exc:
                # One line with the type only: the callback's own message may say anything,
                # and a traceback per alert would flood the log during the very incident.
                self.logger.error("poolguard alert callback failed with %s", type(exc).__name__)
        return True

    def _prune(self, now: float) -> None:
        # Entries past their window with nothing suppressed carry no information: the next
        # alert for them would go out anyway. If that is not enough, drop the oldest.
        expired = [
            k for k, v in self._state.items() if now - v.last >= self.debounce and not v.suppressed
        ]
        for k in expired:
            del self._state[k]
        if len(self._state) >= _MAX_KEYS:
            oldest = sorted(self._state, key=lambda k: self._state[k].last)
            for k in oldest[: len(self._state) - _MAX_KEYS // 2]:
                del self._state[k]


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return v


class SaturationDetector:
    """Says once when the pool has been saturated for ``sustain`` seconds without a break.

    A moment of saturation is normal (a burst the gate absorbs); minutes of it are an incident.
    The detector re-arms only after a non-saturated observation, so one incident gives one
    alert however long it lasts (and the alerter's debounce covers flapping).
    """

    def __init__(self, *, sustain: float = 5.0) -> None:
        self.sustain = _check_seconds("sustain", sustain, allow_zero=True)
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
    """Says when connection attempts (new or failed) exceed ``threshold`` within ``window``.

    A storm is what clients retrying against a struggling database look like from the pool:
    every new connection costs the server a process (PostgreSQL) or a thread, so it is worth
    a page. After firing it stays quiet until the rate falls below ``threshold / 2``
    (hysteresis), so a rate hovering at the threshold does not alert on every connect.

    Memory is bounded: only the last ``threshold + 1`` attempts are kept, which is all it takes
    to know whether more than ``threshold`` fell within the window.
    """

    def __init__(self, *, threshold: int, window: float = 10.0) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise TypeError(f"threshold must be an int, got {type(threshold).__name__}")
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold!r}")
        self.threshold = threshold
        self.window = _check_seconds("window", window, allow_zero=False)
        self._attempts: deque[tuple[float, bool]] = deque(maxlen=threshold + 1)
        self._storming = False

    def observe(self, now: float, failed: bool = False) -> bool:
        """Count one connection attempt; True when it starts a storm."""
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
        """(attempts, failed attempts) within the window, counted up to ``threshold + 1``."""
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
