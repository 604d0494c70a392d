"""The guard's settings: typed, frozen, checked once where each option is defined.

``PoolGuard(engine, statement_timeout=2.0, ...)`` builds a :class:`GuardConfig` from its
keyword options; each section belongs to one part of the guard (as HikariConfig groups a
pool's settings), so a part receives only what it reads, already checked, and
``stats()["settings"]`` is derived from the same objects. Every default is explained in
docs/configuration.md with the measurement behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

from poolguard import validate as v

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from poolguard.observe.alerts import Alert

__all__ = [
    "AlertConfig",
    "GateConfig",
    "GuardConfig",
    "GuardOptions",
    "QuarantineConfig",
    "ShedConfig",
    "TelemetryConfig",
    "TimeoutConfig",
]

TraceMode = Literal["all", "slow", "off"]
PgMode = Literal["session", "transaction"]


@dataclass(frozen=True)
class TimeoutConfig:
    """What the server enforces per statement, and how long a caller waits or holds."""

    statement_timeout: float = 5.0
    checkout_timeout: float = 1.0
    hold_timeout: float = 30.0
    #: None: no lock wait of poolguard's. PoolGuard's ``lock_timeout="auto"`` (its default)
    #: resolves through :func:`auto_lock_timeout`.
    lock_timeout: float | None = 1.0
    idle_in_transaction_timeout: float | None = None
    pg_timeout_mode: PgMode = "session"
    reclaim_leaked: bool = False
    #: The user chose ``lock_timeout`` (not "auto"): on SQLite it then also replaces a busy
    #: timeout configured on the connection.
    lock_timeout_explicit: bool = False

    #: Fields that are not PoolGuard options (derived by :meth:`GuardConfig.from_options`).
    INTERNAL: ClassVar[frozenset[str]] = frozenset({"lock_timeout_explicit"})

    def __post_init__(self) -> None:
        v.seconds("statement_timeout", self.statement_timeout)
        v.seconds("checkout_timeout", self.checkout_timeout)
        v.seconds("hold_timeout", self.hold_timeout)
        v.optional_seconds("lock_timeout", self.lock_timeout)
        v.optional_seconds("idle_in_transaction_timeout", self.idle_in_transaction_timeout)
        v.choice("pg_timeout_mode", self.pg_timeout_mode, ("session", "transaction"))
        v.flag("reclaim_leaked", self.reclaim_leaked)


@dataclass(frozen=True)
class GateConfig:
    """The gate in front of the pool. ``capacity`` None: the pool's own size + overflow."""

    capacity: int | None = None
    critical_reserve: int | None = None
    partition_share: float = 0.5

    def __post_init__(self) -> None:
        v.optional_count("capacity", self.capacity)
        v.optional_count("critical_reserve", self.critical_reserve, minimum=0)
        v.share("partition_share", self.partition_share)

    def reserve_for(self, capacity: int) -> int:
        """A tenth of the pool for critical work, at least one connection from four up."""
        if self.critical_reserve is not None:
            return self.critical_reserve
        return capacity // 10 if capacity >= 10 else (1 if capacity >= 4 else 0)


@dataclass(frozen=True)
class QuarantineConfig:
    """When a statement is quarantined, for how long, and who else is blamed or stopped."""

    threshold: int = 3
    window: float = 60.0
    cooldown: float = 30.0
    allow: tuple[str, ...] = ()
    blame_lock_holders: bool = True
    cancel_quarantined: bool = True

    #: PoolGuard's option for each field whose name is not the option's own.
    OPTION_NAMES: ClassVar[dict[str, str]] = {
        "threshold": "quarantine_threshold",
        "window": "quarantine_window",
        "cooldown": "quarantine_cooldown",
        "allow": "quarantine_allow",
    }

    def __post_init__(self) -> None:
        v.count("quarantine_threshold", self.threshold)
        v.seconds("quarantine_window", self.window, limit=None)
        v.seconds("quarantine_cooldown", self.cooldown, limit=None)
        for item in self.allow:
            if not isinstance(item, str) or not item:
                raise TypeError(
                    "quarantine_allow must hold fingerprint ids or SQL strings, got "
                    f"{type(item).__name__}"
                )
        v.flag("blame_lock_holders", self.blame_lock_holders)
        v.flag("cancel_quarantined", self.cancel_quarantined)

    @property
    def max_cooldown(self) -> float:
        """Each reopening doubles the cool-down, up to ten minutes (or the cool-down itself)."""
        return max(600.0, self.cooldown)


@dataclass(frozen=True)
class ShedConfig:
    """CoDel's queue-delay target and interval (Meta's "Fail at Scale" starting numbers)."""

    target: float = 0.005
    interval: float = 0.1

    OPTION_NAMES: ClassVar[dict[str, str]] = {"target": "shed_target", "interval": "shed_interval"}

    def __post_init__(self) -> None:
        v.seconds("shed_target", self.target)
        v.seconds("shed_interval", self.interval)


@dataclass(frozen=True)
class TelemetryConfig:
    trace_statements: TraceMode = "all"
    slow_statement_threshold: float = 0.1
    pool_name: str | None = None
    max_fingerprints: int = 1000
    operation_metrics: bool = False
    exception_events: bool = True
    meter_provider: MeterProvider | None = field(default=None, compare=False)
    tracer_provider: TracerProvider | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        v.choice("trace_statements", self.trace_statements, ("all", "slow", "off"))
        v.seconds("slow_statement_threshold", self.slow_statement_threshold, zero=True)
        v.text("pool_name", self.pool_name, optional=True)
        v.count("max_fingerprints", self.max_fingerprints)
        v.flag("operation_metrics", self.operation_metrics)
        v.flag("exception_events", self.exception_events)
        v.provider("meter_provider", self.meter_provider, "get_meter")
        v.provider("tracer_provider", self.tracer_provider, "get_tracer")


@dataclass(frozen=True)
class AlertConfig:
    on_alert: Callable[[Alert], None] | None = field(default=None, compare=False)
    debounce: float = 60.0

    OPTION_NAMES: ClassVar[dict[str, str]] = {"debounce": "alert_debounce"}

    def __post_init__(self) -> None:
        v.callable_or_none("on_alert", self.on_alert)
        v.seconds("alert_debounce", self.debounce, zero=True)


class GuardOptions(TypedDict, total=False):
    """The keyword options of :class:`~poolguard.PoolGuard` (see docs/configuration.md)."""

    statement_timeout: float
    checkout_timeout: float
    hold_timeout: float
    reclaim_leaked: bool
    blame_lock_holders: bool
    cancel_quarantined: bool
    capacity: int | None
    critical_reserve: int | None
    partition_share: float
    pg_timeout_mode: PgMode
    lock_timeout: float | Literal["auto"] | None
    idle_in_transaction_timeout: float | None
    quarantine_threshold: int
    quarantine_window: float
    quarantine_cooldown: float
    quarantine_allow: Iterable[str]
    shed_target: float
    shed_interval: float
    trace_statements: TraceMode
    slow_statement_threshold: float
    on_alert: Callable[[Alert], None] | None
    alert_debounce: float
    pool_name: str | None
    max_fingerprints: int
    operation_metrics: bool
    exception_events: bool
    meter_provider: MeterProvider | None
    tracer_provider: TracerProvider | None


@dataclass(frozen=True)
class GuardConfig:
    """Every setting of one guard, by the part that reads it."""

    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    shed: ShedConfig = field(default_factory=ShedConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)

    @classmethod
    def from_options(cls, **options: Any) -> GuardConfig:
        """The keyword options of :class:`~poolguard.PoolGuard`, by section. Defaults live
        only on the sections' fields; an unknown option is a ``TypeError`` naming it."""
        fields: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        for name, value in options.items():
            where = _OPTIONS.get(name)
            if where is None:
                raise TypeError(f"PoolGuard() got an unexpected keyword argument {name!r}")
            fields[where[0]][where[1]] = value
        t = fields["timeouts"]
        t["lock_timeout_explicit"] = t.get("lock_timeout", "auto") != "auto"
        if not t["lock_timeout_explicit"]:
            statement = t.get("statement_timeout", TimeoutConfig.statement_timeout)
            v.seconds("statement_timeout", statement)
            t["lock_timeout"] = auto_lock_timeout(float(statement))
        q = fields["quarantine"]
        if "allow" in q:
            q["allow"] = _allow_list(q["allow"])
        return cls(**{section: kind(**fields[section]) for section, kind in _SECTIONS.items()})

    def settings(self) -> dict[str, Any]:
        """The JSON-serialisable part, for ``stats()["settings"]``."""
        t, g, q, s = self.timeouts, self.gate, self.quarantine, self.shed
        return {
            "statement_timeout": t.statement_timeout,
            "checkout_timeout": t.checkout_timeout,
            "hold_timeout": t.hold_timeout,
            "lock_timeout": t.lock_timeout,
            "idle_in_transaction_timeout": t.idle_in_transaction_timeout,
            "pg_timeout_mode": t.pg_timeout_mode,
            "partition_share": g.partition_share,
            "quarantine_threshold": q.threshold,
            "quarantine_window": q.window,
            "quarantine_cooldown": q.cooldown,
            "shed_target": s.target,
            "shed_interval": s.interval,
            "trace_statements": self.telemetry.trace_statements,
        }


#: The longest lock wait ``lock_timeout="auto"`` allows, in seconds: 18x the longest
#: legitimate wait measured on a hot row at 25-100 writes/s (55 ms,
#: benchmarks/outage_replay/lock_waits.py), and InnoDB's smallest (it counts whole seconds).
DEFAULT_LOCK_TIMEOUT = 1.0


def auto_lock_timeout(statement_timeout: float) -> float:
    """``lock_timeout="auto"``: shorter than the statement time-out, so a request stuck
    behind another's lock fails as a lock wait (never quarantined) while the lock holder's
    own statement is the one that hits statement_timeout and gets quarantined; and at most
    :data:`DEFAULT_LOCK_TIMEOUT`, because the first victim's lock wait is what names a rogue
    lock holder: it bounds how long the rogue's victims pile up (outage replay, scenario c:
    2.5 s let 12% of the hot row's writes fail, 88.2% healthy; see docs/configuration.md)."""
    return min(DEFAULT_LOCK_TIMEOUT, statement_timeout / 2)


def _allow_list(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError("quarantine_allow must be an iterable of fingerprints or SQL, not a str")
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "quarantine_allow must be an iterable of fingerprint ids or SQL strings, got "
            f"{type(value).__name__}"
        ) from None


#: GuardConfig's sections, by field name.
_SECTIONS: dict[str, Any] = {
    "timeouts": TimeoutConfig,
    "gate": GateConfig,
    "quarantine": QuarantineConfig,
    "shed": ShedConfig,
    "telemetry": TelemetryConfig,
    "alerts": AlertConfig,
}

#: Each PoolGuard option: (section, field), from the sections' own fields: an option is its
#: field's name unless the section's ``OPTION_NAMES`` prefixes it (``quarantine_window``).
_OPTIONS: dict[str, tuple[str, str]] = {
    getattr(kind, "OPTION_NAMES", {}).get(f.name, f.name): (section, f.name)
    for section, kind in _SECTIONS.items()
    for f in fields(kind)
    if f.name not in getattr(kind, "INTERNAL", ())
}
