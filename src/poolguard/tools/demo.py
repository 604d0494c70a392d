"""``poolguard demo``: replay the outage poolguard was born from, without and with it.

A query shipped in a deploy took seconds; its endpoint kept being called, every connection
of the pool ended up waiting on it, and the healthy endpoints, whose queries take a
millisecond, stood in line behind it for SQLAlchemy's 30 s pool timeout: the site was down
for two and a half hours although only one query was wrong. The demo runs that story twice
on the same little web application, for ``--duration`` seconds each, under the same
open-loop load:

1. WITHOUT poolguard: SQLAlchemy's defaults (a pool of 5 + 10, a 30 s pool timeout, no
   statement timeout);
2. WITH poolguard: ``PoolGuard(engine)`` with its defaults and ``PoolGuardMiddleware``.

and prints the two side by side. No server is needed: by default the database is an SQLite
file (WAL mode) in a temporary directory that is removed afterwards.
``--database-url postgresql+psycopg://...`` (or ``mariadb+pymysql://...``) runs the same on
a real server, where nothing is created: the healthy queries are constant SELECTs and the
rogue is ``pg_sleep()`` (PostgreSQL) or 20 ms ``SLEEP()`` steps over MariaDB's sequence
engine. Credentials are never printed, only ``driver://host:port/db``.

How the pieces were chosen, and why:

- **A real Starlette application with ``def`` endpoints**, wrapped by the real middleware.
  Starlette runs ``def`` endpoints on anyio's worker threads (40 by default, the limit FastAPI
  users get too), which is where the outage happens: threads pile up waiting for the pool.
- **Driven in-process, through ASGI, by a small client in this module**, not through
  uvicorn and httpx: the demo must run on the core installation (``pip install poolguard``
  brings SQLAlchemy and Starlette, not uvicorn or httpx), a socket adds nothing to a story
  about the connection pool, and in-process there is no port to find or to leak. The client
  behaves like an HTTP server would towards the application: it sends the request body, then
  reports ``http.disconnect`` when its user gives up, and never cancels the application
  itself (servers do not), so abandoned ``def`` handlers keep their thread and connection
  exactly as they would behind uvicorn. Starlette still dispatches ``def`` endpoints to the
  thread pool on this path; the demo records the thread that served them to prove it.
- **Open-loop load**: requests are sent on a fixed schedule whatever happens to earlier
  ones, and each latency is measured from the request's *intended* send time, so a stalled
  server cannot slow the load down and hide its own stall (coordinated omission).
  Clients give up after :data:`PATIENCE` seconds, longer than poolguard's 5 s default
  statement timeout so that its 504s are seen as such.
- **Rates**: :data:`ROGUE_RATE` rogue requests a second are enough to fill the 15
  connections in six seconds when nothing stops the rogue query, and few enough that
  poolguard's default 5 s statement timeout caps the rogue at about 13 connections before
  the quarantine trips. Healthy traffic is :data:`HEALTHY_RATE` requests a second.
- **The rogue query on SQLite** is a recursive CTE walking a long series that pauses every
  few thousand rows in a small SQL function (as a server-side query waits on disk or on
  locks). Its duration is therefore set by the wall clock, not by how loaded the machine is,
  and it keeps the demo's own CPU free for the web application: the demo measures pool
  exhaustion, not a busy laptop. SQLite releases the GIL while it steps, and poolguard's
  progress handler interrupts it between two chunks.
- The rogue query ends on its own :data:`ROGUE_SECONDS` after it started, or when the phase
  is over and every client has had its answer or given up, whichever comes first, so that
  every thread, connection and engine is gone before the next phase (and before exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from poolguard.guard import PoolGuard
from poolguard.integrations.asgi.middleware import PoolGuardMiddleware

__all__ = ["main"]

#: Healthy requests sent per second (split over two endpoints).
HEALTHY_RATE = 40.0
#: Rogue requests sent per second.
ROGUE_RATE = 2.5
#: Seconds a client waits for its answer before it gives up (and disconnects).
PATIENCE = 6.0
#: Seconds the rogue query runs when nothing stops it.
ROGUE_SECONDS = 20.0
#: Default seconds per phase: two phases and the clients' patience fit in under 30 s.
DEFAULT_DURATION = 10.0
MIN_DURATION = 1.0
MAX_DURATION = 600.0
#: Seconds per phase below which the outage has little time to show: the rogue fills the
#: unprotected pool after about 6 s (15 connections at ROGUE_RATE).
CONTRAST_DURATION = 8.0
#: Seconds between two samples of the pool.
SAMPLE_EVERY = 0.05
#: Seconds between two progress lines when the output is not a terminal.
PLAIN_PROGRESS_EVERY = 2.0
#: Seconds granted to the application to wind down after a phase (threads, connections).
WIND_DOWN = 15.0

# The rogue on SQLite: chunks of _CHUNK_ROWS rows (a fraction of a millisecond of stepping),
# then a _PAUSE pause in demo_pace(), which also says whether to go on. About 1% of a core
# per running rogue: fifteen of them leave a loaded 2-core machine to the web app.
_CHUNK_ROWS = 1000
_PAUSE = 0.02

HEALTHY = "healthy"
ROGUE = "rogue"
GAVE_UP = "gave up"
ERROR = "error"


class DemoError(Exception):
    """A problem worth one line on stderr (bad URL, missing driver, cannot connect)."""


# -- the database -----------------------------------------------------------------------------
def safe_url(url: URL) -> str:
    """``driver://host:port/db``: never a user name or a password, never query options."""
    if url.get_backend_name() == "sqlite":
        return f"{url.drivername}:///{url.database or ':memory:'}"
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host or ''}{port}/{url.database or ''}"


class Workload:
    """The demo's database and its three queries, for one dialect.

    ``rogue_params(until)`` gives the rogue statement's parameters for a query that should
    end at ``until`` (``time.monotonic()``); ``stop`` ends every running rogue early on SQLite.
    """

    def __init__(self, url: URL, label: str, engine_kwargs: dict[str, Any]) -> None:
        self.url = url
        self.label = label
        self.engine_kwargs = engine_kwargs
        backend = url.get_backend_name()
        self.backend = "mysql" if backend == "mariadb" else backend
        self.stop = threading.Event()
        self.item_sql: sa.TextClause
        self.orders_sql: sa.TextClause
        self.rogue_sql: sa.TextClause
        if self.backend == "sqlite":
            self.item_sql = sa.text("SELECT id, name, price FROM items WHERE id = :id")
            self.orders_sql = sa.text(
                "SELECT id, item_id, quantity FROM orders WHERE customer_id = :id "
                "ORDER BY id DESC LIMIT 5"
            )
            self.rogue_sql = sa.text(
                "WITH RECURSIVE walk(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM walk "
                f"WHERE CASE WHEN n % {_CHUNK_ROWS} = 0 THEN demo_pace(:until) ELSE 1 END) "
                "SELECT count(*) FROM walk"
            )
        else:
            # On a server the demo creates nothing: the healthy queries are constant SELECTs.
            self.item_sql = sa.text("SELECT CAST(:id AS INTEGER) * 2")
            self.orders_sql = sa.text("SELECT CAST(:id AS INTEGER) + 1")
            # PostgreSQL's statement_timeout stops pg_sleep() at once. MariaDB's
            # max_statement_time may not wake a thread inside one long SLEEP() (MDEV-18024;
            # seen here as 5 s limits firing 2-4 s late), so the rogue there sleeps in
            # 20 ms steps, one row of the sequence engine each, and is stopped between two.
            self.rogue_sql = sa.text(
                "SELECT pg_sleep(:seconds)"
                if self.backend == "postgresql"
                else "SELECT COUNT(*) FROM seq_1_to_100000 WHERE "
                "SYSDATE(6) < NOW(6) + INTERVAL :us MICROSECOND AND SLEEP(0.02) = 0"
            )

    def rogue_params(self, until: float) -> dict[str, float]:
        if self.backend == "sqlite":
            return {"until": until}
        seconds = max(0.0, until - time.monotonic())
        if self.backend == "postgresql":
            return {"seconds": round(seconds, 3)}
        return {"us": int(seconds * 1e6)}

    def _pace(self, until: float) -> int:
        # Runs inside SQLite, in the executing thread: pause, then say whether to go on.
        time.sleep(_PAUSE)
        return 1 if time.monotonic() < until and not self.stop.is_set() else 0

    def make_engine(self) -> Engine:
        """A new engine with SQLAlchemy's default pool: the setting the outage happened on."""
        engine = sa.create_engine(self.url, **self.engine_kwargs)
        if self.backend == "sqlite":
            pace = self._pace

            def add_pace(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.create_function("demo_pace", 1, pace, deterministic=False)

            event.listen(engine, "connect", add_pace)
        return engine

    def check(self) -> None:
        """Connect once and create the SQLite tables; one clear error if that fails."""
        engine = self.make_engine()
        try:
            with engine.begin() as conn:
                if self.backend == "sqlite":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    conn.exec_driver_sql(
                        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL)"
                    )
                    conn.exec_driver_sql(
                        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, "
                        "item_id INTEGER, quantity INTEGER)"
                    )
                    conn.exec_driver_sql("CREATE INDEX orders_customer ON orders (customer_id)")
                    conn.execute(
                        sa.text("INSERT INTO items VALUES (:id, :name, :price)"),
                        [{"id": i, "name": f"item {i}", "price": i * 1.5} for i in range(1, 1001)],
                    )
                    conn.execute(
                        sa.text("INSERT INTO orders VALUES (:id, :c, :i, :q)"),
                        [
                            {"id": i, "c": i % 200, "i": i % 1000 + 1, "q": i % 5 + 1}
                            for i in range(1, 5001)
                        ],
                    )
                else:
                    conn.execute(self.item_sql, {"id": 1}).one()
                    if self.backend != "postgresql":
                        version = str(conn.execute(sa.text("SELECT VERSION()")).scalar())
                        if "mariadb" not in version.lower():
                            raise DemoError(
                                f"{self.label} is MySQL {version}: the demo runs on MariaDB "
                                "(its rogue query needs MariaDB's sequence engine)"
                            )
        except sa.exc.DBAPIError as err:
            raise DemoError(
                f"cannot use {self.label}: {_describe_db_error(err, self.url)}"
            ) from None
        finally:
            engine.dispose()


def _describe_db_error(err: sa.exc.DBAPIError, url: URL) -> str:
    """The driver's first line, with the URL's user name and password blanked out."""
    orig = err.orig if err.orig is not None else err
    lines = str(orig).strip().splitlines()
    text = lines[0] if lines else ""
    for secret in (url.password, url.username):
        if secret:
            # Whole words only: a user "u" must not turn "refused" into "ref***sed".
            text = re.sub(rf"(?<!\w){re.escape(str(secret))}(?!\w)", "***", text)
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def workload_for(database_url: str | None, tmpdir: str) -> Workload:
    """Parse and check ``--database-url`` (None: an SQLite file under ``tmpdir``)."""
    if database_url is None:
        url = sa.make_url(f"sqlite:///{os.path.join(tmpdir, 'demo.db')}")
        return Workload(url, "SQLite (embedded, WAL, temporary file)", {})
    try:
        url = sa.make_url(database_url)
    except (sa.exc.ArgumentError, ValueError):
        raise DemoError(
            "--database-url is not a database URL (driver://user@host:port/db)"
        ) from None
    backend = url.get_backend_name()
    if backend == "mariadb":
        backend = "mysql"
    if backend == "sqlite":
        raise DemoError(
            "--database-url: SQLite is the default (a temporary file the demo creates and "
            "removes); leave --database-url out to use it"
        )
    if backend not in ("postgresql", "mysql", "mariadb"):
        raise DemoError(
            f"--database-url: {backend!r} is not supported (postgresql, mysql or mariadb)"
        )
    try:
        dialect = url.get_dialect()
    except (sa.exc.NoSuchModuleError, ImportError):
        raise DemoError(f"--database-url: no SQLAlchemy dialect for {url.drivername!r}") from None
    if getattr(dialect, "is_async", False):
        raise DemoError(
            f"--database-url: {url.drivername!r} is an asyncio driver; the demo's web app "
            "uses a sync engine (try postgresql+psycopg:// or mysql+pymysql://)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise DemoError(
            f"--database-url: the driver for {url.drivername!r} is not installed ({err.name})"
        ) from None
    # A bounded connect (the driver's own default can be minutes), for the drivers that are
    # known to take these arguments.
    connect_args: dict[str, Any] = {}
    if dialect.driver in ("psycopg", "psycopg2"):
        connect_args = {"connect_timeout": 5, "application_name": "poolguard-demo"}
    elif dialect.driver in ("pymysql", "mysqldb"):
        connect_args = {"connect_timeout": 5}
    kwargs: dict[str, Any] = {"connect_args": connect_args} if connect_args else {}
    return Workload(url, safe_url(url), kwargs)


# -- the web application ------------------------------------------------------------------------
class Gauges:
    """What the application sees of its own pool: threads waiting for a connection, and
    which threads served the ``def`` endpoints (to show they ran on the thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = 0
        self.threads: set[str] = set()

    @contextlib.contextmanager
    def waiting_for_connection(self) -> Iterator[None]:
        with self._lock:
            self.waiting += 1
            self.threads.add(threading.current_thread().name)
        try:
            yield
        finally:
            with self._lock:
                self.waiting -= 1


def build_app(
    engine: Engine, workload: Workload, gauges: Gauges, rogue_until: Callable[[], float]
) -> Starlette:
    """The shop: two healthy ``def`` endpoints and the one shipped with the rogue query."""

    def connect() -> sa.Connection:
        with gauges.waiting_for_connection():
            return engine.connect()

    def item(request: Request) -> JSONResponse:
        item_id = int(request.path_params["item_id"])
        with connect() as conn:
            row = conn.execute(workload.item_sql, {"id": item_id}).first()
        return JSONResponse({"item": None if row is None else list(row)})

    def orders(request: Request) -> JSONResponse:
        customer = int(request.path_params["customer_id"])
        with connect() as conn:
            rows = conn.execute(workload.orders_sql, {"id": customer}).all()
        return JSONResponse({"orders": [list(r) for r in rows]})

    def recommendations(request: Request) -> JSONResponse:
        with connect() as conn:
            score = conn.execute(workload.rogue_sql, workload.rogue_params(rogue_until())).scalar()
        return JSONResponse({"score": score})

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/customers/{customer_id:int}/orders", orders),
            Route("/recommendations", recommendations),
        ]
    )


# -- the in-process client ----------------------------------------------------------------------
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


@dataclass
class Exchange:
    """One request as its client saw it."""

    kind: str
    intended: float
    outcome: str = ""  # the status code as text, GAVE_UP or ERROR
    latency: float = math.nan
    task: asyncio.Future[None] | None = None


async def send_request(app: ASGIApp, path: str, ex: Exchange, patience: float) -> None:
    """GET ``path`` through ASGI and wait at most until ``ex.intended + patience``.

    Like an HTTP server, this sends the (empty) body, then reports ``http.disconnect`` once
    the client gives up or the response is complete; it never cancels the application.
    """
    loop = asyncio.get_running_loop()
    disconnected = asyncio.Event()
    answered = loop.create_future()
    status: list[int] = []
    body_sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if not answered.done():
                answered.set_result(None)
            disconnected.set()

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"demo.local")],
        "client": ("127.0.0.1", 50000),
        "server": ("demo.local", 80),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    ex.task = task
    left = ex.intended + patience - time.monotonic()
    done, _ = await asyncio.wait((answered, task), timeout=max(0.0, left))
    now = time.monotonic()
    if answered.done() and status:
        ex.outcome = str(status[0])
    elif task.done():
        # The application raised without answering (Starlette answers 500 and re-raises).
        ex.outcome = str(status[0]) if status else ERROR
        if not task.cancelled():
            task.exception()  # retrieved: the outcome says it all
    else:
        ex.outcome = GAVE_UP
        disconnected.set()
        now = max(now, ex.intended + patience)
    ex.latency = now - ex.intended
    if not done:
        answered.cancel()


# -- running a phase ----------------------------------------------------------------------------
@dataclass
class PhaseResult:
    """What one phase measured: every exchange, and the pool's high-water marks."""

    name: str
    protected: bool
    duration: float
    exchanges: list[Exchange] = field(default_factory=list)
    capacity: int = 0
    max_checked_out: int = 0
    max_waiting: int = 0
    max_in_flight: int = 0
    quarantine_events: int = 0
    quarantined_at: float | None = None
    alerts: list[str] = field(default_factory=list)
    endpoint_threads: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.kind == kind]

    def healthy_ok(self) -> int:
        return sum(1 for e in self.of(HEALTHY) if e.outcome.startswith("2"))

    def healthy_success(self) -> float:
        sent = len(self.of(HEALTHY))
        return self.healthy_ok() / sent if sent else 0.0

    def healthy_latency(self, q: float) -> float:
        return percentile([e.latency for e in self.of(HEALTHY)], q)

    def outcomes(self, kind: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.of(kind):
            counts[e.outcome] = counts.get(e.outcome, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), kv[0])))

    def to_json(self) -> dict[str, Any]:
        healthy = self.of(HEALTHY)
        return {
            "protected": self.protected,
            "duration_s": self.duration,
            "healthy": {
                "sent": len(healthy),
                "ok": self.healthy_ok(),
                "success_rate": round(self.healthy_success(), 4),
                "p50_ms": _ms(self.healthy_latency(0.50)),
                "p99_ms": _ms(self.healthy_latency(0.99)),
                "max_ms": _ms(max((e.latency for e in healthy), default=math.nan)),
                "outcomes": self.outcomes(HEALTHY),
            },
            "rogue": {"sent": len(self.of(ROGUE)), "outcomes": self.outcomes(ROGUE)},
            "pool": {
                "capacity": self.capacity,
                "max_checked_out": self.max_checked_out,
                "max_waiting": self.max_waiting,
                "max_in_flight": self.max_in_flight,
            },
            "quarantine": {
                "events": self.quarantine_events,
                "first_at_s": None
                if self.quarantined_at is None
                else round(self.quarantined_at, 2),
            },
            "alerts": self.alerts,
            "endpoint_threads": self.endpoint_threads,
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def schedule(
    duration: float, healthy_rate: float, rogue_rate: float
) -> list[tuple[float, str, str]]:
    """(offset, kind, path) for every request of a phase, in order: a fixed, even schedule."""
    plan: list[tuple[float, str, str]] = []
    n = int(duration * healthy_rate)
    for i in range(n):
        path = f"/items/{i % 1000 + 1}" if i % 2 == 0 else f"/customers/{i % 200}/orders"
        plan.append((i / healthy_rate, HEALTHY, path))
    # The first rogue request comes a quarter period in: just after the deploy.
    m = int(duration * rogue_rate)
    plan.extend(((j + 0.25) / rogue_rate, ROGUE, "/recommendations") for j in range(m))
    plan.sort(key=lambda p: p[0])
    return plan


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
                ex = Exchange(kind, at)
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
    ex = Exchange(HEALTHY, time.monotonic())
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
        progress.update(_progress_line(result, now - start, checked_out, gauges.waiting, in_flight))
        await asyncio.sleep(SAMPLE_EVERY)


def _progress_line(
    result: PhaseResult, elapsed: float, checked_out: int, waiting: int, in_flight: int
) -> str:
    """One short line (most telling first, as a narrow terminal clips the end)."""
    healthy = [e for e in result.of(HEALTHY) if e.outcome]
    ok = sum(1 for e in healthy if e.outcome.startswith("2"))
    pending = sum(1 for e in result.of(HEALTHY) if not e.outcome and e.task is not None)
    clock = f"{min(elapsed, result.duration):4.1f}/{result.duration:g}s"
    if elapsed > result.duration:
        clock += f" +{elapsed - result.duration:.0f}s"  # settling: the last answers or give-ups
    quarantine = " | rogue quarantined" if result.quarantined_at is not None else ""
    return (
        f"{result.name:<17} {clock} | healthy {ok} ok {len(healthy) - ok} failed "
        f"{pending} pending | pool {checked_out}/{result.capacity}, {waiting} waiting, "
        f"{in_flight} in flight{quarantine}"
    )


# -- output -------------------------------------------------------------------------------------
class Progress:
    """A single updating line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self._last_plain = -math.inf
        self._width = shutil.get_terminal_size((100, 20)).columns - 1

    def update(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + text[: self._width].ljust(self._width))
            self.stream.flush()
        else:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY:
                self._last_plain = now
                self.stream.write(text + "\n")
                self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (ends the updating line first)."""
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_plain = -math.inf


def _fmt_latency(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _fmt_outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def render_table(without: PhaseResult, with_: PhaseResult) -> str:
    """The side-by-side comparison."""

    def success(r: PhaseResult) -> str:
        return f"{r.healthy_success() * 100:.1f}% ({r.healthy_ok()}/{len(r.of(HEALTHY))})"

    def quarantine(r: PhaseResult) -> str:
        if not r.protected:
            return "- (no quarantine)"
        if r.quarantined_at is None:
            return "0"
        return f"{r.quarantine_events} (rogue refused from {r.quarantined_at:.1f} s)"

    rows = [
        ("", without.name, with_.name),
        ("healthy success (2xx)", success(without), success(with_)),
        (
            "healthy p50",
            _fmt_latency(without.healthy_latency(0.5)),
            _fmt_latency(with_.healthy_latency(0.5)),
        ),
        (
            "healthy p99",
            _fmt_latency(without.healthy_latency(0.99)),
            _fmt_latency(with_.healthy_latency(0.99)),
        ),
        (
            "healthy failures",
            _fmt_outcomes({k: v for k, v in without.outcomes(HEALTHY).items() if k[0] != "2"}),
            _fmt_outcomes({k: v for k, v in with_.outcomes(HEALTHY).items() if k[0] != "2"}),
        ),
        (
            "rogue outcomes",
            _fmt_outcomes(without.outcomes(ROGUE)),
            _fmt_outcomes(with_.outcomes(ROGUE)),
        ),
        (
            "max pool checkouts",
            f"{without.max_checked_out}/{without.capacity}",
            f"{with_.max_checked_out}/{with_.capacity}",
        ),
        ("max threads waiting for pool", str(without.max_waiting), str(with_.max_waiting)),
        ("max requests in flight", str(without.max_in_flight), str(with_.max_in_flight)),
        ("quarantine events", quarantine(without), quarantine(with_)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = []
    for i, (a, b, c) in enumerate(rows):
        lines.append(f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}".rstrip())
        if i == 0:
            lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * w2}")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Errors are one line and exit 2, like the other ``poolguard`` commands."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not MIN_DURATION <= value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_DURATION:g} and {MAX_DURATION:g} seconds, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="poolguard demo",
        description=(
            "Replay the outage poolguard was born from: a web app with healthy endpoints and "
            "one rogue query, under steady load, first without poolguard (SQLAlchemy's "
            "defaults), then with PoolGuard(engine) and PoolGuardMiddleware. Runs on an "
            "embedded SQLite database unless --database-url says otherwise."
        ),
    )
    parser.add_argument(
        "--duration",
        type=_duration,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"seconds of load per phase (default {DEFAULT_DURATION:g}); the rogue fills the "
        f"unprotected pool after about 6 s, so use {CONTRAST_DURATION:g} or more to see the "
        "outage",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="run on this database instead (postgresql+psycopg://..., mariadb+pymysql://...); "
        "nothing is created there, and credentials are never printed",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON (progress goes to stderr)"
    )
    return parser


def _report(
    workload: Workload, duration: float, without: PhaseResult, with_: PhaseResult
) -> dict[str, Any]:
    return {
        "database": workload.label,
        "duration_s": duration,
        "healthy_rate": HEALTHY_RATE,
        "rogue_rate": ROGUE_RATE,
        "patience_s": PATIENCE,
        "phases": {"without": without.to_json(), "with": with_.to_json()},
    }


async def _run(
    workload: Workload, duration: float, progress: Progress
) -> tuple[PhaseResult, PhaseResult]:
    progress.line(
        f"poolguard demo on {workload.label}: {HEALTHY_RATE:g} healthy req/s, "
        f"{ROGUE_RATE:g} rogue req/s, {duration:g} s per phase, clients give up after "
        f"{PATIENCE:g} s"
    )
    without = await run_phase("WITHOUT poolguard", False, workload, duration, progress)
    progress.line(_summary(without))
    with_ = await run_phase("WITH poolguard", True, workload, duration, progress)
    progress.line(_summary(with_))
    return without, with_


def _summary(r: PhaseResult) -> str:
    return (
        f"{r.name}: healthy {r.healthy_success() * 100:.1f}% ok, p99 "
        f"{_fmt_latency(r.healthy_latency(0.99))}; rogue {_fmt_outcomes(r.outcomes(ROGUE))}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 done, 2 bad arguments or unusable database,
    130 interrupted). ``--help`` and argument errors return too, they never raise."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    tmpdir = tempfile.mkdtemp(prefix="poolguard-demo-")
    started = time.monotonic()
    try:
        try:
            workload = workload_for(args.database_url, tmpdir)
            workload.check()
        except DemoError as err:
            print(f"poolguard demo: {err}", file=sys.stderr)
            return 2
        progress = Progress(sys.stderr if args.json else sys.stdout)
        if args.duration < CONTRAST_DURATION:
            progress.line(
                f"note: with --duration under {CONTRAST_DURATION:g} s the outage has little time "
                "to show (the rogue fills the unprotected pool after about 6 s)"
            )
        try:
            without, with_ = asyncio.run(_run(workload, args.duration, progress))
        except KeyboardInterrupt:
            print("\npoolguard demo: interrupted", file=sys.stderr)
            return 130
        if args.json:
            report = _report(workload, args.duration, without, with_)
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(report, indent=2))
            return 0
        print()
        print(render_table(without, with_))
        alerts = with_.alerts
        if alerts:
            print()
            print("poolguard's alerts during the WITH phase:")
            for a in alerts:
                print(f"  {a}")
        print()
        threads = ", ".join(sorted(set(without.endpoint_threads) | set(with_.endpoint_threads)))
        print(
            f"Success is a 2xx within the clients' {PATIENCE:g} s patience; latencies run from "
            "each request's intended send time (open loop), failures included.\n"
            f"def endpoints ran on: {threads or '-'} (Starlette's thread pool, as under "
            f"uvicorn). Total {time.monotonic() - started:.1f} s."
        )
        return 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
