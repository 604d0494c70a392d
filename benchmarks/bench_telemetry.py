"""Per-call cost of poolguard's telemetry on the statement hot path.

    python benchmarks/bench_telemetry.py [--number N]

Telemetry.statement() runs after every statement, so its cost when nothing is recorded is what
every application pays. Cases, cheapest first:

* API only: opentelemetry-api with no SDK configured (the global providers are no-ops);
* SDK, no recording parent: an SDK TracerProvider, but the statement runs outside a sampled
  trace, so "all" mode keeps no span;
* SDK, recording parent: a span is built after the fact for every statement (what a traced
  request pays per statement);
* the opt-in db.client.operation.duration histogram, and the pool-wait fast path, for
  comparison.

Each figure is the best of five runs, in microseconds per call.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from poolguard.observe.telemetry import PoolState, Telemetry


@dataclass(frozen=True)
class _Fingerprint:
    id: str
    normalized: str
    summary: str
    operation: str


FP = _Fingerprint("0123456789abcdef", "SELECT * FROM users WHERE id = ?", "SELECT users", "SELECT")
STATE = PoolState(idle=3, used=2, max=15, idle_max=5, idle_min=0, pending=0)


class _Discard(SpanExporter):
    """Exports nowhere: measures building and ending spans, not a network."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _per_call_us(fn: Callable[[], None], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per run")
    args = parser.parse_args(argv)
    n: int = args.number

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise SystemExit("a global tracer provider is set: the API-only figure would be wrong")

    t0 = time.time_ns()
    t1 = t0 + 2_000_000
    rows: list[tuple[str, float]] = []

    def empty() -> None:
        pass

    rows.append(("(an empty Python call, for scale)", _per_call_us(empty, n)))

    api_only = Telemetry(pool_name="bench", db_system="sqlite", pool_state=lambda: STATE)

    def stmt_api() -> None:
        api_only.statement(FP, t0, t1, partition="/users", timeout=2.0, error=None)

    rows.append(('statement(), API only, trace_statements="all"', _per_call_us(stmt_api, n)))

    tp = TracerProvider(shutdown_on_exit=False)
    tp.add_span_processor(SimpleSpanProcessor(_Discard()))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    sdk = Telemetry(
        pool_name="bench",
        db_system="sqlite",
        pool_state=lambda: STATE,
        meter_provider=mp,
        tracer_provider=tp,
    )

    def stmt_sdk() -> None:
        sdk.statement(FP, t0, t1, partition="/users", timeout=2.0, error=None)

    rows.append(('statement(), SDK, no recording parent, "all"', _per_call_us(stmt_sdk, n)))

    slow = Telemetry(
        pool_name="bench",
        db_system="sqlite",
        pool_state=lambda: STATE,
        meter_provider=mp,
        tracer_provider=tp,
        trace_statements="slow",
    )

    def stmt_slow() -> None:
        slow.statement(FP, t0, t1, partition="/users", timeout=2.0, error=None)

    rows.append(('statement(), SDK, "slow", a fast statement', _per_call_us(stmt_slow, n)))

    with tp.get_tracer("bench").start_as_current_span("request"):
        rows.append(
            (
                'statement(), SDK, recording parent, "all" (one span each)',
                _per_call_us(stmt_sdk, max(1, n // 10)),
            )
        )

    metered = Telemetry(
        pool_name="bench",
        db_system="sqlite",
        pool_state=lambda: STATE,
        meter_provider=mp,
        tracer_provider=tp,
        trace_statements="off",
        operation_metrics=True,
    )

    def stmt_metered() -> None:
        metered.statement(FP, t0, t1, partition="/users", timeout=2.0, error=None)

    rows.append(
        ("statement(), SDK, operation_metrics=True, no span", _per_call_us(stmt_metered, n))
    )

    w1 = t0 + 100_000

    def wait_fast() -> None:
        sdk.pool_wait(t0, w1, partition="/users", priority="normal", acquired=True)

    rows.append(("pool_wait(), SDK, fast path (histogram only)", _per_call_us(wait_fast, n)))

    width = max(len(label) for label, _ in rows)
    for label, us in rows:
        print(f"{label:<{width}}  {us:8.3f} us")
    tp.shutdown()
    mp.shutdown()


if __name__ == "__main__":
    main()
