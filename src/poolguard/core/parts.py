"""The parts of one guard and the few things they do for each other.

:class:`~poolguard.PoolGuard` builds one :class:`Parts` per engine and hands it to the
checkout path, the statement path, the outcome recorder and the watchdog; each reads what
it needs from it. Kept apart from the facade so that the paths do not depend on the public
class (and the watchdog can hold the parts by a weak reference).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy.engine import Engine

from poolguard.config import GuardConfig
from poolguard.core.holds import Hold
from poolguard.dialects import Enforcer
from poolguard.observe.alerts import Alerter
from poolguard.observe.fingerprint import Fingerprint
from poolguard.observe.refusals import RefusalCounts
from poolguard.observe.stats import StatsRegistry
from poolguard.observe.telemetry import Telemetry
from poolguard.policy.detectors import SaturationDetector, StormDetector
from poolguard.policy.gate import DEFAULT_PARTITION, Gate
from poolguard.policy.quarantine import Quarantine, Transition
from poolguard.policy.shedding import CoDelShedder

if TYPE_CHECKING:
    from poolguard.core.outcome import Outcomes
    from poolguard.core.own_sessions import OwnSessions
    from poolguard.fleet.protocol import FleetMember

__all__ = ["Parts"]

log = logging.getLogger("poolguard")

#: Partitions with a shedder of their own; further ones share the default partition's.
_MAX_SHEDDERS = 1000


@dataclass(eq=False, repr=False, kw_only=True)
class Parts:
    """One guard's state and collaborators. Attributes are set once by the facade: the
    collaborators it passes in, and the state derived from them in ``__post_init__``."""

    log: ClassVar[logging.Logger] = log
    clock = staticmethod(time.monotonic)

    config: GuardConfig
    engine: Engine
    pool_name: str
    gate: Gate
    enforcer: Enforcer
    quarantine: Quarantine
    telemetry: Telemetry
    alerts: Alerter
    fingerprint: Callable[[str], Fingerprint]
    storm_threshold: InitVar[int]

    def __post_init__(self, storm_threshold: int) -> None:
        config, enforcer = self.config, self.enforcer
        self.is_async: bool = self.engine.dialect.is_async
        self.stats = StatsRegistry(max_fingerprints=config.telemetry.max_fingerprints)
        self.refusals = RefusalCounts()
        self.held: dict[Any, Hold] = {}
        #: This guard's mark on the connections it prepared (``ConnState.owner``): a
        #: connection another guard prepared is prepared again.
        self.identity = object()
        self.shedders: dict[str, CoDelShedder] = {}
        self.saturation = SaturationDetector()
        self.storm = StormDetector(threshold=storm_threshold)
        self.leaks_reported = 0
        #: When the pool last opened a connection to grow (not to replace one): a queue
        #: behind connections being opened is a burst the pool is sized for.
        self.grew_at = -math.inf
        q = config.quarantine
        #: Only where the server can say who blocks whom, and name sessions to cancel.
        self.blame_lock_holders = q.blame_lock_holders and enforcer.can_blame
        self.cancel_quarantined = q.cancel_quarantined and enforcer.can_blame
        self.track_pids = self.blame_lock_holders or self.cancel_quarantined
        self.own_sessions: OwnSessions | None = None
        self.blame: OwnSessions | None = None
        self.outcomes: Outcomes
        self.fleet: FleetMember | None = None

    def shedder(self, partition: str) -> CoDelShedder:
        s = self.shedders.get(partition)
        if s is None:
            if len(self.shedders) >= _MAX_SHEDDERS:  # partitions named without bound
                partition = DEFAULT_PARTITION
            shed = self.config.shed
            s = self.shedders.setdefault(
                partition, CoDelShedder(target=shed.target, interval=shed.interval)
            )
        return s

    def refused(
        self,
        err: BaseException,
        kind: str,
        partition: str | None,
        fp: Fingerprint | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """One refusal (or time-out, or leak report): counted, in statistics and telemetry."""
        if kind != "leak":
            self.refusals.count(kind, partition)
            if fp is not None and kind in ("quarantined", "budget"):
                self.stats.record_refusal(fp, kind)
        self.telemetry.refusal(err, kind=kind, partition=partition, fingerprint=fp, timeout=timeout)

    def on_transition(self, t: Transition) -> None:
        self.telemetry.quarantine(t)
        kind: Literal["quarantine_opened", "quarantine_closed"] = (
            "quarantine_closed" if t.kind == "closed" else "quarantine_opened"
        )
        verb = {"opened": "quarantined", "reopened": "quarantined again", "closed": "released"}
        self.alerts.emit(
            kind,
            t.fingerprint,
            f"statement {t.summary} [{t.fingerprint}] {verb[t.kind]}"
            + (f" for {t.cooldown:.0f} s after {t.timeouts} time-outs" if t.cooldown else ""),
            {"fingerprint": t.fingerprint, "summary": t.summary, "cooldown": t.cooldown},
            time.monotonic(),
        )
        if self.fleet is not None:
            self.fleet.transition(t)
        if t.kind != "closed" and self.cancel_quarantined and self.own_sessions is not None:
            self.own_sessions.cancel_running(t.fingerprint)

    def connection_opened(self, now: float, *, reconnect: bool) -> None:
        """A connection was opened: a storm sign only when ``reconnect`` (the checkout path
        tells): a connection replacing an invalidated one (a disconnect, a failed pre-ping,
        a failover), or one a pool without pooling opens per checkout. A pool opening its
        own overflow for a burst is doing what it is configured to do.
        """
        if reconnect:
            self._storm_sign(now, failed=False)
        else:
            self.grew_at = now

    def connection_failed(self, now: float) -> None:
        """A connection attempt failed (the server refused, was down, or is unreachable)."""
        self._storm_sign(now, failed=True)

    def _storm_sign(self, now: float, *, failed: bool) -> None:
        if self.storm.observe(now, failed):
            attempts, failures = self.storm.counts(now)
            self.alerts.emit(
                "connection_storm",
                self.pool_name,
                f"connection storm on pool {self.pool_name}: more than "
                f"{self.storm.threshold} failed connects or reconnects within "
                f"{self.storm.window:g} s ({failures} failed)",
                {
                    "pool": self.pool_name,
                    "threshold": self.storm.threshold,
                    "attempts": attempts,
                    "failed": failures,
                },
                now,
            )

    def forget_checkouts(self) -> None:
        """After ``fork()``: the parent's checkouts are not the child's to return."""
        self.held.clear()
        self.gate.forget_holders()
