"""Running one phase: the application WITHOUT or WITH poolguard under the scenario's load,
with the pool sampled until every client has had its answer or given up. Every thread,
connection and engine of the phase is gone before it returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from poolguard.guard import PoolGuard
from poolguard.integrations.asgi.middleware import PoolGuardMiddleware
from poolguard.tools.demo.app import Gauges, build_app
from poolguard.tools.demo.client import ASGIApp, DemoRequest, send_request
from poolguard.tools.demo.progress import Progress, progress_line
from poolguard.tools.demo.results import PhaseResult
from poolguard.tools.demo.scenario import (
    HEALTHY,
    HEALTHY_RATE,
    PATIENCE,
    ROGUE_RATE,
    ROGUE_SECONDS,
    schedule,
)
from poolguard.tools.demo.workload import DemoError, Workload

__all__ = ["run_phase"]

#: Seconds between two samples of the pool.
SAMPLE_EVERY = 0.05

#: Seconds granted to the application to wind down after a phase (threads, connections).
WIND_DOWN = 15.0


class _LogTap(logging.Handler):
    """Keeps poolguard's WARNINGs (its alerts) for the report instead of the terminal."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tap_poolguard_logs() -> Iterator[_LogTap]:
    logger = logging.getLogger("poolguard")
    tap = _LogTap()
    saved = logger.propagate
    logger.addHandler(tap)
    logger.propagate = False
    try:
        yield tap
    finally:
        logger.removeHandler(tap)
        logger.propagate = saved


async def run_phase(
    name: str,
    protected: bool,
    workload: Workload,
    duration: float,
    progress: Progress,
    healthy_rate: float = HEALTHY_RATE,
    rogue_rate: float = ROGUE_RATE,
) -> PhaseResult:
    """Serve one phase's load and measure it; every thread and connection ends before return."""
    result = PhaseResult(name=name, protected=protected, duration=duration)
    workload.stop.clear()
    engine = workload.make_engine()
    guard: PoolGuard | None = None
    gauges = Gauges()
    stop_at = math.inf  # set below: the rogue never outlives the phase and its patience

    def rogue_until() -> float:
        return min(time.monotonic() + ROGUE_SECONDS, stop_at)

    starlette = build_app(engine, workload, gauges, rogue_until)
    app: ASGIApp = starlette
    tasks: list[asyncio.Future[None]] = []
    monitor: asyncio.Future[None] | None = None
    with _tap_poolguard_logs() as tap:
        try:
            if protected:
                guard = PoolGuard(engine)
                starlette.add_middleware(PoolGuardMiddleware, guard=guard)
            pool = engine.pool
            result.capacity = (
                pool.size() + max(0, pool._max_overflow) if isinstance(pool, QueuePool) else 0
            )
            # One request before the clock starts: the dialect's first connect and the
            # application's middleware stack are built once, as in a running server.
            await _warm_up(app)

            start = time.monotonic()
            end = start + duration
            stop_at = end + PATIENCE
            plan = schedule(duration, healthy_rate, rogue_rate)
            monitor = asyncio.ensure_future(
                _monitor(result, engine, guard, gauges, tasks, start, end, progress)
            )
            for offset, kind, path in plan:
                at = start + offset
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                ex = DemoRequest(kind, at)
                result.exchanges.append(ex)
                tasks.append(asyncio.ensure_future(send_request(app, path, ex, PATIENCE)))
            # Every client gets its answer or gives up (at most PATIENCE after the last send).
            await asyncio.wait(tasks, timeout=PATIENCE + 1.0)
        finally:
            # The phase is over: stop the rogue, let every handler finish and return its
            # connection, then drop the engine.
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            workload.stop.set()
            stop_at = time.monotonic()
            pending = [t for t in tasks if not t.done()]
            pending += [
                e.task for e in result.exchanges if e.task is not None and not e.task.done()
            ]
            if pending:
                _, still = await asyncio.wait(pending, timeout=WIND_DOWN)
                for t in still:
                    t.cancel()
            for e in result.exchanges:
                if e.task is not None and e.task.done() and not e.task.cancelled():
                    e.task.exception()  # consumed: the outcome was recorded
            if guard is not None:
                result.alerts = _alerts(tap.messages)
                guard.close()
            engine.dispose()
    result.endpoint_threads = sorted(gauges.threads)
    return result


async def _warm_up(app: ASGIApp) -> None:
    ex = DemoRequest(HEALTHY, time.monotonic())
    await send_request(app, "/items/1", ex, PATIENCE)
    error: BaseException | None = None
    if ex.task is not None:
        await asyncio.wait((ex.task,), timeout=PATIENCE)
        if ex.task.done() and not ex.task.cancelled():
            error = ex.task.exception()
    if ex.outcome != "200":
        why = f": {type(error).__name__}" if error is not None else ""
        raise DemoError(f"the demo application failed its first request ({ex.outcome}{why})")


def _alerts(messages: list[str]) -> list[str]:
    """poolguard's warnings, deduplicated, in order."""
    seen: list[str] = []
    for m in messages:
        if m not in seen:
            seen.append(m)
    return seen[:10]


async def _monitor(
    result: PhaseResult,
    engine: Engine,
    guard: PoolGuard | None,
    gauges: Gauges,
    tasks: list[asyncio.Future[None]],
    start: float,
    end: float,
    progress: Progress,
) -> None:
    """Sample the pool and redraw the progress line until cancelled."""
    pool = engine.pool
    trips: dict[str, int] = {}
    while True:
        now = time.monotonic()
        checked_out = pool.checkedout() if isinstance(pool, QueuePool) else 0
        result.max_checked_out = max(result.max_checked_out, checked_out)
        result.max_waiting = max(result.max_waiting, gauges.waiting)
        in_flight = sum(1 for e in result.exchanges if e.task is not None and not e.task.done())
        result.max_in_flight = max(result.max_in_flight, in_flight)
        if guard is not None:
            for entry in guard.quarantined():
                fp = str(entry["fingerprint"])
                if fp not in trips and result.quarantined_at is None:
                    result.quarantined_at = now - start
                trips[fp] = max(trips.get(fp, 0), int(entry["trips"]))
            result.quarantine_events = sum(trips.values())
        progress.update(progress_line(result, now - start, checked_out, gauges.waiting, in_flight))
        await asyncio.sleep(SAMPLE_EVERY)
