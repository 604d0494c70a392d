"""Telemetry: names, units, kinds and attributes from the semantic conventions; spans only
where they are worth their cost; never a literal in anything exported.

Providers are passed explicitly (an SDK MeterProvider with an InMemoryMetricReader and a
TracerProvider with an InMemorySpanExporter); the global providers are never set.
"""

from __future__ import annotations

import sqlite3
import string
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import opentelemetry.metrics._internal as metrics_internal
import opentelemetry.trace as trace_api
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import exc as sa_exc

import poolguard
from poolguard.errors import PoolSaturated, QueryQuarantined, QueryTimeout
from poolguard.observe.semconv import error_type, response_status_code, safe_message
from poolguard.observe.telemetry import (
    SCHEMA_URL,
    PoolState,
    Telemetry,
    db_system_name,
    instrumented_by_opentelemetry,
)

POOL = "db.example:5432/app"

#: sqlite3 names its error codes from Python 3.11 on (sqlite_errorname); before, there is none.
SQLITE_ERROR_NAME = "SQLITE_ERROR" if sys.version_info >= (3, 11) else None


@dataclass(frozen=True)
class FP:
    """Stands in for poolguard.fingerprint.Fingerprint (same fields)."""

    id: str
    normalized: str
    summary: str
    operation: str


@dataclass(frozen=True)
class Transition:
    """Stands in for poolguard.quarantine.Transition (same fields)."""

    kind: str
    fingerprint: str
    summary: str
    cooldown: float
    timeouts: int


USERS = FP("0123456789abcdef", "SELECT * FROM users WHERE email = ?", "SELECT users", "SELECT")
ORDERS = FP(
    "fedcba9876543210", "UPDATE orders SET state = ? WHERE id = ?", "UPDATE orders", "UPDATE"
)

MS = 1_000_000


class Otel(SimpleNamespace):
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    state: PoolState
    state_reads: int

    def make(self, **kw: Any) -> Telemetry:
        def read() -> PoolState:
            self.state_reads += 1
            return self.state

        kw.setdefault("pool_name", POOL)
        kw.setdefault("db_system", "postgresql")
        return Telemetry(
            pool_state=read,
            meter_provider=self.meter_provider,
            tracer_provider=self.tracer_provider,
            **kw,
        )

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        out: dict[str, Metric] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name] = m
        return out

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def parent(self, name: str = "request") -> Any:
        return self.tracer_provider.get_tracer("test").start_as_current_span(name)


def _otel() -> Otel:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tp = TracerProvider(shutdown_on_exit=False)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return Otel(
        reader=reader,
        exporter=exporter,
        meter_provider=MeterProvider(metric_readers=[reader], shutdown_on_exit=False),
        tracer_provider=tp,
        state=PoolState(idle=3, used=2, max=15, idle_max=5, idle_min=0, pending=4),
        state_reads=0,
    )


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = _otel()
    yield o
    o.meter_provider.shutdown()
    o.tracer_provider.shutdown()


def points(metric: Metric) -> list[Any]:
    return list(metric.data.data_points)


def only_point(metric: Metric) -> Any:
    (p,) = points(metric)
    return p


# -- metrics: names, units, kinds, attributes ----------------------------------------------------
class _SpyMeterProvider:
    """Records which create_* method made each instrument, then delegates to the SDK."""

    def __init__(self, inner: MeterProvider) -> None:
        self.inner = inner
        self.created: dict[str, tuple[str, str | None]] = {}

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        return _SpyMeter(self.inner.get_meter(*args, **kwargs), self.created)


class _SpyMeter:
    def __init__(self, inner: Any, created: dict[str, tuple[str, str | None]]) -> None:
        self._inner = inner
        self._created = created

    def __getattr__(self, attr: str) -> Any:
        fn = getattr(self._inner, attr)
        if not attr.startswith("create_"):
            return fn

        def create(name: str, *args: Any, **kwargs: Any) -> Any:
            self._created[name] = (attr, kwargs.get("unit"))
            return fn(name, *args, **kwargs)

        return create


def test_instrument_kinds_and_units_follow_the_conventions(otel: Otel) -> None:
    spy = _SpyMeterProvider(otel.meter_provider)
    Telemetry(
        pool_name=POOL,
        db_system="postgresql",
        pool_state=lambda: otel.state,
        meter_provider=spy,  # type: ignore[arg-type]
        tracer_provider=otel.tracer_provider,
        operation_metrics=True,
    )
    assert spy.created == {
        # semconv v1.44.0, docs/db/database-metrics.md
        "db.client.connection.count": ("create_observable_up_down_counter", "{connection}"),
        "db.client.connection.max": ("create_observable_up_down_counter", "{connection}"),
        "db.client.connection.idle.max": ("create_observable_up_down_counter", "{connection}"),
        "db.client.connection.idle.min": ("create_observable_up_down_counter", "{connection}"),
        "db.client.connection.pending_requests": (
            "create_observable_up_down_counter",
            "{request}",
        ),
        "db.client.connection.timeouts": ("create_counter", "{timeout}"),
        "db.client.connection.create_time": ("create_histogram", "s"),
        "db.client.connection.wait_time": ("create_histogram", "s"),
        "db.client.connection.use_time": ("create_histogram", "s"),
        "db.client.operation.duration": ("create_histogram", "s"),
        # poolguard's own
        "poolguard.refusals": ("create_counter", "{refusal}"),
        "poolguard.shed": ("create_counter", "{request}"),
        "poolguard.statement.timeouts": ("create_counter", "{timeout}"),
        "poolguard.quarantine.transitions": ("create_counter", "{transition}"),
    }


def test_operation_histogram_is_opt_in(otel: Otel) -> None:
    spy = _SpyMeterProvider(otel.meter_provider)
    Telemetry(
        pool_name=POOL,
        db_system="postgresql",
        pool_state=lambda: otel.state,
        meter_provider=spy,  # type: ignore[arg-type]
    )
    assert "db.client.operation.duration" not in spy.created
    assert "db.client.connection.wait_time" in spy.created


def test_pool_gauges_are_read_at_collection_time(otel: Otel) -> None:
    otel.make()
    assert otel.state_reads == 0, "the pool must not be read before a collection"
    m = otel.metrics()
    assert otel.state_reads > 0

    count = m["db.client.connection.count"]
    assert count.unit == "{connection}"
    assert isinstance(count.data, Sum)
    assert not count.data.is_monotonic
    by_state = {p.attributes["db.client.connection.state"]: p for p in points(count)}
    assert set(by_state) == {"idle", "used"}
    assert by_state["idle"].value == 3
    assert by_state["used"].value == 2
    for p in by_state.values():
        assert dict(p.attributes) == {
            "db.client.connection.pool.name": POOL,
            "db.client.connection.state": p.attributes["db.client.connection.state"],
        }

    expected = {
        "db.client.connection.max": (15, "{connection}"),
        "db.client.connection.idle.max": (5, "{connection}"),
        "db.client.connection.idle.min": (0, "{connection}"),
        "db.client.connection.pending_requests": (4, "{request}"),
    }
    for name, (value, unit) in expected.items():
        metric = m[name]
        assert metric.unit == unit, name
        assert isinstance(metric.data, Sum), name
        assert not metric.data.is_monotonic, name
        p = only_point(metric)
        assert p.value == value, name
        assert dict(p.attributes) == {"db.client.connection.pool.name": POOL}, name

    # The values follow the pool, not the first reading.
    otel.state = PoolState(idle=0, used=15, max=15, idle_max=5, idle_min=0, pending=9)
    m = otel.metrics()
    by_state = {
        p.attributes["db.client.connection.state"]: p.value
        for p in points(m["db.client.connection.count"])
    }
    assert by_state == {"idle": 0, "used": 15}
    assert only_point(m["db.client.connection.pending_requests"]).value == 9


def test_scope_is_poolguard_with_version_and_schema(otel: Otel) -> None:
    otel.make()
    data = otel.reader.get_metrics_data()
    assert data is not None
    scopes = [sm.scope for rm in data.resource_metrics for sm in rm.scope_metrics]
    assert [(s.name, s.version, s.schema_url) for s in scopes] == [
        ("poolguard", poolguard.__version__, SCHEMA_URL)
    ]
    assert SCHEMA_URL == "https://opentelemetry.io/schemas/1.44.0"


def test_close_stops_the_observations(otel: Otel) -> None:
    t = otel.make()
    assert "db.client.connection.count" in otel.metrics()
    t.close()
    assert t.closed
    reads = otel.state_reads

    def broken() -> PoolState:
        raise AssertionError("the pool must not be read after close")

    t._pool_state = broken
    m = otel.metrics()
    assert otel.state_reads == reads
    for name in (
        "db.client.connection.count",
        "db.client.connection.max",
        "db.client.connection.pending_requests",
    ):
        assert name not in m or points(m[name]) == [], name


def test_connection_create_and_use_times(otel: Otel) -> None:
    t = otel.make()
    t.connection_created(0.012)
    t.connection_created(0.030)
    t.connection_used(1.5)
    m = otel.metrics()
    create = m["db.client.connection.create_time"]
    assert create.unit == "s"
    assert isinstance(create.data, Histogram)
    p = only_point(create)
    assert p.count == 2
    assert p.sum == pytest.approx(0.042)
    assert dict(p.attributes) == {"db.client.connection.pool.name": POOL}
    use = only_point(m["db.client.connection.use_time"])
    assert use.count == 1
    assert use.sum == pytest.approx(1.5)
    assert dict(use.attributes) == {"db.client.connection.pool.name": POOL}
    # Second-scale buckets: a millisecond wait must not land in the SDK's ms-made first bucket.
    assert p.explicit_bounds[0] <= 0.005


# -- pool waits ------------------------------------------------------------------------------------
def test_a_fast_wait_is_measured_but_not_traced(otel: Otel) -> None:
    t = otel.make()
    start = time.time_ns()
    with otel.parent():
        t.pool_wait(start, start + MS // 10, partition="/users", priority="normal", acquired=True)
    assert [s.name for s in otel.spans()] == ["request"]
    m = otel.metrics()
    wait = m["db.client.connection.wait_time"]
    assert wait.unit == "s"
    p = only_point(wait)
    assert p.count == 1
    assert p.sum == pytest.approx(0.0001)
    assert dict(p.attributes) == {
        "db.client.connection.pool.name": POOL,
        "poolguard.partition": "/users",
        "poolguard.priority": "normal",
    }
    assert (
        "db.client.connection.timeouts" not in m or points(m["db.client.connection.timeouts"]) == []
    )


def test_a_real_wait_gets_a_span(otel: Otel) -> None:
    t = otel.make()
    start = time.time_ns()
    with otel.parent():
        t.pool_wait(start, start + 5 * MS, partition="/users", priority="critical", acquired=True)
    (wait,) = (s for s in otel.spans() if s.name == "poolguard pool wait")
    assert wait.start_time == start
    assert wait.end_time == start + 5 * MS
    assert wait.status.status_code is StatusCode.UNSET
    assert dict(wait.attributes or {}) == {
        "db.client.connection.pool.name": POOL,
        "poolguard.partition": "/users",
        "poolguard.priority": "critical",
        "poolguard.outcome": "acquired",
    }
    parent = next(s for s in otel.spans() if s.name == "request")
    assert wait.parent is not None
    assert wait.parent.span_id == parent.context.span_id


def test_a_timed_out_wait_is_an_error_span_and_a_timeout(otel: Otel) -> None:
    t = otel.make()
    start = time.time_ns()
    # Even a zero-length wait that got nothing (no wait allowed at all) is traced.
    t.pool_wait(start, start, partition="/reports", priority="sheddable", acquired=False)
    (wait,) = otel.spans()
    assert wait.name == "poolguard pool wait"
    assert wait.status.status_code is StatusCode.ERROR
    assert (wait.attributes or {})["poolguard.outcome"] == "timeout"
    assert (wait.attributes or {})["error.type"] == "timeout"
    m = otel.metrics()
    timeouts = m["db.client.connection.timeouts"]
    assert isinstance(timeouts.data, Sum)
    assert timeouts.data.is_monotonic
    p = only_point(timeouts)
    assert p.value == 1
    assert dict(p.attributes) == {
        "db.client.connection.pool.name": POOL,
        "poolguard.partition": "/reports",
        "poolguard.priority": "sheddable",
    }
    w = only_point(m["db.client.connection.wait_time"])
    assert w.attributes["error.type"] == "timeout"


# -- statements ------------------------------------------------------------------------------------
def test_all_mode_traces_only_under_a_recording_parent(otel: Otel) -> None:
    t = otel.make(trace_statements="all")
    start = time.time_ns()
    t.statement(USERS, start, start + 2 * MS, partition="/users", timeout=2.0, error=None)
    assert otel.spans() == ()

    with otel.parent():
        t.statement(USERS, start, start + 2 * MS, partition="/users", timeout=2.0, error=None)
    spans = {s.name: s for s in otel.spans()}
    assert set(spans) == {"request", "SELECT users"}
    s = spans["SELECT users"]
    assert s.kind is SpanKind.CLIENT
    assert s.start_time == start
    assert s.end_time == start + 2 * MS
    assert s.parent is not None
    assert s.parent.span_id == spans["request"].context.span_id
    assert s.status.status_code is StatusCode.UNSET
    assert s.events == ()
    assert dict(s.attributes or {}) == {
        "db.system.name": "postgresql",
        "db.query.summary": "SELECT users",
        "db.query.text": "SELECT * FROM users WHERE email = ?",
        "db.operation.name": "SELECT",
        "poolguard.fingerprint": "0123456789abcdef",
        "poolguard.partition": "/users",
        "poolguard.timeout": 2.0,
    }


def test_all_mode_skips_an_unsampled_parent(otel: Otel) -> None:
    t = otel.make(trace_statements="all")
    unsampled = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    start = time.time_ns()
    with unsampled.get_tracer("test").start_as_current_span("request") as parent:
        assert not parent.is_recording()
        t.statement(USERS, start, start + 500 * MS, partition=None, timeout=None, error=None)
    assert otel.spans() == ()


def test_slow_mode_traces_slow_statements_even_without_a_parent(otel: Otel) -> None:
    t = otel.make(trace_statements="slow", slow_statement_threshold=0.1)
    start = time.time_ns()
    with otel.parent():
        t.statement(USERS, start, start + 99 * MS, partition=None, timeout=None, error=None)
    assert [s.name for s in otel.spans()] == ["request"], "a fast statement is not traced"
    otel.exporter.clear()

    t.statement(ORDERS, start, start + 100 * MS, partition=None, timeout=None, error=None)
    (s,) = otel.spans()
    assert s.name == "UPDATE orders"
    assert s.parent is None, "a slow statement outside any trace becomes a root span"
    assert "poolguard.partition" not in (s.attributes or {})
    assert "poolguard.timeout" not in (s.attributes or {})


@pytest.mark.parametrize(
    "options",
    [{"trace_statements": "off"}, {"statement_spans": False}],
    ids=["off", "statement_spans=False"],
)
def test_no_statement_spans_when_disabled(otel: Otel, options: dict[str, Any]) -> None:
    t = otel.make(slow_statement_threshold=0.0, **options)
    start = time.time_ns()
    with otel.parent():
        t.statement(USERS, start, start + 900 * MS, partition=None, timeout=None, error=None)
        # Waits and refusals are poolguard's own and stay.
        t.pool_wait(start, start + 5 * MS, partition="p", priority="normal", acquired=True)
    assert sorted(s.name for s in otel.spans()) == ["poolguard pool wait", "request"]


def _sqlite_error(
    secret: str, sql: str = "SELECT * FROM missing_table WHERE email = '{}'"
) -> sqlite3.Error:
    """A real error from the sqlite3 driver for ``sql`` with ``secret`` as its literal."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute(sql.format(secret))
    except sqlite3.Error as e:
        return e
    finally:
        con.close()
    raise AssertionError("the statement should have failed")


def test_a_failed_statement_span_has_no_literal(otel: Otel) -> None:
    t = otel.make()
    err = _sqlite_error("alice@example.com")
    assert "missing_table" in str(err)  # the driver's message quotes the statement's subject
    start = time.time_ns()
    with otel.parent():
        t.statement(USERS, start, start + MS, partition=None, timeout=None, error=err)
    (s,) = (s for s in otel.spans() if s.name == "SELECT users")
    assert s.status.status_code is StatusCode.ERROR
    assert s.status.description == "OperationalError"
    attrs = dict(s.attributes or {})
    assert attrs["error.type"] == "sqlite3.OperationalError"
    assert attrs.get("db.response.status_code") == SQLITE_ERROR_NAME
    (event,) = s.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "sqlite3.OperationalError",
        "exception.message": "OperationalError",
    }
    assert event.timestamp == start + MS
    exported = repr((s.name, attrs, [dict(e.attributes or {}) for e in s.events], s.status))
    assert "missing_table" not in exported
    assert "alice" not in exported


def test_exception_events_can_be_turned_off(otel: Otel) -> None:
    t = otel.make(exception_events=False)
    start = time.time_ns()
    with otel.parent():
        t.statement(USERS, start, start + MS, partition=None, timeout=None, error=ValueError())
    (s,) = (s for s in otel.spans() if s.name == "SELECT users")
    assert s.status.status_code is StatusCode.ERROR
    assert s.events == ()


def test_operation_duration_when_opted_in(otel: Otel) -> None:
    t = otel.make(operation_metrics=True, trace_statements="off")
    start = time.time_ns()
    t.statement(USERS, start, start + 3 * MS, partition="/u", timeout=1.0, error=None)
    t.statement(USERS, start, start + 5 * MS, partition="/u", timeout=1.0, error=ValueError("x"))
    metric = otel.metrics()["db.client.operation.duration"]
    assert metric.unit == "s"
    assert isinstance(metric.data, Histogram)
    by_error = {p.attributes.get("error.type"): p for p in points(metric)}
    assert set(by_error) == {None, "ValueError"}
    ok = by_error[None]
    assert ok.count == 1
    assert ok.sum == pytest.approx(0.003)
    assert dict(ok.attributes) == {
        "db.system.name": "postgresql",
        "db.operation.name": "SELECT",
        "db.query.summary": "SELECT users",
    }
    # The convention's advised boundaries.
    assert list(ok.explicit_bounds) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]


# -- refusals and policy counters ------------------------------------------------------------------
def test_refusal_is_an_error_span_and_a_counter(otel: Otel) -> None:
    t = otel.make()
    err = QueryQuarantined(
        fingerprint=USERS.id, summary=USERS.summary, retry_after=12.0, partition="/users"
    )
    with otel.parent():
        t.refusal(err, kind="quarantined", partition="/users", fingerprint=USERS, timeout=1.5)
    (s,) = (s for s in otel.spans() if s.name == "poolguard refused")
    assert s.status.status_code is StatusCode.ERROR
    assert s.status.description == str(err)
    assert dict(s.attributes or {}) == {
        "db.system.name": "postgresql",
        "poolguard.refusal.kind": "quarantined",
        "error.type": "poolguard.errors.QueryQuarantined",
        "poolguard.partition": "/users",
        "poolguard.fingerprint": USERS.id,
        "db.query.summary": "SELECT users",
        "poolguard.timeout": 1.5,
    }
    (event,) = s.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "poolguard.errors.QueryQuarantined",
        "exception.message": str(err),
    }
    m = otel.metrics()
    p = only_point(m["poolguard.refusals"])
    assert p.value == 1
    # Summaries, not fingerprint ids, in counters: their cardinality is what a TSDB can take.
    assert dict(p.attributes) == {
        "db.client.connection.pool.name": POOL,
        "poolguard.refusal.kind": "quarantined",
        "poolguard.partition": "/users",
        "db.query.summary": "SELECT users",
    }
    assert (
        "poolguard.statement.timeouts" not in m or points(m["poolguard.statement.timeouts"]) == []
    )


def test_a_refused_time_out_counts_as_a_statement_time_out(otel: Otel) -> None:
    t = otel.make()
    err = QueryTimeout(
        fingerprint=ORDERS.id,
        summary=ORDERS.summary,
        normalized=ORDERS.normalized,
        timeout=2.0,
        elapsed=2.01,
        orig=Exception("canceling statement due to statement timeout: id = 42"),
        partition="/orders",
    )
    t.refusal(err, kind="timeout", partition="/orders", fingerprint=ORDERS, timeout=2.0)
    t.refusal(
        PoolSaturated(waited=0.25, limit=0.25, partition="/orders"),
        kind="saturated",
        partition="/orders",
    )
    m = otel.metrics()
    p = only_point(m["poolguard.statement.timeouts"])
    assert p.value == 1
    assert dict(p.attributes) == {
        "db.client.connection.pool.name": POOL,
        "db.query.summary": "UPDATE orders",
        "poolguard.partition": "/orders",
    }
    kinds = {
        q.attributes["poolguard.refusal.kind"]: q.value for q in points(m["poolguard.refusals"])
    }
    assert kinds == {"timeout": 1, "saturated": 1}
    (timeout_span,) = (
        s for s in otel.spans() if (s.attributes or {}).get("poolguard.refusal.kind") == "timeout"
    )
    assert "42" not in repr([dict(e.attributes or {}) for e in timeout_span.events])


def test_shed_and_quarantine_counters(otel: Otel) -> None:
    t = otel.make()
    t.shed(reason="codel", priority="sheddable", partition="/search")
    t.shed(reason="codel", priority="sheddable", partition="/search")
    t.shed(reason="codel", priority="normal", partition=None)
    t.quarantine(Transition("opened", USERS.id, USERS.summary, 30.0, 3))
    t.quarantine(Transition("closed", USERS.id, USERS.summary, 0.0, 0))
    m = otel.metrics()
    shed = {tuple(sorted(p.attributes.items())): p.value for p in points(m["poolguard.shed"])}
    assert shed == {
        (
            ("db.client.connection.pool.name", POOL),
            ("poolguard.partition", "/search"),
            ("poolguard.priority", "sheddable"),
            ("poolguard.shed.reason", "codel"),
        ): 2,
        (
            ("db.client.connection.pool.name", POOL),
            ("poolguard.priority", "normal"),
            ("poolguard.shed.reason", "codel"),
        ): 1,
    }
    tr = {
        p.attributes["poolguard.quarantine.transition"]: p
        for p in points(m["poolguard.quarantine.transitions"])
    }
    assert set(tr) == {"opened", "closed"}
    assert dict(tr["opened"].attributes) == {
        "db.client.connection.pool.name": POOL,
        "poolguard.quarantine.transition": "opened",
        "db.query.summary": "SELECT users",
        "poolguard.fingerprint": USERS.id,
    }
    assert tr["opened"].value == 1


# -- exceptions without literals -------------------------------------------------------------------
def test_wrapped_driver_errors_report_the_driver_type() -> None:
    orig = _sqlite_error("bob")
    wrapped = sa_exc.OperationalError(
        "SELECT * FROM missing_table WHERE x = 'bob'", {"x": "bob"}, orig
    )
    assert error_type(wrapped) == "sqlite3.OperationalError"
    assert safe_message(wrapped) == "OperationalError"
    assert response_status_code(wrapped) == SQLITE_ERROR_NAME
    assert error_type(TimeoutError()) == "TimeoutError"


def test_status_codes_must_look_like_codes() -> None:
    class PgError(Exception):
        sqlstate = "57014"

    class Sneaky(Exception):
        sqlstate = "it's 'alice@example.com'"

    assert response_status_code(PgError()) == "57014"
    assert response_status_code(Sneaky()) is None
    assert response_status_code(ValueError(1205)) is None  # a number, but not from a MySQL driver


# -- the property: no literal reaches any exported value -------------------------------------------
class _LeakyStr(Exception):
    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.secret = secret

    def __str__(self) -> str:
        return f"value {self.secret!r} rejected"

    def __repr__(self) -> str:
        return f"_LeakyStr({self.secret!r})"


_EXCEPTIONS = [
    lambda s: Exception(f"duplicate key value violates unique constraint: (email)=({s})"),
    lambda s: ValueError(s),
    lambda s: sqlite3.OperationalError(f'near "{s}": syntax error'),
    lambda s: _sqlite_error(s, "SELECT 1 WHERE 'a' = '{}' '{}'".replace("{}", "{0}")),
    lambda s: sa_exc.OperationalError(f"SELECT * FROM t WHERE x = '{s}'", {"x": s}, Exception(s)),
    lambda s: sa_exc.IntegrityError(
        "INSERT INTO t VALUES (?)", (s,), sqlite3.IntegrityError(f"UNIQUE failed: {s}")
    ),
    lambda s: _LeakyStr(s),
    lambda s: KeyboardInterrupt(s),
    lambda s: QueryTimeout(
        fingerprint=USERS.id,
        summary=USERS.summary,
        normalized=USERS.normalized,
        timeout=1.0,
        elapsed=1.2,
        orig=Exception(f"canceling statement WHERE email = '{s}'"),
        partition="/users",
    ),
]

_secrets = st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=24).map(
    lambda s: f"zq{s}"
)


def _exported_strings(o: Otel) -> list[str]:
    out: list[str] = []
    for s in o.spans():
        out.append(s.name)
        out.append(s.status.description or "")
        for k, v in (s.attributes or {}).items():
            out += [k, repr(v)]
        for e in s.events:
            out.append(e.name)
            for k, v in (e.attributes or {}).items():
                out += [k, repr(v)]
    for m in o.metrics().values():
        for p in points(m):
            for k, v in p.attributes.items():
                out += [k, repr(v)]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=_secrets, make=st.sampled_from(_EXCEPTIONS), slow=st.booleans())
def test_no_literal_is_ever_exported(secret: str, make: Any, slow: bool) -> None:
    o = _otel()
    try:
        t = o.make(
            trace_statements="slow" if slow else "all",
            slow_statement_threshold=0.0,
            operation_metrics=True,
        )
        exc = make(secret)
        assert secret in (str(exc) + repr(exc) + repr(getattr(exc, "orig", ""))), (
            "the generated exception must carry the literal, or the test proves nothing"
        )
        start = time.time_ns()
        with o.parent():
            t.statement(USERS, start, start + MS, partition="/users", timeout=1.0, error=exc)
            t.refusal(exc, kind="timeout", partition="/users", fingerprint=USERS, timeout=1.0)
        strings = _exported_strings(o)
        leaked = [x for x in strings if secret in x]
        assert leaked == []
        # Not vacuous: both spans were exported with their exception events.
        events = [e for s in o.spans() for e in s.events if e.name == "exception"]
        assert len(events) == 2
        assert all((e.attributes or {}).get("exception.type") for e in events)
    finally:
        o.meter_provider.shutdown()
        o.tracer_provider.shutdown()


# -- configuration, providers, API only ------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool_name": ""}, "pool_name"),
        ({"db_system": ""}, "db_system"),
        ({"trace_statements": "some"}, "trace_statements"),
        ({"slow_statement_threshold": -1.0}, "slow_statement_threshold"),
        ({"slow_statement_threshold": float("nan")}, "slow_statement_threshold"),
        ({"slow_statement_threshold": True}, "slow_statement_threshold"),
        ({"pool_state": 3}, "pool_state"),
    ],
)
def test_options_are_validated(options: dict[str, Any], message: str) -> None:
    kw: dict[str, Any] = {"pool_name": POOL, "db_system": "sqlite", "pool_state": lambda: None}
    kw.update(options)
    with pytest.raises((ValueError, TypeError), match=message):
        Telemetry(**kw)


def test_db_system_names_follow_the_conventions() -> None:
    t = Telemetry(pool_name=POOL, db_system="mssql", pool_state=lambda: None)  # type: ignore[arg-type,return-value]
    assert t.db_system == "microsoft.sql_server"
    assert db_system_name(sa.create_engine("sqlite://").dialect) == "sqlite"
    pg = sa.create_engine("postgresql+psycopg://u@h/db").dialect
    assert db_system_name(pg) == "postgresql"
    my = sa.create_engine("mysql+pymysql://u@h/db").dialect
    assert db_system_name(my) == "mysql"
    my.is_mariadb = True  # what SQLAlchemy learns from the server version on first connect
    assert db_system_name(my) == "mariadb"


def test_the_global_providers_are_used_when_none_are_passed(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not set_tracer_provider/set_meter_provider: those can be set once per process.
    monkeypatch.setattr(trace_api, "get_tracer_provider", lambda: otel.tracer_provider)
    monkeypatch.setattr(metrics_internal, "get_meter_provider", lambda: otel.meter_provider)
    t = Telemetry(pool_name=POOL, db_system="sqlite", pool_state=lambda: otel.state)
    start = time.time_ns()
    t.pool_wait(start, start + 2 * MS, partition="p", priority="normal", acquired=True)
    assert [s.name for s in otel.spans()] == ["poolguard pool wait"]
    assert "db.client.connection.wait_time" in otel.metrics()


def test_api_only_builds_no_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the API alone nothing is built per statement (what it costs is counted in
    instructions by benchmarks/bench_instructions.py, not timed here)."""
    if not isinstance(trace_api.get_tracer_provider(), trace_api.ProxyTracerProvider):
        pytest.skip("a global SDK tracer provider is configured in this process")
    t = Telemetry(
        pool_name=POOL, db_system="sqlite", pool_state=lambda: PoolState(0, 0, 1, 1, 0, 0)
    )
    made: list[object] = []
    # A span's (and the operation histogram's) attributes are built by _attributes.
    monkeypatch.setattr(t, "_attributes", lambda *a: made.append(a) or {})
    start = time.time_ns()
    for _ in range(1000):
        t.statement(USERS, start, start + MS, partition=None, timeout=None, error=None)
    assert made == [], "no span may be built without a recording parent"
    # Everything else works against the no-op API too.
    t.pool_wait(start, start + 5 * MS, partition="p", priority="normal", acquired=False)
    t.refusal(ValueError("x"), kind="budget", partition=None)
    t.shed(reason="codel", priority="sheddable", partition=None)
    t.quarantine(Transition("opened", USERS.id, USERS.summary, 30.0, 3))
    t.connection_created(0.01)
    t.connection_used(0.5)
    t.close()


# -- opentelemetry-instrumentation-sqlalchemy ------------------------------------------------------
def _instrumentor() -> Any:
    mod = pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
    return mod.SQLAlchemyInstrumentor()


# The instrumentation declares sqlalchemy < 2.1 and silently does nothing on 2.1 unless its
# dependency check is skipped; the listeners it registers are the same either way.
_SKIP = {"skip_dep_check": True}


def test_detects_the_instrumentation_on_one_engine(otel: Otel) -> None:
    inst = _instrumentor()
    engine = sa.create_engine("sqlite://")
    other = sa.create_engine("sqlite://")
    assert not instrumented_by_opentelemetry(engine)
    inst.instrument(engine=engine, tracer_provider=otel.tracer_provider, **_SKIP)
    try:
        assert instrumented_by_opentelemetry(engine)
        assert not instrumented_by_opentelemetry(other)
        # An AsyncEngine is judged by its sync_engine.
        assert instrumented_by_opentelemetry(SimpleNamespace(sync_engine=engine))  # type: ignore[arg-type]
        # And it really traces that engine: what poolguard must then not do again.
        with engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
        assert any(s.kind is SpanKind.CLIENT for s in otel.spans())
    finally:
        inst.uninstrument()
    assert not instrumented_by_opentelemetry(engine)


def test_detects_the_global_instrumentation(otel: Otel) -> None:
    inst = _instrumentor()
    inst.instrument(tracer_provider=otel.tracer_provider, **_SKIP)
    try:
        engine = sa.create_engine("sqlite://")
        assert instrumented_by_opentelemetry(engine)
    finally:
        inst.uninstrument()
    assert not instrumented_by_opentelemetry(sa.create_engine("sqlite://"))


def test_other_listeners_are_not_mistaken_for_it() -> None:
    engine = sa.create_engine("sqlite://")

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        return None

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "before_cursor_execute", before, retval=True, named=False)
    assert not instrumented_by_opentelemetry(engine)


def test_works_with_the_real_fingerprint_and_transition(otel: Otel) -> None:
    import poolguard.observe.fingerprint as fp_mod
    import poolguard.policy.quarantine as q_mod

    fp = fp_mod.fingerprint(
        "SELECT * FROM users WHERE email = 'alice@example.com' AND id IN (1, 2)"
    )
    t = otel.make()
    start = time.time_ns()
    with otel.parent():
        t.statement(fp, start, start + MS, partition="/users", timeout=1.0, error=None)
    t.quarantine(q_mod.Transition("opened", fp.id, fp.summary, 30.0, 3))
    (s,) = (s for s in otel.spans() if s.name != "request")
    assert s.name == fp.summary
    assert (s.attributes or {})["db.query.text"] == fp.normalized
    exported = _exported_strings(otel)
    assert not [x for x in exported if "alice" in x]
