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
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics import _internal as _metrics_state
from opentelemetry.trace import SpanKind, Status, StatusCode

from poolguard import __version__
from poolguard.errors import QueryTimeout
from poolguard.observe.instruments import create_instruments
from poolguard.observe.recording import (
    METER_PROVIDER,
    NEVER,
    NOW,
    TRACER_PROVIDER,
    WATCH,
    meter_state,
    tracer_state,
)
from poolguard.observe.semconv import (
    DB_CONNECTION_STATE,
    DB_OPERATION_NAME,
    DB_POOL_NAME,
    DB_QUERY_SUMMARY,
    DB_QUERY_TEXT,
    DB_RESPONSE_STATUS_CODE,
    DB_SYSTEM_NAME,
    DB_SYSTEM_NAMES,
    ERROR_TYPE,
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
    PG_FINGERPRINT,
    PG_OUTCOME,
    PG_PARTITION,
    PG_PRIORITY,
    PG_REFUSAL_KIND,
    PG_SHED_REASON,
    PG_TIMEOUT,
    PG_TRANSITION,
    SCHEMA_URL,
    SCOPE_NAME,
    SEMCONV_VERSION,
    WAIT_SPAN_THRESHOLD_NS,
    db_system_name,
    error_type,
    instrumented_by_opentelemetry,
    qualified_name,
    response_status_code,
    safe_message,
)
from poolguard.observe.shapes import FingerprintLike, PoolState, TransitionLike

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = [
    "METER_PROVIDER",
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "TRACER_PROVIDER",
    "FingerprintLike",
    "PoolState",
    "Telemetry",
    "TransitionLike",
    "db_system_name",
    "instrumented_by_opentelemetry",
]

_OFF, _ALL, _SLOW = 0, 1, 2
_MODES = {"off": _OFF, "all": _ALL, "slow": _SLOW}

_get_current_span = trace.get_current_span


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
        self.db_system = DB_SYSTEM_NAMES.get(db_system, db_system)
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
        self._tracing = tracer_state(self._tracer)
        self._metering = meter_state(meter)
        #: Attributes of the zero-wait histogram point, per (partition, priority).
        self._no_wait_attrs: dict[tuple[str, str], dict[str, AttributeValue]] = {}
        self.live = self.metered = self.traced = False
        self.spans_pending = self.meter_pending = False
        #: The API modules' namespaces, where the hot paths look for a global provider
        #: while one is pending: a dict read, where asking :meth:`went_live` is a call.
        self.trace_api: dict[str, object] = vars(trace)
        self.metrics_api: dict[str, object] = vars(_metrics_state)
        self._refresh()

        m = create_instruments(
            meter,
            operation_metrics=operation_metrics,
            observe_count=self._observe_count,
            gauge=self._gauge,
        )
        self._wait_time, self._create_time, self._use_time = m.wait_time, m.create_time, m.use_time
        self._conn_timeouts, self._op_duration = m.conn_timeouts, m.op_duration
        self._refusals, self._shed = m.refusals, m.shed
        self._stmt_timeouts, self._transitions = m.stmt_timeouts, m.transitions

    # -- whether anything records ----------------------------------------------------------------
    def _refresh(self) -> None:
        self.traced = self._tracing == NOW
        self.metered = self._metering == NOW
        #: :meth:`statement` may record something: a span (in a mode that keeps some), or
        #: the operation histogram (asked for, and a meter that records or may soon).
        self.live = (self.traced and self._mode != _OFF) or (
            self.operation_metrics and self._metering != NEVER
        )
        #: Statement spans wait for a global TracerProvider (``trace_api[TRACER_PROVIDER]``).
        self.spans_pending = self._tracing == WATCH and self._mode != _OFF
        #: Pool metrics wait for a global MeterProvider (``metrics_api[METER_PROVIDER]``).
        self.meter_pending = self._metering == WATCH

    def went_live(self) -> bool:
        """Whether a global provider a proxy waited for was set since the last look; then
        :attr:`live`, :attr:`traced` and :attr:`metered` are brought up to date. Reads the
        API's module state, nothing else; at most twice True in a process's life."""
        changed = False
        if self._tracing == WATCH and trace._TRACER_PROVIDER is not None:
            self._tracing = NOW
            changed = True
        if self._metering == WATCH and _metrics_state._METER_PROVIDER is not None:
            self._metering = NOW
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
        # A span: the operation's attributes, and what only a trace shows (the statement's
        # literal-free text, its fingerprint, the partition and the time-out it ran under).
        attrs = self._attributes(fp, error)
        attrs[DB_QUERY_TEXT] = fp.normalized
        attrs[PG_FINGERPRINT] = fp.id
        if partition is not None:
            attrs[PG_PARTITION] = partition
        if timeout is not None:
            attrs[PG_TIMEOUT] = timeout
        # Span name per the conventions: {db.query.summary}, else the operation, else the system.
        name = fp.summary or fp.operation or self.db_system
        span = self._tracer.start_span(
            name, kind=SpanKind.CLIENT, attributes=attrs, start_time=start_ns
        )
        if error is not None:
            self._mark_failed(span, error, end_ns)
        span.end(end_time=end_ns)

    def _record_operation(
        self, fp: FingerprintLike, start_ns: int, end_ns: int, error: BaseException | None
    ) -> None:
        assert self._op_duration is not None
        self._op_duration.record((end_ns - start_ns) / 1e9, self._attributes(fp, error))

    def _attributes(
        self, fp: FingerprintLike, error: BaseException | None
    ) -> dict[str, AttributeValue]:
        """A statement's attributes in the operation histogram and on its span."""
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
        return attrs

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
