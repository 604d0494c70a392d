"""OpenTelemetry metrics and spans for one guarded pool.

Names, units, instrument kinds and attributes follow the OpenTelemetry semantic conventions
for database clients, v1.44.0 (``db.client.connection.*``, ``db.client.operation.duration``,
``db.system.name``, ``db.query.summary`` ...); poolguard's own signals live under
``poolguard.*``. docs/telemetry.md is the reference for every name emitted here.

Three rules shape this module:

* **The hot path pays nothing it does not use.** :meth:`Telemetry.statement` runs after every
  statement. It returns after one or two attribute reads unless a span will be kept (a recording
  parent in ``"all"`` mode, a slow statement in ``"slow"`` mode) or the opt-in operation
  histogram is on. Spans are built after the fact from the two timestamps, so nothing happens
  before the statement runs. Pool gauges are observed by callbacks at collection time.
* **Never a literal.** Attribute values are fingerprint ids, summaries, literal-free normal
  forms, partition names, class names and numbers. Driver exception messages can quote the SQL
  with its literals, so exceptions are never recorded with ``Span.record_exception``: the
  exception event is built here from the class name and, for poolguard's own errors (which are
  literal-free by construction), their message.
* **The API alone is enough.** With only ``opentelemetry-api`` installed (or no SDK configured)
  nothing is built or recorded at all. Whether a tracer or a meter can record is decided once:
  a no-op one never can; one from the global providers (the API's proxies) can once a global
  provider is set, which the hot paths notice by one dict read of the API's module state per
  statement or checkout (then :meth:`Telemetry.went_live` brings the state up to date). While
  nothing can record, they skip their calls here altogether (:attr:`Telemetry.live`,
  :attr:`Telemetry.metered`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, cast

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, NoOpMeter, Observation
from opentelemetry.metrics import _internal as _metrics_state
from opentelemetry.trace import NoOpTracer, ProxyTracer, SpanKind, Status, StatusCode

from poolguard import __version__
from poolguard.errors import PoolGuardError, QueryTimeout

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue
    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "FingerprintLike",
    "PoolState",
    "Telemetry",
    "TransitionLike",
    "db_system_name",
    "instrumented_by_opentelemetry",
]

#: The semantic-conventions release followed here (and announced as the scope's schema URL).
SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SCOPE_NAME = "poolguard"

# -- attribute keys (semantic conventions) ------------------------------------------------------
DB_SYSTEM_NAME = "db.system.name"
DB_OPERATION_NAME = "db.operation.name"
DB_QUERY_SUMMARY = "db.query.summary"
DB_QUERY_TEXT = "db.query.text"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
DB_POOL_NAME = "db.client.connection.pool.name"
DB_CONNECTION_STATE = "db.client.connection.state"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
# -- attribute keys (poolguard) -------------------------------------------------------------------
PG_FINGERPRINT = "poolguard.fingerprint"
PG_PARTITION = "poolguard.partition"
PG_PRIORITY = "poolguard.priority"
PG_TIMEOUT = "poolguard.timeout"
PG_OUTCOME = "poolguard.outcome"
PG_REFUSAL_KIND = "poolguard.refusal.kind"
PG_SHED_REASON = "poolguard.shed.reason"
PG_TRANSITION = "poolguard.quarantine.transition"

#: A pool wait shorter than this is the fast path (a free slot): it gets no span.
WAIT_SPAN_THRESHOLD_NS = 500_000

# Bucket advice. The convention gives boundaries for db.client.operation.duration; the SDK's
# default boundaries (0 .. 10000) were made for milliseconds and would put every wait measured
# in seconds into the first bucket, so the pool histograms get second-scale advice too.
_OPERATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CREATE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_USE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# Dialect names that differ from the convention's well-known db.system.name values.
_DB_SYSTEM_NAMES = {
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
    "postgres": "postgresql",
}
# A database status code is kept only if it looks like a code (SQLSTATE, SQLITE_*, a number):
# it must never become a channel for a message.
_STATUS_CODE = re.compile(r"[A-Z0-9_]{1,40}")

_OFF, _ALL, _SLOW = 0, 1, 2
_MODES = {"off": _OFF, "all": _ALL, "slow": _SLOW}

_get_current_span = trace.get_current_span

# Whether a tracer or meter records: never (a no-op one), once a global provider is set (the
# API's proxies, for which the API keeps the global in module state), or now.
_NEVER, _WATCH, _NOW = 0, 1, 2
#: The names under which the API's modules keep the global providers (None until set).
TRACER_PROVIDER = "_TRACER_PROVIDER"
METER_PROVIDER = "_METER_PROVIDER"
#: An API without them: every proxy counts as recording, as before this check existed.
_CAN_WATCH = hasattr(trace, TRACER_PROVIDER) and hasattr(_metrics_state, METER_PROVIDER)


def _tracer_state(tracer: object) -> int:
    if isinstance(tracer, NoOpTracer):
        return _NEVER
    if isinstance(tracer, ProxyTracer) and _CAN_WATCH and trace._TRACER_PROVIDER is None:
        return _WATCH
    return _NOW


def _meter_state(meter: object) -> int:
    if isinstance(meter, NoOpMeter):
        return _NEVER
    if (
        type(meter).__name__ == "_ProxyMeter"
        and _CAN_WATCH
        and _metrics_state._METER_PROVIDER is None
    ):
        return _WATCH
    return _NOW


class FingerprintLike(Protocol):
    """What telemetry reads from a :class:`poolguard.fingerprint.Fingerprint`.

    A structural type so that this module depends on no other poolguard module but the errors.
    """

    @property
    def id(self) -> str: ...
    @property
    def normalized(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def operation(self) -> str | None: ...


class TransitionLike(Protocol):
    """What telemetry reads from a :class:`poolguard.quarantine.Transition`."""

    @property
    def kind(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def cooldown(self) -> float: ...
    @property
    def timeouts(self) -> int: ...


@dataclass(frozen=True)
class PoolState:
    """The pool as the gauges report it, read at collection time (never on the hot path)."""

    idle: int
    used: int
    max: int
    idle_max: int
    idle_min: int
    pending: int


class Telemetry:
    """Spans and metrics for one guarded pool.

    Instruments are created once, here, from the global providers unless providers are passed
    (tests and applications with several SDK pipelines pass them). ``statement_spans=False`` is
    for engines that opentelemetry-instrumentation-sqlalchemy already traces (see
    :func:`instrumented_by_opentelemetry`): statements are then never traced twice, while
    waits, refusals and the pool metrics, which that package does not provide, stay.

    Timestamps (``start_ns``, ``end_ns``) are ``time.time_ns()`` readings: they become span
    times as they are, without conversion.
    """

    def __init__(
        self,
        *,
        pool_name: str,
        db_system: str,
        pool_state: Callable[[], PoolState | None],
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        trace_statements: Literal["all", "slow", "off"] = "all",
        slow_statement_threshold: float = 0.1,
        statement_spans: bool = True,
        operation_metrics: bool = False,
        exception_events: bool = True,
    ) -> None:
        if not isinstance(pool_name, str) or not pool_name:
            raise ValueError(f"pool_name must be a non-empty str, got {pool_name!r}")
        if not isinstance(db_system, str) or not db_system:
            raise ValueError(f"db_system must be a non-empty str, got {db_system!r}")
        if not callable(pool_state):
            raise TypeError(f"pool_state must be callable, got {type(pool_state).__name__}")
        if trace_statements not in _MODES:
            raise ValueError(
                f"trace_statements must be one of 'all', 'slow', 'off'; got {trace_statements!r}"
            )
        if (
            isinstance(slow_statement_threshold, bool)
            or not isinstance(slow_statement_threshold, (int, float))
            or not math.isfinite(slow_statement_threshold)
            or slow_statement_threshold < 0
        ):
            raise ValueError(
                "slow_statement_threshold must be a finite number of seconds >= 0, "
                f"got {slow_statement_threshold!r}"
            )
        self.pool_name = pool_name
        self.db_system = _DB_SYSTEM_NAMES.get(db_system, db_system)
        self.trace_statements = trace_statements
        self.slow_statement_threshold = float(slow_statement_threshold)
        self.statement_spans = bool(statement_spans)
        self.operation_metrics = bool(operation_metrics)
        self.exception_events = bool(exception_events)
        self._pool_state = pool_state
        self._closed = False

        # Hot-path state, resolved once.
        self._mode = _MODES[trace_statements] if statement_spans else _OFF
        self._slow_ns = round(self.slow_statement_threshold * 1e9)
        self._pool_attrs: dict[str, AttributeValue] = {DB_POOL_NAME: pool_name}

        self._tracer = trace.get_tracer(
            SCOPE_NAME, __version__, tracer_provider, schema_url=SCHEMA_URL
        )
        meter = metrics.get_meter(SCOPE_NAME, __version__, meter_provider, schema_url=SCHEMA_URL)
        self._tracing = _tracer_state(self._tracer)
        self._metering = _meter_state(meter)
        #: Attributes of the zero-wait histogram point, per (partition, priority).
        self._no_wait_attrs: dict[tuple[str, str], dict[str, AttributeValue]] = {}
        self.live = self.metered = self.traced = False
        self.spans_pending = self.meter_pending = False
        #: The API modules' namespaces, where the hot paths look for a global provider
        #: while one is pending: a dict read, where asking :meth:`went_live` is a call.
        self.trace_api: dict[str, object] = vars(trace)
        self.metrics_api: dict[str, object] = vars(_metrics_state)
        self._refresh()

        # -- semantic-convention instruments ---------------------------------------------------
        self._wait_time = _histogram(
            meter,
            "db.client.connection.wait_time",
            "s",
            "The time it took to obtain an open connection from the pool.",
            _WAIT_BUCKETS,
        )
        self._create_time = _histogram(
            meter,
            "db.client.connection.create_time",
            "s",
            "The time it took to create a new connection.",
            _CREATE_BUCKETS,
        )
        self._use_time = _histogram(
            meter,
            "db.client.connection.use_time",
            "s",
            "The time between borrowing a connection and returning it to the pool.",
            _USE_BUCKETS,
        )
        self._conn_timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self._op_duration: Histogram | None = None
        if operation_metrics:
            self._op_duration = _histogram(
                meter,
                "db.client.operation.duration",
                "s",
                "Duration of database client operations.",
                _OPERATION_BUCKETS,
            )
        # The conventions make these UpDownCounters; values read from the pool are observed,
        # so they are the asynchronous kind, read by the SDK at collection time.
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
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
                callbacks=[self._gauge(read)],
                unit=unit,
                description=description,
            )

        # -- poolguard's own ---------------------------------------------------------------------
        self._refusals = meter.create_counter(
            "poolguard.refusals",
            unit="{refusal}",
            description="Work poolguard refused, by kind (saturated, timeout, quarantined, "
            "budget, shed, leak).",
        )
        self._shed = meter.create_counter(
            "poolguard.shed",
            unit="{request}",
            description="Requests shed before their handler ran.",
        )
        self._stmt_timeouts = meter.create_counter(
            "poolguard.statement.timeouts",
            unit="{timeout}",
            description="Statements stopped by their time-out.",
        )
        self._transitions = meter.create_counter(
            "poolguard.quarantine.transitions",
            unit="{transition}",
            description="Quarantine circuit-breaker transitions of a statement fingerprint.",
        )

    # -- whether anything records ----------------------------------------------------------------
    def _refresh(self) -> None:
        self.traced = self._tracing == _NOW
        self.metered = self._metering == _NOW
        #: :meth:`statement` may record something: a span (in a mode that keeps some), or
        #: the operation histogram (asked for, and a meter that records or may soon).
        self.live = (self.traced and self._mode != _OFF) or (
            self.operation_metrics and self._metering != _NEVER
        )
        #: Statement spans wait for a global TracerProvider (``trace_api[TRACER_PROVIDER]``).
        self.spans_pending = self._tracing == _WATCH and self._mode != _OFF
        #: Pool metrics wait for a global MeterProvider (``metrics_api[METER_PROVIDER]``).
        self.meter_pending = self._metering == _WATCH

    def went_live(self) -> bool:
        """Whether a global provider a proxy waited for was set since the last look; then
        :attr:`live`, :attr:`traced` and :attr:`metered` are brought up to date. Reads the
        API's module state, nothing else; at most twice True in a process's life."""
        changed = False
        if self._tracing == _WATCH and trace._TRACER_PROVIDER is not None:
            self._tracing = _NOW
            changed = True
        if self._metering == _WATCH and _metrics_state._METER_PROVIDER is not None:
            self._metering = _NOW
            changed = True
        if changed:
            self._refresh()
        return changed

    # -- the hot path --------------------------------------------------------------------------
    def statement(
        self,
        fp: FingerprintLike,
        start_ns: int,
        end_ns: int,
        *,
        partition: str | None,
        timeout: float | None,
        error: BaseException | None,
    ) -> None:
        """Report one finished statement.

        The statement path calls it only while :attr:`live` (an SDK may record); the common
        case then (no span wanted, no operation histogram) returns after a couple of
        attribute reads and, in ``"all"`` mode, one context lookup.
        """
        if self.spans_pending or self.meter_pending:  # a failure's report comes unasked
            self.went_live()
        if self._op_duration is not None and self.metered:
            self._record_operation(fp, start_ns, end_ns, error)
        mode = self._mode
        if mode == _OFF or not self.traced:
            return
        if mode == _ALL:
            if not _get_current_span().is_recording():
                return
        elif end_ns - start_ns < self._slow_ns:
            return
        self._statement_span(fp, start_ns, end_ns, partition, timeout, error)

    def _record_operation(
        self, fp: FingerprintLike, start_ns: int, end_ns: int, error: BaseException | None
    ) -> None:
        assert self._op_duration is not None
        attrs: dict[str, AttributeValue] = {
            DB_SYSTEM_NAME: self.db_system,
            DB_QUERY_SUMMARY: fp.summary,
        }
        if fp.operation:
            attrs[DB_OPERATION_NAME] = fp.operation
        if error is not None:
            attrs[ERROR_TYPE] = error_type(error)
            code = response_status_code(error)
            if code is not None:
                attrs[DB_RESPONSE_STATUS_CODE] = code
        self._op_duration.record((end_ns - start_ns) / 1e9, attrs)

    def _statement_span(
        self,
        fp: FingerprintLike,
        start_ns: int,
        end_ns: int,
        partition: str | None,
        timeout: float | None,
        error: BaseException | None,
    ) -> None:
        attrs: dict[str, AttributeValue] = {
            DB_SYSTEM_NAME: self.db_system,
            DB_QUERY_SUMMARY: fp.summary,
            DB_QUERY_TEXT: fp.normalized,
            PG_FINGERPRINT: fp.id,
        }
        if fp.operation:
            attrs[DB_OPERATION_NAME] = fp.operation
        if partition is not None:
            attrs[PG_PARTITION] = partition
        if timeout is not None:
            attrs[PG_TIMEOUT] = timeout
        if error is not None:
            attrs[ERROR_TYPE] = error_type(error)
            code = response_status_code(error)
            if code is not None:
                attrs[DB_RESPONSE_STATUS_CODE] = code
        # Span name per the conventions: {db.query.summary}, else the operation, else the system.
        name = fp.summary or fp.operation or self.db_system
        span = self._tracer.start_span(
            name, kind=SpanKind.CLIENT, attributes=attrs, start_time=start_ns
        )
        if error is not None:
            self._mark_failed(span, error, end_ns)
        span.end(end_time=end_ns)

    # -- the pool --------------------------------------------------------------------------------
    def no_wait(self, *, partition: str, priority: str) -> None:
        """A checkout that got its slot without waiting: a 0 in the wait-time histogram.

        The checkout path calls it only while :attr:`metered` (a wait this short never gets
        a span); the attributes are built once per partition and priority.
        """
        key = (partition, priority)
        attrs = self._no_wait_attrs.get(key)
        if attrs is None:
            if len(self._no_wait_attrs) >= 1024:  # partitions named without bound
                self._no_wait_attrs.clear()
            attrs = self._no_wait_attrs[key] = {
                DB_POOL_NAME: self.pool_name,
                PG_PARTITION: partition,
                PG_PRIORITY: priority,
            }
        self._wait_time.record(0.0, attrs)

    def pool_wait(
        self, start_ns: int, end_ns: int, *, partition: str, priority: str, acquired: bool
    ) -> None:
        """Report one wait for a connection slot (the gate's, in front of the pool).

        Every wait feeds ``db.client.connection.wait_time``; only a wait that really waited
        (over 0.5 ms) or timed out gets a span, so the fast path stays span-free.
        """
        attrs: dict[str, AttributeValue] = {
            DB_POOL_NAME: self.pool_name,
            PG_PARTITION: partition,
            PG_PRIORITY: priority,
        }
        if not acquired:
            self._conn_timeouts.add(1, attrs)
            attrs = {**attrs, ERROR_TYPE: "timeout"}
        waited_ns = end_ns - start_ns
        self._wait_time.record(max(0, waited_ns) / 1e9, attrs)
        if acquired and waited_ns <= WAIT_SPAN_THRESHOLD_NS:
            return
        span_attrs = {**attrs, PG_OUTCOME: "acquired" if acquired else "timeout"}
        span = self._tracer.start_span(
            "poolguard pool wait",
            kind=SpanKind.INTERNAL,
            attributes=span_attrs,
            start_time=start_ns,
        )
        if not acquired:
            span.set_status(Status(StatusCode.ERROR, "no connection slot before the wait bound"))
        span.end(end_time=end_ns)

    def connection_created(self, seconds: float) -> None:
        """A new DBAPI connection took ``seconds`` to open."""
        self._create_time.record(seconds, self._pool_attrs)

    def connection_used(self, seconds: float) -> None:
        """A connection went back to the pool after ``seconds`` checked out (the checkout
        path calls it only while :attr:`metered`)."""
        self._use_time.record(seconds, self._pool_attrs)

    # -- refusals and policy events ---------------------------------------------------------------
    def refusal(
        self,
        exc: BaseException,
        *,
        kind: str,
        partition: str | None,
        fingerprint: FingerprintLike | None = None,
        timeout: float | None = None,
    ) -> None:
        """Report work poolguard refused or stopped: a counter and a short ERROR span.

        A :class:`~poolguard.errors.QueryTimeout` also counts in
        ``poolguard.statement.timeouts``: the statement span only sees the driver's own error,
        which cannot be told apart from other failures without the dialect.
        """
        attrs: dict[str, AttributeValue] = {
            DB_POOL_NAME: self.pool_name,
            PG_REFUSAL_KIND: kind,
        }
        if partition is not None:
            attrs[PG_PARTITION] = partition
        if fingerprint is not None:
            attrs[DB_QUERY_SUMMARY] = fingerprint.summary
        self._refusals.add(1, attrs)
        if isinstance(exc, QueryTimeout) and exc.cause != "quarantined":
            t_attrs: dict[str, AttributeValue] = {
                DB_POOL_NAME: self.pool_name,
                DB_QUERY_SUMMARY: fingerprint.summary if fingerprint is not None else exc.summary,
            }
            if partition is not None:
                t_attrs[PG_PARTITION] = partition
            self._stmt_timeouts.add(1, t_attrs)

        span_attrs: dict[str, AttributeValue] = {
            DB_SYSTEM_NAME: self.db_system,
            PG_REFUSAL_KIND: kind,
            ERROR_TYPE: error_type(exc),
        }
        if partition is not None:
            span_attrs[PG_PARTITION] = partition
        if fingerprint is not None:
            span_attrs[PG_FINGERPRINT] = fingerprint.id
            span_attrs[DB_QUERY_SUMMARY] = fingerprint.summary
        if timeout is not None:
            span_attrs[PG_TIMEOUT] = timeout
        now = time.time_ns()
        span = self._tracer.start_span(
            "poolguard refused", kind=SpanKind.INTERNAL, attributes=span_attrs, start_time=now
        )
        self._mark_failed(span, exc, now)
        span.end(end_time=now)

    def shed(self, *, reason: str, priority: str, partition: str | None) -> None:
        """Count a request shed before its handler ran."""
        attrs: dict[str, AttributeValue] = {
            DB_POOL_NAME: self.pool_name,
            PG_SHED_REASON: reason,
            PG_PRIORITY: priority,
        }
        if partition is not None:
            attrs[PG_PARTITION] = partition
        self._shed.add(1, attrs)

    def quarantine(self, transition: TransitionLike) -> None:
        """Count a quarantine transition; fingerprints are bounded here, so the id is kept."""
        self._transitions.add(
            1,
            {
                DB_POOL_NAME: self.pool_name,
                PG_TRANSITION: transition.kind,
                DB_QUERY_SUMMARY: transition.summary,
                PG_FINGERPRINT: transition.fingerprint,
            },
        )

    def close(self) -> None:
        """Stop the pool observations.

        The metrics API cannot unregister an observable callback, so after close the callbacks
        stay registered but report nothing (and no longer touch the pool, which may be gone).
        """
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    # -- helpers -----------------------------------------------------------------------------------
    def _mark_failed(self, span: trace.Span, exc: BaseException, at_ns: int) -> None:
        if not span.is_recording():
            return
        message = safe_message(exc)
        span.set_status(Status(StatusCode.ERROR, message))
        if self.exception_events:
            # Built by hand, never Span.record_exception: that would export str(exc), which for a
            # driver error quotes the SQL with its literals, and a traceback with local values.
            span.add_event(
                "exception",
                {EXCEPTION_TYPE: qualified_name(type(exc)), EXCEPTION_MESSAGE: message},
                timestamp=at_ns,
            )

    def _read_state(self) -> PoolState | None:
        if self._closed:
            return None
        return self._pool_state()

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        state = self._read_state()
        if state is None:
            return ()
        return (
            Observation(state.idle, {DB_POOL_NAME: self.pool_name, DB_CONNECTION_STATE: "idle"}),
            Observation(state.used, {DB_POOL_NAME: self.pool_name, DB_CONNECTION_STATE: "used"}),
        )

    def _gauge(
        self, read: Callable[[PoolState], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            state = self._read_state()
            if state is None:
                return ()
            return (Observation(read(state), self._pool_attrs),)

        return callback


# -- literal-free views of exceptions ------------------------------------------------------------
def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class; builtins by their bare name (``TimeoutError``)."""
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    if not module or module == "builtins":
        return str(name)
    return f"{module}.{name}"


def _unwrap(exc: BaseException) -> BaseException:
    # SQLAlchemy wraps the driver's exception in a generic DBAPIError; the conventions prefer
    # the original. poolguard's own errors are the most relevant type and are kept as they are.
    if isinstance(exc, PoolGuardError):
        return exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException) and _is_sqlalchemy_wrapper(exc):
        return orig
    return exc


def _is_sqlalchemy_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("sqlalchemy.")


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: the qualified class name of the most relevant one."""
    return qualified_name(type(_unwrap(exc)))


def safe_message(exc: BaseException) -> str:
    """A message that cannot carry a literal.

    poolguard's own errors are built from fingerprints, summaries and numbers, so their text
    is kept; any other exception is described by its class name only.
    """
    if isinstance(exc, PoolGuardError):
        try:
            return str(exc)
        except Exception:  # a broken __str__ must not break reporting
            return type(exc).__name__
    return type(_unwrap(exc)).__name__


def response_status_code(exc: BaseException) -> str | None:
    """The database's status code (SQLSTATE, MySQL error number, SQLite error name), if any."""
    orig = _unwrap(exc)
    for attr in ("sqlstate", "pgcode", "sqlite_errorname"):
        value = getattr(orig, attr, None)
        if isinstance(value, str) and _STATUS_CODE.fullmatch(value):
            return value
    args = getattr(orig, "args", ())
    if (
        type(orig).__module__.split(".")[0] in ("pymysql", "MySQLdb", "aiomysql", "mysql")
        and args
        and type(args[0]) is int
    ):
        return str(args[0])
    return None


def db_system_name(dialect: Dialect) -> str:
    """The convention's ``db.system.name`` for a SQLAlchemy dialect (MariaDB told from MySQL)."""
    if getattr(dialect, "is_mariadb", False):
        return "mariadb"
    return _DB_SYSTEM_NAMES.get(dialect.name, dialect.name)


def _histogram(
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


# -- opentelemetry-instrumentation-sqlalchemy ----------------------------------------------------
_OTEL_SQLALCHEMY = "opentelemetry.instrumentation.sqlalchemy"


def instrumented_by_opentelemetry(engine: Engine | AsyncEngine) -> bool:
    """True when opentelemetry-instrumentation-sqlalchemy traces this engine's statements.

    That package registers a ``before_cursor_execute`` listener (a method of its
    ``EngineTracer``) on each engine it instruments, either on the engine itself
    (``instrument(engine=...)``) or on every engine created after a global ``instrument()``.
    Pass ``statement_spans=not instrumented_by_opentelemetry(engine)`` so that no statement is
    traced twice. Nothing of that package is imported.
    """
    target = cast("Engine", getattr(engine, "sync_engine", engine))
    return any(_from_otel(fn) for fn in target.dispatch.before_cursor_execute)


def _from_otel(fn: object, depth: int = 0) -> bool:
    if depth > 3:
        return False
    candidates: list[object] = [fn, getattr(fn, "__func__", None)]
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        candidates.append(type(owner))
    for c in candidates:
        module = getattr(c, "__module__", None)
        if isinstance(module, str) and (
            module == _OTEL_SQLALCHEMY or module.startswith(_OTEL_SQLALCHEMY + ".")
        ):
            return True
    # Listeners SQLAlchemy adapts (legacy signatures, retval wrappers) close over the original.
    inner = [getattr(fn, "__wrapped__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return any(callable(x) and _from_otel(x, depth + 1) for x in inner)
