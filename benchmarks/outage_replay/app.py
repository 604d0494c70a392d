"""The application under test: FastAPI, ``def`` endpoints, SQLAlchemy on psycopg 3.

Run by :mod:`benchmarks.outage_replay.run` in a subprocess of its own::

    python -m benchmarks.outage_replay.app --mode poolguard --tag outage_replay_x

It binds 127.0.0.1 on a free port, prints ``PORT <n>`` on stdout, and serves with one uvicorn
worker until it gets SIGTERM or SIGINT. ``def`` endpoints run in anyio's thread pool (40
threads, FastAPI's default); the engine keeps SQLAlchemy's default pool (5 + 10) in every mode.

Modes:

- ``defaults``: plain SQLAlchemy, no server-side time-out, 30 s pool time-out;
- ``hand-tuned``: ``statement_timeout`` 1 s through the connect options, ``pool_timeout`` 0.25 s;
- ``poolguard``: ``PoolGuard(engine)`` and the middleware, no arguments at all;
- ``poolguard-tuned``: generic settings a user can choose knowing only their app's normal
  behaviour (see :func:`tuned_settings`), never which endpoint is the rogue.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

MODES = ("defaults", "hand-tuned", "poolguard", "poolguard-tuned")
#: The database (on 127.0.0.1:5432): ``OUTAGE_REPLAY_DB`` names another one, so that runs
#: beside other users of ``test`` (a shared machine's test suites) do not share its tables.
DB_NAME = os.environ.get("OUTAGE_REPLAY_DB", "test")
DSN = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"
TABLE = "outage_replay_items"
ROWS = 1000
HOT_ID = 1
#: Environment variable with JSON overrides of the poolguard-tuned settings (experiments).
TUNED_ENV = "OUTAGE_REPLAY_TUNED"
#: Environment variable that switches on :class:`GateProbe` (diagnostics only).
PROBE_ENV = "OUTAGE_REPLAY_PROBE"

#: The statements, as the endpoints send them (literals as bind parameters, as an ORM would).
READ_SQL = f"select id, val from {TABLE} where id = :id"
READ_COST_SQL = f"select id, val, pg_sleep(:cost) as _ from {TABLE} where id = :id"
WRITE_SQL = f"update {TABLE} set val = val + 1 where id = :id"
SLOW_SQL = "select pg_sleep(:seconds)"


def tuned_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """(PoolGuard kwargs, middleware kwargs) of the ``poolguard-tuned`` mode.

    Generic choices, each derivable from the application's normal behaviour without knowing
    which endpoint will go rogue: the slowest legitimate statement takes well under 0.1 s, so
    a 1 s statement time-out is ten times headroom; a request that has not had a connection
    within 0.25 s will not meet its users' expectations anyway; no request needs more than 2 s.
    """
    from poolguard.integrations.asgi.middleware import RouteRule

    guard_kwargs: dict[str, Any] = {"statement_timeout": 1.0, "checkout_timeout": 0.25}
    middleware_kwargs: dict[str, Any] = {
        "default": RouteRule(deadline=2.0),
        "routes": {"/_bench/stats": RouteRule(exempt=True)},
    }
    # Experiments: {"guard": {...}, "middleware": {...}} merged over the above (JSON).
    override = json.loads(os.environ.get(TUNED_ENV, "{}") or "{}")
    guard_kwargs.update(override.get("guard", {}))
    middleware_kwargs.update(override.get("middleware", {}))
    return guard_kwargs, middleware_kwargs


class GateProbe:
    """Samples the gate every 2 ms in a thread of its own (``OUTAGE_REPLAY_PROBE=1``): how
    often connections ran out or requests waited, and for how long, under a given load.

    For choosing when the middleware's per-route share should apply: it must not apply
    under a closed-loop load that the pool serves, and must under a standing queue.
    """

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.samples = 0
        self.full = 0
        self.waiting = 0
        self.waited_over_5ms = 0
        self.max_oldest = 0.0
        self.max_waiting = 0
        t = threading.Thread(target=self._run, daemon=True, name="gate-probe")
        t.start()

    def _run(self) -> None:
        import time

        gate = self.guard.gate
        while True:
            time.sleep(0.002)
            now = time.monotonic()
            self.samples += 1
            held, waiting = gate.held, gate.waiting
            if held >= gate.capacity - gate.reserve:  # no connection left for normal work
                self.full += 1
            if waiting:
                self.waiting += 1
                self.max_waiting = max(self.max_waiting, waiting)
                oldest = gate.oldest_wait(now)
                self.max_oldest = max(self.max_oldest, oldest)
                if oldest > 0.005:
                    self.waited_over_5ms += 1

    def summary(self) -> dict[str, Any]:
        n = max(1, self.samples)
        return {
            "samples": self.samples,
            "pool_full_pct": round(100 * self.full / n, 2),
            "waiters_pct": round(100 * self.waiting / n, 2),
            "oldest_over_5ms_pct": round(100 * self.waited_over_5ms / n, 2),
            "max_oldest_ms": round(1000 * self.max_oldest, 1),
            "max_waiting": self.max_waiting,
        }


def build_app(mode: str, tag: str, healthy_cost: float, dsn: str = DSN) -> FastAPI:
    """The application for ``mode``; ``tag`` becomes every connection's application_name."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    connect_args: dict[str, Any] = {"application_name": tag}
    engine_kwargs: dict[str, Any] = {}
    if mode == "hand-tuned":
        connect_args["options"] = "-c statement_timeout=1000"
        engine_kwargs["pool_timeout"] = 0.25
    engine = sa.create_engine(dsn, connect_args=connect_args, **engine_kwargs)

    app = FastAPI()
    guard: Any = None
    if mode.startswith("poolguard"):
        from poolguard import PoolGuard, PoolGuardMiddleware

        if mode == "poolguard":
            guard = PoolGuard(engine)
            app.add_middleware(PoolGuardMiddleware, guard=guard)
        else:
            guard_kwargs, middleware_kwargs = tuned_settings()
            guard = PoolGuard(engine, **guard_kwargs)
            app.add_middleware(PoolGuardMiddleware, guard=guard, **middleware_kwargs)

    probe = GateProbe(guard) if guard is not None and os.environ.get(PROBE_ENV) else None
    read_sql = sa.text(READ_COST_SQL if healthy_cost > 0 else READ_SQL)
    write_sql = sa.text(WRITE_SQL)
    slow_sql = sa.text(SLOW_SQL)

    @app.exception_handler(sa_exc.SQLAlchemyError)
    def database_error(request: Request, exc: Exception) -> JSONResponse:
        """What a sane app does with database errors: an answer, not a logged traceback.

        poolguard's own errors go on to its middleware, which answers them itself.
        """
        if guard is not None:
            from poolguard import PoolGuardError

            if isinstance(exc, PoolGuardError):
                raise exc
        status = 503 if isinstance(exc, sa_exc.TimeoutError) else 500
        return JSONResponse({"error": type(exc).__name__}, status_code=status)

    @app.get("/item/{item_id}")
    def read_item(item_id: int) -> dict[str, int]:
        """Healthy: one row by primary key (plus ``pg_sleep(cost)`` in scenario d)."""
        params: dict[str, Any] = {"id": item_id}
        if healthy_cost > 0:
            params["cost"] = healthy_cost
        with engine.connect() as conn:
            row = conn.execute(read_sql, params).one()
        return {"id": row.id, "val": row.val}

    @app.post("/item/{item_id}/incr")
    def write_item(item_id: int) -> dict[str, int]:
        """Healthy writer: bump one row (the hot row in scenario c)."""
        with engine.begin() as conn:
            conn.execute(write_sql, {"id": item_id})
        return {"id": item_id}

    @app.get("/report")
    def report(seconds: float) -> dict[str, float]:
        """The rogue of scenarios a and b: one statement that runs ``seconds``."""
        with engine.connect() as conn:
            conn.execute(slow_sql, {"seconds": seconds})
        return {"seconds": seconds}

    @app.post("/item/{item_id}/audit")
    def audit(item_id: int, seconds: float) -> dict[str, int]:
        """The rogue of scenario c: lock the row, then spend ``seconds`` before committing."""
        with engine.begin() as conn:
            conn.execute(write_sql, {"id": item_id})
            conn.execute(slow_sql, {"seconds": seconds})
        return {"id": item_id}

    @app.get("/_bench/stats")
    def bench_stats() -> dict[str, Any]:
        """For the driver, at the end of a run: poolguard's own view, and the pool's."""
        pool: Any = engine.pool
        out: dict[str, Any] = {"mode": mode, "pool": pool.status()}
        if guard is not None:
            s = guard.stats()
            out["guard"] = {
                "gate": s["gate"],
                "settings": s["settings"],
                "quarantine": s["quarantine"],
                "refusals": s["refusals"],
                "statements": s["statements"][:8],
            }
            if probe is not None:
                out["probe"] = probe.summary()
        return out

    @app.get("/_bench/ready")
    def ready() -> dict[str, bool]:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return {"ready": True}

    app.state.engine = engine
    app.state.guard = guard
    return app


def serve(app: FastAPI, announce: Callable[[int], None]) -> None:
    """Serve on 127.0.0.1 and a free port; ``announce(port)`` once the socket is bound."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket's proto is IPPROTO_TCP, and a proto of 0 leaves Nagle's algorithm on,
    # which costs every response a 40 ms delayed-ACK stall with h11.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    announce(port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        guard = getattr(app.state, "guard", None)
        if guard is not None:
            guard.close()
        app.state.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--tag", required=True, help="application_name of every connection")
    parser.add_argument("--healthy-cost", type=float, default=0.0)
    parser.add_argument("--dsn", default=DSN)
    args = parser.parse_args(argv)
    app = build_app(args.mode, args.tag, args.healthy_cost, args.dsn)

    def announce(port: int) -> None:
        print(json.dumps({"port": port}), flush=True)

    # SIGTERM from the driver: stop like on Ctrl-C (uvicorn handles both once it runs).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve(app, announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
