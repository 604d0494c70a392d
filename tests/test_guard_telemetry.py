"""Telemetry through a real guard: the pool metrics follow the pool, refusals and time-outs
make error spans, and no literal or bound parameter reaches any span, metric attribute, log
record, alert or stats snapshot on any path (success, error, time-out, quarantine, budget)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from poolguard import BudgetExceeded, PoolGuard, QueryQuarantined, QueryTimeout

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


class Sink:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        value = getattr(p, "value", None)
                        if value is None:
                            value = getattr(p, "count", None)
                        out.setdefault(m.name, []).append((dict(p.attributes or {}), value))
        return out

    def everything(self) -> str:
        """Every exported string: span names, attributes, events, status; metric attributes."""
        parts: list[str] = []
        for s in self.spans.get_finished_spans():
            parts.append(s.name)
            parts.append(json.dumps(dict(s.attributes or {}), default=str))
            parts.append(str(s.status.description))
            for e in s.events:
                parts.append(e.name + json.dumps(dict(e.attributes or {}), default=str))
        for name, points in self.metrics().items():
            parts.append(name + json.dumps([a for a, _ in points], default=str))
        return "\n".join(parts)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.tracer_provider.shutdown()
    s.meter_provider.shutdown()


def test_pool_metrics_follow_the_pool(
    make_guard: Callable[..., Any], sink: Sink, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, pool_size=3, max_overflow=2)
    make_guard(
        engine,
        meter_provider=sink.meter_provider,
        tracer_provider=sink.tracer_provider,
        pool_name="orders-db",
    )
    c1, c2 = engine.connect(), engine.connect()
    m = sink.metrics()
    count = {a["db.client.connection.state"]: v for a, v in m["db.client.connection.count"]}
    assert count["used"] == 2
    assert m["db.client.connection.max"][0][1] == 5
    assert m["db.client.connection.max"][0][0]["db.client.connection.pool.name"] == "orders-db"
    assert m["db.client.connection.pending_requests"][0][1] == 0
    c1.close()
    c2.close()
    m = sink.metrics()
    count = {a["db.client.connection.state"]: v for a, v in m["db.client.connection.count"]}
    assert count["used"] == 0
    assert count["idle"] == 2
    assert "db.client.connection.wait_time" in m
    assert "db.client.connection.use_time" in m


def test_timeout_and_quarantine_make_error_spans(
    make_guard: Callable[..., Any], sink: Sink, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool)
    make_guard(
        engine,
        statement_timeout=0.05,
        quarantine_threshold=2,
        meter_provider=sink.meter_provider,
        tracer_provider=sink.tracer_provider,
    )
    tracer = sink.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request"):
        for _ in range(2):
            with engine.connect() as c, pytest.raises(QueryTimeout):
                c.execute(sa.text(ENDLESS))
        with engine.connect() as c, pytest.raises(QueryQuarantined):
            c.execute(sa.text(ENDLESS))
    spans = sink.spans.get_finished_spans()
    errors = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    kinds = [s.attributes.get("poolguard.refusal.kind") for s in errors if s.attributes]
    assert kinds.count("timeout") == 2
    assert kinds.count("quarantined") == 1
    refused = next(
        s
        for s in errors
        if s.attributes and s.attributes.get("poolguard.refusal.kind") == "quarantined"
    )
    assert refused.attributes is not None
    assert len(str(refused.attributes["poolguard.fingerprint"])) == 16
    assert refused.events, "a refusal carries an exception event"
    m = sink.metrics()
    refusals = {a["poolguard.refusal.kind"]: v for a, v in m["poolguard.refusals"]}
    assert refusals["timeout"] == 2
    assert refusals["quarantined"] == 1
    transitions = [
        a["poolguard.quarantine.transition"] for a, _ in m["poolguard.quarantine.transitions"]
    ]
    assert transitions == ["opened"]


# Strings carry a marker no log line, path or hex id contains, so finding the whole secret
# anywhere can only mean it leaked; integers are longer than any number poolguard reports.
# No ":" in strings: text() would read ":name" inside the literal as a bind parameter.
_literal = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00:"), max_size=24).map(
        lambda s: "ZqX" + s
    ),
    st.integers(min_value=10**7, max_value=10**12),
)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + json.dumps(record.__dict__, default=str))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(literal=_literal, param=_literal)
def test_no_literal_or_parameter_escapes_on_any_path(
    literal: str | int, param: str | int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sink = Sink()
    db = tmp_path_factory.mktemp("lit") / "lit.db"
    engine = sa.create_engine(
        f"sqlite:///{db}", poolclass=sa.QueuePool, pool_size=1, max_overflow=0
    )
    alerts: list[Any] = []
    guard = PoolGuard(
        engine,
        statement_timeout=0.05,
        quarantine_threshold=2,
        checkout_timeout=0.05,
        hold_timeout=0.1,
        meter_provider=sink.meter_provider,
        tracer_provider=sink.tracer_provider,
        trace_statements="all",
        on_alert=alerts.append,
    )
    capture = _Capture()
    logging.getLogger("poolguard").addHandler(capture)
    lit_sql = "'" + literal.replace("'", "''") + "'" if isinstance(literal, str) else str(literal)
    tracer = sink.tracer_provider.get_tracer("test")
    try:
        with tracer.start_as_current_span("request"):
            with engine.connect() as c:
                c.execute(sa.text(f"select {lit_sql}, :p"), {"p": param})  # success
                with pytest.raises(sa.exc.OperationalError):  # driver error, literal in it
                    c.execute(sa.text(f"select * from no_such_table where x = {lit_sql}"))
                for _ in range(2):  # time-out, then quarantine
                    with pytest.raises(QueryTimeout):
                        c.execute(sa.text(f"{ENDLESS} where x > 0 or {lit_sql} = :p"), {"p": param})
                with pytest.raises(QueryQuarantined):
                    c.execute(sa.text(f"{ENDLESS} where x > 0 or {lit_sql} = :p"), {"p": param})
                with guard.budget(max_queries=1):  # budget refusal
                    c.execute(sa.text(f"select {lit_sql}"))
                    with pytest.raises(BudgetExceeded):
                        c.execute(sa.text(f"select {lit_sql} || :p"), {"p": param})
                done = threading.Event()
                done.wait(0.3)  # the connection is held past hold_timeout: a leak report
        exported = sink.everything()
        stats = json.dumps(guard.stats())
        logs = "\n".join(capture.lines)
        alert_text = json.dumps(
            [a.message for a in alerts] + [dict(a.attributes) for a in alerts], default=str
        )
    finally:
        logging.getLogger("poolguard").removeHandler(capture)
        guard.close()
        engine.dispose()
        sink.tracer_provider.shutdown()
        sink.meter_provider.shutdown()
    assert exported, "telemetry exported nothing: the check below would be vacuous"
    for secret in {str(literal), str(param)}:
        for where, text in [
            ("telemetry", exported),
            ("stats", stats),
            ("logs", logs),
            ("alerts", alert_text),
        ]:
            assert secret not in text, f"{secret!r} leaked into {where}"
