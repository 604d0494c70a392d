"""Per-statement overhead of poolguard against bare SQLAlchemy and OpenTelemetry's instrumentation.

    python benchmarks/bench_overhead.py [--quick] [--runs N] [--pg-url URL] [--json PATH]
                                        [--engines sqlite,pg,pg-async,sqlite-async]

What is measured: the time of one statement as an application sees it, in microseconds, for
three loops on each engine:

* ``stmt``: ``conn.execute(text("select 1")).scalar()`` on a connection already checked out;
* ``param``: the same with one bound parameter, ``select :x`` (typed Integer, so that asyncpg
  accepts it);
* ``checkout``: ``with engine.connect() as c: c.execute(select 1).scalar()``: checkout, one
  statement and return (on PostgreSQL the return also sends SQLAlchemy's reset ROLLBACK), since
  poolguard's gate sits on the checkout path.

Engines: SQLite in memory (sqlite3), PostgreSQL through psycopg 3, PostgreSQL through asyncpg
(an AsyncEngine driven by one coroutine on one event loop) and SQLite through aiosqlite. Each
statement fetches its one row, as applications do; the fetch is in every variant alike.

Variants, each on its own freshly created engine (a guard is one per engine):

* ``dbapi``: the driver alone, no SQLAlchemy (statement loops only): the floor, for scale;
* ``bare``: SQLAlchemy, nothing installed;
* ``guard``: ``PoolGuard(engine)`` with its defaults and no OpenTelemetry SDK (API only);
* ``guard-budget``: the same inside ``guard.budget(deadline=60)``;
* ``guard-sdk``: poolguard with an SDK TracerProvider (sampler ALWAYS_OFF) and an SDK
  MeterProvider, outside any trace: what every untraced request pays once an SDK is set up;
* ``guard-traced``: poolguard with an SDK (ALWAYS_ON, a discarding exporter) inside a recording
  parent span: a statement span for every statement;
* ``otel-off``: opentelemetry-instrumentation-sqlalchemy with an SDK TracerProvider whose
  sampler is ALWAYS_OFF (the "unsampled" case) and the same SDK MeterProvider;
* ``otel-on``: that instrumentation with ALWAYS_ON and the discarding exporter, inside a
  recording parent span (the same situation as ``guard-traced``).

How, and why that way. These machines are shared and noisy, so nothing is compared across
separate processes or separate minutes: all variants run side by side in one process, and
within each run every (engine, loop) cell cycles through its variants round-robin several
times in short sub-batches (``--rounds``; the order rotates every round so that no variant
always follows the same neighbour). A run's figure for a variant is the fastest of its
sub-batches in that run (noise only ever adds time); the report gives the median over the
runs and the p25-p75 spread. Differences and ratios are computed within each run (so a busy
minute affects both sides of a difference alike) and their median is reported. All variants
of a cell execute the same number of statements per sub-batch, sized from the bare variant
to take about ``--batch-ms`` each. Every sub-batch checks out its own connection, runs a
short untimed warm-up (caches, the event-dispatch join), then reads two clocks around the
timed loop: ``time.perf_counter_ns`` (wall clock: what the application waits, the primary
figure) and ``time.process_time_ns`` (this process's CPU time, user + system: poolguard's
cost is client CPU, and this clock does not count the time the process sat preempted by
other tenants or waited for the server, so its differences are far less noisy; it does
count the kernel's loopback TCP work done on the client's behalf). The garbage collector is
disabled while a cell's sub-batches run, and a full collection runs, untimed, before each
cell.

opentelemetry-instrumentation-sqlalchemy 0.66b2 declares ``sqlalchemy<2.1`` and silently does
nothing on SQLAlchemy 2.1 unless called with ``skip_dep_check=True``. It also wraps the
class-level ``Engine.connect`` (a ``connect`` span for every engine in the process) and
``create_engine``, so it is instrumented (``instrument(engine=..., skip_dep_check=True)``)
just before each of its own sub-batches and uninstrumented right after, untimed: the other
variants must not pay for it. Before the runs, a counting sampler proves that the
instrumentation really reaches the sampler on every engine; during them, every traced
sub-batch checks that one span per statement reached the exporter, and every budget
sub-batch checks that the scope counted every statement.

Goals reported against: poolguard's added cost per statement below the instrumentation's
(``guard`` vs ``otel-off``; ``guard-sdk`` vs ``otel-off``; ``guard-traced`` vs ``otel-on``),
and below 5 % of a one-statement PostgreSQL round trip (the ``bare`` psycopg ``select 1``;
the raw driver round trip, ``dbapi``, is given too, a stricter denominator).

Where the cost goes is counted, not timed, by ``bench_instructions.py`` (instructions per
statement and per checkout under callgrind, deterministic): this script's former
``--profile``, hand copies of the statement and checkout paths, measured code that no longer
existed.

A full run takes about 2 minutes on 2 cores; ``--quick`` takes
under 30 s and is meant as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes
from sqlalchemy import Integer, bindparam, create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poolguard.guard import PoolGuard
from poolguard.observe.telemetry import instrumented_by_opentelemetry

KINDS: tuple[str, ...] = ("sqlite", "pg", "pg-async", "sqlite-async")
ASYNC_KINDS = frozenset({"pg-async", "sqlite-async"})
PG_KINDS = frozenset({"pg", "pg-async"})
LOOPS: tuple[str, ...] = ("stmt", "param", "checkout")
VARIANTS: tuple[str, ...] = (
    "dbapi",
    "bare",
    "guard",
    "guard-budget",
    "guard-sdk",
    "guard-traced",
    "otel-off",
    "otel-on",
)
OTEL_VARIANTS = frozenset({"otel-off", "otel-on"})
TRACED_VARIANTS = frozenset({"guard-traced", "otel-on"})
#: (numerator, denominator): "poolguard's added cost / the instrumentation's added cost".
RATIOS: tuple[tuple[str, str], ...] = (
    ("guard", "otel-off"),
    ("guard-sdk", "otel-off"),
    ("guard-traced", "otel-on"),
)
PCT_GOAL = 5.0

STMT = text("select 1")
PARAM = text("select :x").bindparams(bindparam("x", type_=Integer))
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


# -- OpenTelemetry SDK pieces ---------------------------------------------------------------------
class CountingExporter(SpanExporter):
    """Exports nowhere and counts: measures building and ending spans, not a network."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class CountingDropSampler(Sampler):
    """ALWAYS_OFF that counts its calls: proves the instrumentation reached the sampler.

    Used only by the check before the runs; the measured ``otel-off`` uses ALWAYS_OFF itself.
    """

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.calls += 1
        return ALWAYS_OFF.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "CountingDropSampler"


@dataclass
class Otel:
    """The SDK providers shared by every SDK-configured variant (never set globally)."""

    exporter: CountingExporter = field(default_factory=CountingExporter)
    meter_provider: MeterProvider = field(init=False)
    tp_off: TracerProvider = field(init=False)
    tp_on: TracerProvider = field(init=False)

    def __post_init__(self) -> None:
        self.meter_provider = MeterProvider(
            metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False
        )
        self.tp_off = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
        self.tp_on = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
        self.tp_on.add_span_processor(SimpleSpanProcessor(self.exporter))

    def shutdown(self) -> None:
        self.tp_off.shutdown()
        self.tp_on.shutdown()
        self.meter_provider.shutdown()


def _instrumentor() -> Any:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    return SQLAlchemyInstrumentor()


@contextlib.contextmanager
def instrumented(engine: Engine, tracer_provider: TracerProvider, otel: Otel) -> Iterator[None]:
    """opentelemetry-instrumentation-sqlalchemy on ``engine`` for the duration of the block."""
    inst = _instrumentor()
    tracer = inst.instrument(
        engine=engine,
        tracer_provider=tracer_provider,
        meter_provider=otel.meter_provider,
        skip_dep_check=True,
    )
    if tracer is None:
        raise RuntimeError("SQLAlchemyInstrumentor.instrument() did nothing")
    try:
        yield
    finally:
        inst.uninstrument()


# -- subjects: one engine (or raw connection) per engine kind and variant ------------------------
@dataclass
class Subject:
    """One engine kind x variant: its own engine (and guard), or the driver's own connection."""

    kind: str
    variant: str
    engine: Engine | AsyncEngine | None = None
    guard: PoolGuard | None = None
    raw: Any = None  # the driver's own connection, for "dbapi"

    @property
    def sync_engine(self) -> Engine:
        e = self.engine
        assert e is not None
        return e.sync_engine if isinstance(e, AsyncEngine) else e


def _urls(pg_url: str) -> dict[str, URL]:
    base = make_url(pg_url)
    return {
        "sqlite": make_url("sqlite://"),
        "pg": base.set(drivername="postgresql+psycopg"),
        "pg-async": base.set(drivername="postgresql+asyncpg"),
        "sqlite-async": make_url("sqlite+aiosqlite://"),
    }


def _raw_sync(kind: str, url: URL) -> Any:
    if kind == "sqlite":
        import sqlite3

        return sqlite3.connect(":memory:")
    import psycopg

    return psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )


async def _raw_async(kind: str, url: URL) -> Any:
    if kind == "sqlite-async":
        import aiosqlite

        return await aiosqlite.connect(":memory:")
    import asyncpg

    return await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database,
    )


def make_subject(
    kind: str, variant: str, url: URL, otel: Otel, aloop: asyncio.AbstractEventLoop
) -> Subject:
    if variant == "dbapi":
        raw = (
            aloop.run_until_complete(_raw_async(kind, url))
            if kind in ASYNC_KINDS
            else _raw_sync(kind, url)
        )
        return Subject(kind, variant, raw=raw)
    engine: Engine | AsyncEngine = (
        create_async_engine(url) if kind in ASYNC_KINDS else create_engine(url)
    )
    s = Subject(kind, variant, engine=engine)
    if variant in ("guard", "guard-budget"):
        s.guard = PoolGuard(engine)
    elif variant == "guard-sdk":
        s.guard = PoolGuard(engine, tracer_provider=otel.tp_off, meter_provider=otel.meter_provider)
    elif variant == "guard-traced":
        s.guard = PoolGuard(engine, tracer_provider=otel.tp_on, meter_provider=otel.meter_provider)
    return s


def close_subject(s: Subject, aloop: asyncio.AbstractEventLoop) -> None:
    if s.guard is not None:
        s.guard.close()
    if isinstance(s.engine, AsyncEngine):
        aloop.run_until_complete(s.engine.dispose())
    elif s.engine is not None:
        s.engine.dispose()
    if s.raw is not None:
        if s.kind in ASYNC_KINDS:
            aloop.run_until_complete(s.raw.close())
        else:
            s.raw.close()


#: (wall-clock ns, process CPU ns) of one timed loop.
Elapsed = tuple[int, int]
#: The two clocks every loop reads: time.perf_counter_ns and time.process_time_ns.
CLOCKS: tuple[str, ...] = ("wall", "cpu")
#: Per (engine, loop) cell, per variant: one figure per run, us per statement.
PerRun = dict[tuple[str, str], dict[str, list[float]]]


def _now() -> Elapsed:
    return time.perf_counter_ns(), time.process_time_ns()


def _since(t0: Elapsed) -> Elapsed:
    return time.perf_counter_ns() - t0[0], time.process_time_ns() - t0[1]


# -- the loops ------------------------------------------------------------------------------------
def sync_batch(s: Subject, loop: str, n: int, warm: int) -> Elapsed:
    """Run ``warm`` untimed then ``n`` timed iterations; return the timed nanoseconds."""
    if s.variant == "dbapi":
        return _dbapi_sync_batch(s, loop, n, warm)
    engine = s.engine
    assert isinstance(engine, Engine)
    if loop == "checkout":
        for _ in range(warm):
            with engine.connect() as c:
                c.execute(STMT).scalar()
        t0 = _now()
        for _ in range(n):
            with engine.connect() as c:
                c.execute(STMT).scalar()
        return _since(t0)
    with engine.connect() as conn:
        ex = conn.execute
        if loop == "stmt":
            for _ in range(warm):
                ex(STMT).scalar()
            t0 = _now()
            for _ in range(n):
                ex(STMT).scalar()
            t1 = _since(t0)
        else:
            for i in range(warm):
                ex(PARAM, {"x": i}).scalar()
            t0 = _now()
            for i in range(n):
                ex(PARAM, {"x": i}).scalar()
            t1 = _since(t0)
        conn.commit()
    return t1


def _dbapi_sync_batch(s: Subject, loop: str, n: int, warm: int) -> Elapsed:
    raw = s.raw
    if loop == "stmt":
        sql, many = "select 1", False
    else:
        sql, many = ("select ?" if s.kind == "sqlite" else "select %s::integer"), True
    for i in range(warm):
        cur = raw.cursor()
        cur.execute(sql, (i,)) if many else cur.execute(sql)
        cur.fetchone()
        cur.close()
    t0 = _now()
    if many:
        for i in range(n):
            cur = raw.cursor()
            cur.execute(sql, (i,))
            cur.fetchone()
            cur.close()
    else:
        for _ in range(n):
            cur = raw.cursor()
            cur.execute(sql)
            cur.fetchone()
            cur.close()
    t1 = _since(t0)
    raw.commit()
    return t1


async def async_batch(s: Subject, loop: str, n: int, warm: int) -> Elapsed:
    """The coroutine twin of :func:`sync_batch`."""
    if s.variant == "dbapi":
        return await _dbapi_async_batch(s, loop, n, warm)
    engine = s.engine
    assert isinstance(engine, AsyncEngine)
    if loop == "checkout":
        for _ in range(warm):
            async with engine.connect() as c:
                (await c.execute(STMT)).scalar()
        t0 = _now()
        for _ in range(n):
            async with engine.connect() as c:
                (await c.execute(STMT)).scalar()
        return _since(t0)
    async with engine.connect() as conn:
        ex = conn.execute
        if loop == "stmt":
            for _ in range(warm):
                (await ex(STMT)).scalar()
            t0 = _now()
            for _ in range(n):
                (await ex(STMT)).scalar()
            t1 = _since(t0)
        else:
            for i in range(warm):
                (await ex(PARAM, {"x": i})).scalar()
            t0 = _now()
            for i in range(n):
                (await ex(PARAM, {"x": i})).scalar()
            t1 = _since(t0)
        await conn.commit()
    return t1


async def _dbapi_async_batch(s: Subject, loop: str, n: int, warm: int) -> Elapsed:
    raw = s.raw
    if s.kind == "pg-async":
        fetchval = raw.fetchval
        if loop == "stmt":
            for _ in range(warm):
                await fetchval("select 1")
            t0 = _now()
            for _ in range(n):
                await fetchval("select 1")
            return _since(t0)
        for i in range(warm):
            await fetchval("select $1::integer", i)
        t0 = _now()
        for i in range(n):
            await fetchval("select $1::integer", i)
        return _since(t0)
    # aiosqlite
    params: tuple[int, ...] = ()
    sql = "select 1" if loop == "stmt" else "select ?"
    for i in range(warm):
        cur = await raw.execute(sql, (i,) if loop == "param" else params)
        await cur.fetchone()
        await cur.close()
    t0 = _now()
    if loop == "param":
        for i in range(n):
            cur = await raw.execute(sql, (i,))
            await cur.fetchone()
            await cur.close()
    else:
        for _ in range(n):
            cur = await raw.execute(sql, params)
            await cur.fetchone()
            await cur.close()
    return _since(t0)


@dataclass
class Bench:
    """Holds the subjects and the event loop; runs one sub-batch of one subject."""

    otel: Otel
    aloop: asyncio.AbstractEventLoop
    subjects: dict[tuple[str, str], Subject] = field(default_factory=dict)

    def batch(self, s: Subject, loop: str, n: int, warm: int) -> Elapsed:
        """One sub-batch with its variant's context: budget scope, parent span, instrumentation."""
        with contextlib.ExitStack() as stack:
            check: Callable[[], None] | None = None
            if s.variant in OTEL_VARIANTS:
                tp = self.otel.tp_on if s.variant == "otel-on" else self.otel.tp_off
                stack.enter_context(instrumented(s.sync_engine, tp, self.otel))
            if s.variant == "guard-budget":
                assert s.guard is not None
                scope = stack.enter_context(s.guard.budget(deadline=60))

                def check_budget() -> None:
                    if scope.queries != warm + n:
                        raise RuntimeError(
                            f"{s.kind}/{loop}/guard-budget: the scope counted {scope.queries} "
                            f"statements, expected {warm + n}"
                        )

                check = check_budget
            if s.variant in TRACED_VARIANTS:
                before = self.otel.exporter.count
                parent = self.otel.tp_on.get_tracer("bench").start_span("bench request")
                stack.enter_context(trace.use_span(parent, end_on_exit=True))

                def check_spans() -> None:
                    got = self.otel.exporter.count - before - 1  # minus the parent
                    if got < warm + n:
                        raise RuntimeError(
                            f"{s.kind}/{loop}/{s.variant}: {got} spans exported for "
                            f"{warm + n} statements"
                        )

                check = check_spans
            if s.kind in ASYNC_KINDS:
                # The task copies this context: the scope and the parent span go with it.
                took = self.aloop.run_until_complete(async_batch(s, loop, n, warm))
            else:
                took = sync_batch(s, loop, n, warm)
        if check is not None:
            check()
        return took


# -- the schedule ---------------------------------------------------------------------------------
def _rotate(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def _variants_for(loop: str, variants: Sequence[str]) -> list[str]:
    return [v for v in variants if not (v == "dbapi" and loop == "checkout")]


def calibrate(bench: Bench, kind: str, loop: str, batch_ms: float) -> int:
    """Statements per sub-batch so that the bare variant takes about ``batch_ms``."""
    s = bench.subjects[(kind, "bare")]
    bench.batch(s, loop, 50, 50)
    probe = 200
    per = min(bench.batch(s, loop, probe, 10)[0] for _ in range(3)) / probe
    return max(20, round(batch_ms * 1e6 / per))


def verify_otel(bench: Bench, kinds: Sequence[str]) -> dict[str, int]:
    """Prove the instrumentation reaches the sampler on every engine kind (SQLAlchemy 2.1)."""
    seen: dict[str, int] = {}
    for kind in kinds:
        sampler = CountingDropSampler()
        tp = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        s = bench.subjects[(kind, "otel-off")]
        with instrumented(s.sync_engine, tp, bench.otel):
            if kind in ASYNC_KINDS:
                bench.aloop.run_until_complete(async_batch(s, "stmt", 10, 0))
            else:
                sync_batch(s, "stmt", 10, 0)
        if sampler.calls < 10:
            raise RuntimeError(
                f"opentelemetry-instrumentation-sqlalchemy did not trace {kind}: "
                f"{sampler.calls} sampler calls for 10 statements"
            )
        seen[kind] = sampler.calls
        tp.shutdown()
    check_uninstrumented(bench)
    return seen


def check_uninstrumented(bench: Bench) -> None:
    """No instrumentation listener may be left on any engine between its sub-batches."""
    for s in bench.subjects.values():
        if s.engine is not None and instrumented_by_opentelemetry(s.engine):
            raise RuntimeError(f"{s.kind}/{s.variant}: an instrumentation listener was left")


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _summary(xs: Sequence[float], digits: int = 3) -> dict[str, Any]:
    q1, med, q3 = _quartiles(xs)
    return {
        "median": round(med, digits),
        "p25": round(q1, digits),
        "p75": round(q3, digits),
        "runs": [round(x, digits) for x in xs],
    }


def run_benchmark(
    bench: Bench,
    kinds: Sequence[str],
    variants: Sequence[str],
    runs: int,
    rounds: int,
    batch_ms: float,
    log: Callable[[str], None],
) -> tuple[dict[tuple[str, str], int], dict[str, PerRun]]:
    """The measurement proper; returns the sub-batch sizes and, per clock, per cell and per
    variant, one figure per run (us per statement)."""
    cells = [(k, lp) for k in kinds for lp in LOOPS]
    sizes: dict[tuple[str, str], int] = {}
    for kind, loop in cells:
        sizes[(kind, loop)] = calibrate(bench, kind, loop, batch_ms)
        # One untimed sub-batch per variant: connections opened, caches warm.
        for v in _variants_for(loop, variants):
            bench.batch(bench.subjects[(kind, v)], loop, min(200, sizes[(kind, loop)]), 20)
    log("statements per sub-batch: " + ", ".join(f"{k}/{lp}={n}" for (k, lp), n in sizes.items()))

    per_run: dict[str, PerRun] = {
        clock: {c: {v: [] for v in _variants_for(c[1], variants)} for c in cells}
        for clock in CLOCKS
    }
    for r in range(runs):
        t_run = time.perf_counter()
        for kind, loop in cells:
            n = sizes[(kind, loop)]
            warm = max(10, n // 20)
            vs = _variants_for(loop, variants)
            best = {clock: {v: float("inf") for v in vs} for clock in CLOCKS}
            gc.collect()
            gc.disable()
            try:
                for rnd in range(rounds):
                    for v in _rotate(vs, r * rounds + rnd):
                        took = bench.batch(bench.subjects[(kind, v)], loop, n, warm)
                        for clock, ns in zip(CLOCKS, took, strict=True):
                            best[clock][v] = min(best[clock][v], ns / n / 1000)
            finally:
                gc.enable()
            for clock in CLOCKS:
                for v in vs:
                    per_run[clock][(kind, loop)][v].append(best[clock][v])
        log(f"run {r + 1}/{runs}: {time.perf_counter() - t_run:.1f} s")
    return sizes, per_run


def analyse(per_run: PerRun, sizes: dict[tuple[str, str], int], wall: PerRun) -> dict[str, Any]:
    """Summaries, per-run differences, ratios and percentages for one clock.

    Percentages are always of the wall-clock PostgreSQL round trip (``wall``): the round
    trip is what the application waits, whichever clock measured the added cost.
    """
    rtt = wall.get(("pg", "stmt"), {}).get("bare")
    rtt_raw = wall.get(("pg", "stmt"), {}).get("dbapi")
    cells: dict[str, Any] = {}
    for (kind, loop), byv in per_run.items():
        bare = byv["bare"]
        cell: dict[str, Any] = {
            "statements_per_subbatch": sizes[(kind, loop)],
            "us_per_statement": {v: _summary(xs) for v, xs in byv.items()},
            "added_us": {},
            "ratio": {},
            "pct_of_pg_roundtrip": {},
            "pct_of_raw_pg_roundtrip": {},
            "pct_of_own_bare": {},
        }
        for v, xs in byv.items():
            if v in ("bare", "dbapi"):
                continue
            added = [x - b for x, b in zip(xs, bare, strict=True)]
            cell["added_us"][v] = _summary(added)
            cell["pct_of_own_bare"][v] = _summary(
                [a / b * 100 for a, b in zip(added, bare, strict=True)], 2
            )
            if rtt is not None:
                cell["pct_of_pg_roundtrip"][v] = _summary(
                    [a / b * 100 for a, b in zip(added, rtt, strict=True)], 2
                )
            if rtt_raw is not None:
                cell["pct_of_raw_pg_roundtrip"][v] = _summary(
                    [a / b * 100 for a, b in zip(added, rtt_raw, strict=True)], 2
                )
        for num, den in RATIOS:
            if num in byv and den in byv:
                ratios = [
                    (a - b) / (o - b) if o - b > 0 else float("nan")
                    for a, o, b in zip(byv[num], byv[den], bare, strict=True)
                ]
                ok = [x for x in ratios if x == x]
                if ok:
                    cell["ratio"][f"{num}/{den}"] = _summary(ok, 3)
        cells[f"{kind}/{loop}"] = cell
    goals: dict[str, Any] = {}
    for name, cell in cells.items():
        g: dict[str, Any] = {}
        for num, den in RATIOS:
            r = cell["ratio"].get(f"{num}/{den}")
            if r is not None:
                g[f"{num} below {den}"] = r["median"] < 1.0
        p = cell["pct_of_pg_roundtrip"].get("guard")
        if p is not None:
            g["guard under 5 % of a PG round trip"] = p["median"] < PCT_GOAL
        goals[name] = g
    out: dict[str, Any] = {"cells": cells, "goals": goals}
    if rtt is not None:
        out["pg_roundtrip_us"] = _summary(rtt)
    if rtt_raw is not None:
        out["raw_pg_roundtrip_us"] = _summary(rtt_raw)
    return out


# -- output ---------------------------------------------------------------------------------------
def _fmt(s: dict[str, Any] | None, digits: int = 1, pct: bool = False) -> str:
    if s is None:
        return "-"
    unit = " %" if pct else ""
    return f"{s['median']:.{digits}f} [{s['p25']:.{digits}f}, {s['p75']:.{digits}f}]{unit}"


CLOCK_TITLES = {
    "wall": "Wall clock (time.perf_counter_ns)",
    "cpu": "Process CPU time (time.process_time_ns): the client's own work, immune to "
    "preemption and to the server's time",
}


def tables(result: dict[str, Any], variants: Sequence[str], clock: str) -> str:
    cells = result["cells"]
    lines = [
        f"### {CLOCK_TITLES[clock]}",
        "",
        "µs per statement (checkout loop: per checkout + statement + return), "
        "median over runs [p25, p75]:",
        "",
        "| engine/loop | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for name, cell in cells.items():
        row = [_fmt(cell["us_per_statement"].get(v)) for v in variants]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    added = [v for v in variants if v not in ("bare", "dbapi")]
    lines += [
        "",
        "Added µs per statement over bare (median of per-run differences [p25, p75]), "
        "poolguard's added cost / the instrumentation's (per-run ratios), and poolguard's "
        "added cost as % of a PostgreSQL round trip (wall clock, bare SQLAlchemy + psycopg "
        "`select 1`, same run):",
        "",
        "| engine/loop | "
        + " | ".join(f"+{v}" for v in added)
        + " | guard/otel-off | guard-sdk/otel-off | guard-traced/otel-on | guard % of PG RTT |",
        "|---|" + "---:|" * (len(added) + 4),
    ]
    for name, cell in cells.items():
        row = [_fmt(cell["added_us"].get(v), 2) for v in added]
        row += [_fmt(cell["ratio"].get(f"{a}/{b}"), 2) for a, b in RATIOS]
        row.append(_fmt(cell["pct_of_pg_roundtrip"].get("guard"), 1, pct=True))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    if "pg_roundtrip_us" in result:
        lines += [
            "",
            f"PostgreSQL round trip, wall clock (bare SQLAlchemy + psycopg `select 1`): "
            f"{_fmt(result['pg_roundtrip_us'])} µs"
            + (
                f"; raw psycopg: {_fmt(result['raw_pg_roundtrip_us'])} µs"
                if "raw_pg_roundtrip_us" in result
                else ""
            ),
        ]
    missed = [
        f"{name}: {goal}" for name, g in result["goals"].items() for goal, ok in g.items() if not ok
    ]
    lines += ["", "Goals missed (medians): " + ("none" if not missed else "; ".join(missed))]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "sqlalchemy",
        "psycopg",
        "asyncpg",
        "aiosqlite",
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-sqlalchemy",
        "poolguard",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _pg_reachable(url: URL) -> str | None:
    try:
        e = create_engine(url.set(drivername="postgresql+psycopg"))
        with e.connect() as c:
            c.execute(STMT)
        e.dispose()
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (under 30 s)")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 7; 3 with --quick)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="sub-batches per variant per run (default 5)"
    )
    parser.add_argument(
        "--batch-ms", type=float, default=None, help="target sub-batch length (default 18 ms)"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"default {DEFAULT_PG_URL}")
    parser.add_argument(
        "--engines",
        default=",".join(KINDS),
        help="comma-separated subset of " + ",".join(KINDS) + " (PostgreSQL ones are skipped "
        "with a warning when the server is unreachable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    runs: int = args.runs if args.runs is not None else (3 if args.quick else 7)
    rounds: int = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    batch_ms: float = args.batch_ms if args.batch_ms is not None else (3.0 if args.quick else 18.0)
    if runs < 1 or rounds < 1 or batch_ms <= 0:
        parser.error("--runs and --rounds must be >= 1 and --batch-ms > 0")
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise SystemExit("a global tracer provider is set: the API-only variants would be wrong")

    pg_url = make_url(args.pg_url)
    if PG_KINDS & set(kinds):
        why = _pg_reachable(pg_url)
        if why is not None:
            log(
                f"PostgreSQL unreachable at {pg_url.render_as_string(hide_password=True)} "
                f"({why}): skipping {', '.join(k for k in kinds if k in PG_KINDS)}"
            )
            kinds = [k for k in kinds if k not in PG_KINDS]
    if not kinds:
        raise SystemExit("no engine to measure")

    started = time.perf_counter()
    load_before = os.getloadavg()
    otel = Otel()
    aloop = asyncio.new_event_loop()
    bench = Bench(otel, aloop)
    urls = _urls(args.pg_url)
    variants = list(VARIANTS)
    try:
        for kind in kinds:
            for v in variants:
                bench.subjects[(kind, v)] = make_subject(kind, v, urls[kind], otel, aloop)
        sampler_calls = verify_otel(bench, kinds)
        log(f"instrumentation verified (sampler calls per 10 statements: {sampler_calls})")
        sizes, per_run = run_benchmark(bench, kinds, variants, runs, rounds, batch_ms, log)
        check_uninstrumented(bench)
        for s in bench.subjects.values():
            if s.guard is not None:
                stats = s.guard.stats()
                counted = sum(int(row["count"]) for row in stats["statements"])
                if counted == 0:
                    raise RuntimeError(f"{s.kind}/{s.variant}: the guard saw no statement")
        results = {clock: analyse(per_run[clock], sizes, per_run["wall"]) for clock in CLOCKS}
    finally:
        for s in bench.subjects.values():
            close_subject(s, aloop)
        aloop.close()
        otel.shutdown()
    elapsed = time.perf_counter() - started

    for clock in CLOCKS:
        print(tables(results[clock], variants, clock))
        print()
    print(
        f"\n{elapsed:.0f} s; load average before {load_before[0]:.2f}, "
        f"after {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs"
    )

    if args.json is not None:
        doc = {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                },
                "versions": _versions(),
                "args": {
                    "quick": args.quick,
                    "runs": runs,
                    "rounds": rounds,
                    "batch_ms": batch_ms,
                    "engines": kinds,
                    "pg_url": pg_url.render_as_string(hide_password=True),
                },
                "method": (
                    "all variants in one process; per run, each engine/loop cell cycles through "
                    "its variants round-robin (rotated order) in `rounds` sub-batches of equal "
                    "statement count; a run's figure is the fastest sub-batch; medians and "
                    "p25-p75 over runs; differences and ratios computed per run, then the "
                    "median; GC disabled during timed sub-batches; two clocks read around "
                    "each timed loop: wall = time.perf_counter_ns, cpu = time.process_time_ns"
                ),
                "statements_per_subbatch": {f"{k}/{lp}": n for (k, lp), n in sizes.items()},
                "elapsed_s": round(elapsed, 1),
                "instrumentation_sampler_calls_per_10_statements": sampler_calls,
            },
            **results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
