"""OpenTelemetry metrics of a fleet member: leases, borrowing and degraded mode.

Gauges are observed (read at collection time from the member's last known figures, never
from Redis); counters and the borrow-duration histogram are recorded as things happen.
Every point carries ``poolguard.fleet.name``. The member is held weakly: a closed member's
gauges report nothing and it can be collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

__all__ = ["FleetMetrics"]

#: Borrow round trips are sub-millisecond on loopback and bounded by the socket time-out.
_BORROW_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _Figures(Protocol):
    closed: bool

    def figures(self) -> dict[str, int]: ...


class FleetMetrics:
    """The instruments of one member."""

    def __init__(
        self, member: _Figures, *, fleet: str, meter_provider: MeterProvider | None
    ) -> None:
        from poolguard import __version__

        meter = metrics.get_meter("poolguard.fleet", __version__, meter_provider)
        self.attrs = {"poolguard.fleet.name": fleet}
        ref = weakref.ref(member)

        def gauge(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(_: CallbackOptions) -> Iterable[Observation]:
                m = ref()
                if m is None or m.closed:
                    return []
                return [Observation(m.figures()[key], self.attrs)]

            return observe

        # (name, unit, description, up-down counter or gauge)
        observed = (
            ("leases", "{connection}",
             "Leases of the fleet's connection budget this member holds", True),
            ("share", "{connection}",
             "This member's base share: leases kept without a round trip", True),
            ("capacity", "{connection}",
             "Slots this member's gate may grant (its leases, or its fallback)", True),
            ("members", "{member}", "Live members of the fleet, as last seen", False),
            ("degraded", "1",
             "1 while this member cannot reach Redis and runs on its local cap", False),
        )  # fmt: skip
        for key, unit, description, up_down in observed:
            create = (
                meter.create_observable_up_down_counter
                if up_down
                else meter.create_observable_gauge
            )
            create(f"poolguard.fleet.{key}", [gauge(key)], unit=unit, description=description)
        self._borrows = meter.create_counter(
            "poolguard.fleet.borrows",
            unit="{borrow}",
            description="Borrow attempts by outcome: granted, refused, failed, skipped",
        )
        self._degraded = meter.create_counter(
            "poolguard.fleet.degraded_episodes",
            unit="{episode}",
            description="Times this member lost Redis and fell back to its local cap",
        )
        try:
            self._borrow_time = meter.create_histogram(
                "poolguard.fleet.borrow.duration",
                unit="s",
                description="Round trip of a borrow, from the checkout that needed it",
                explicit_bucket_boundaries_advisory=list(_BORROW_BUCKETS),
            )
        except TypeError:  # opentelemetry-api < 1.23: no advisory buckets
            self._borrow_time = meter.create_histogram(
                "poolguard.fleet.borrow.duration",
                unit="s",
                description="Round trip of a borrow, from the checkout that needed it",
            )

    def borrow(self, outcome: str, seconds: float | None) -> None:
        self._borrows.add(1, {**self.attrs, "outcome": outcome})
        if seconds is not None:
            self._borrow_time.record(seconds, {**self.attrs, "outcome": outcome})

    def degraded(self) -> None:
        self._degraded.add(1, self.attrs)
