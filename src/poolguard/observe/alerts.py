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

When to raise them is decided by pure, clock-injected detectors in
:mod:`poolguard.policy.detectors` (saturation, connection storms) and by the parts that see
the events (leaks, quarantine transitions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from poolguard import validate as v

__all__ = ["ALERT_KINDS", "Alert", "AlertKind", "Alerter"]

AlertKind = Literal[
    "saturation",
    "connection_storm",
    "leak",
    "quarantine_opened",
    "quarantine_closed",
    "fleet_degraded",
    "fleet_rejoined",
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
        v.callable_or_none("callback", callback)
        debounce = v.seconds("debounce", debounce, zero=True)
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        self.callback = callback
        self.debounce = debounce
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
