"""The instruments of one guarded pool, by the database semantic conventions
(``db.client.connection.*``) and poolguard's own (``poolguard.*``): created once, from one
meter. The pool's gauges are observed by callbacks at collection time, never on a hot path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

from poolguard.observe.semconv import (
    CREATE_BUCKETS,
    OPERATION_BUCKETS,
    USE_BUCKETS,
    WAIT_BUCKETS,
)

if TYPE_CHECKING:
    from poolguard.observe.telemetry import PoolState

__all__ = ["Instruments", "create_instruments"]

Callback = Callable[[CallbackOptions], Iterable[Observation]]


@dataclass(frozen=True)
class Instruments:
    wait_time: Histogram
    create_time: Histogram
    use_time: Histogram
    conn_timeouts: Counter
    op_duration: Histogram | None
    refusals: Counter
    shed: Counter
    stmt_timeouts: Counter
    transitions: Counter


#: poolguard's own counters: (Instruments field, name, unit, description).
_OWN_COUNTERS = (
    ("refusals", "poolguard.refusals", "{refusal}",
     "Work poolguard refused, by kind (saturated, timeout, quarantined, budget, shed, leak)."),
    ("shed", "poolguard.shed", "{request}", "Requests shed before their handler ran."),
    ("stmt_timeouts", "poolguard.statement.timeouts", "{timeout}",
     "Statements stopped by their time-out."),
    ("transitions", "poolguard.quarantine.transitions", "{transition}",
     "Quarantine circuit-breaker transitions of a statement fingerprint."),
)  # fmt: skip


def create_instruments(
    meter: Meter,
    *,
    operation_metrics: bool,
    observe_count: Callback,
    gauge: Callable[[Callable[[PoolState], int]], Callback],
) -> Instruments:
    # -- semantic-convention instruments ---------------------------------------------------
    wait_time = histogram(
        meter,
        "db.client.connection.wait_time",
        "s",
        "The time it took to obtain an open connection from the pool.",
        WAIT_BUCKETS,
    )
    create_time = histogram(
        meter,
        "db.client.connection.create_time",
        "s",
        "The time it took to create a new connection.",
        CREATE_BUCKETS,
    )
    use_time = histogram(
        meter,
        "db.client.connection.use_time",
        "s",
        "The time between borrowing a connection and returning it to the pool.",
        USE_BUCKETS,
    )
    conn_timeouts = meter.create_counter(
        "db.client.connection.timeouts",
        unit="{timeout}",
        description="The number of connection timeouts that have occurred trying to "
        "obtain a connection from the pool.",
    )
    op_duration: Histogram | None = None
    if operation_metrics:
        op_duration = histogram(
            meter,
            "db.client.operation.duration",
            "s",
            "Duration of database client operations.",
            OPERATION_BUCKETS,
        )
    # The conventions make these UpDownCounters; values read from the pool are observed,
    # so they are the asynchronous kind, read by the SDK at collection time.
    meter.create_observable_up_down_counter(
        "db.client.connection.count",
        callbacks=[observe_count],
        unit="{connection}",
        description="The number of connections that are currently in state described by "
        "the `state` attribute.",
    )
    gauges: tuple[tuple[str, str, str, Callable[[PoolState], int]], ...] = (
        ("max", "{connection}", "The maximum number of open connections allowed.",
         lambda st: st.max),
        ("idle.max", "{connection}", "The maximum number of idle open connections allowed.",
         lambda st: st.idle_max),
        ("idle.min", "{connection}", "The minimum number of idle open connections allowed.",
         lambda st: st.idle_min),
        ("pending_requests", "{request}",
         "The number of current pending requests for an open connection.",
         lambda st: st.pending),
    )  # fmt: skip
    for suffix, unit, description, read in gauges:
        meter.create_observable_up_down_counter(
            f"db.client.connection.{suffix}",
            callbacks=[gauge(read)],
            unit=unit,
            description=description,
        )

    # -- poolguard's own ---------------------------------------------------------------------
    own = {
        field: meter.create_counter(name, unit=unit, description=description)
        for field, name, unit, description in _OWN_COUNTERS
    }
    return Instruments(
        wait_time=wait_time,
        create_time=create_time,
        use_time=use_time,
        conn_timeouts=conn_timeouts,
        op_duration=op_duration,
        **own,
    )


def histogram(
    meter: Meter, name: str, unit: str, description: str, buckets: tuple[float, ...]
) -> Histogram:
    try:
        return meter.create_histogram(
            name,
            unit=unit,
            description=description,
            explicit_bucket_boundaries_advisory=buckets,
        )
    except TypeError:  # pragma: no cover - opentelemetry-api < 1.23 has no bucket advice
        return meter.create_histogram(name, unit=unit, description=description)
