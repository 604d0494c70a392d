"""The outage replay's application, as one member of a fleet.

FastAPI with ``def`` endpoints on a pool of 15 (3 + 12 overflow), guarded by
``PoolGuard(engine, fleet=RedisFleet(...), statement_timeout=1.0, checkout_timeout=0.25)``
and the middleware. Every connection's ``application_name`` is the run's tag, so the driver
counts this fleet's server sessions in ``pg_stat_activity``. Serves on 127.0.0.1 and a free
port (printed as JSON on stdout) through the single-process replay's ``serve``.

    python -m benchmarks.fleet.app --dsn ... --redis ... --name ... --cap 20 --tag ...
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa
from benchmarks.outage_replay.app import serve
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from poolguard import PoolGuard, PoolGuardError, PoolGuardMiddleware
from poolguard.fleet import RedisFleet

READ_SQL = "select id, val from fleet_replay_items where id = :id"
SLOW_SQL = "select pg_sleep(:seconds)"


def build_app(dsn: str, redis_url: str, name: str, cap: int, tag: str) -> FastAPI:
    # A pool of 15 (3 kept open while idle, 12 more on demand): the sizing docs/fleet.md
    # gives for a cap of 20 at up to 6 replicas, so idle sessions stay within the cap too.
    engine = sa.create_engine(
        dsn, pool_size=3, max_overflow=12, connect_args={"application_name": tag}
    )
    fleet = RedisFleet(redis_url, name=name, max_connections=cap)
    guard = PoolGuard(engine, fleet=fleet, statement_timeout=1.0, checkout_timeout=0.25)
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    app.state.engine, app.state.guard = engine, guard
    read_sql, slow_sql = sa.text(READ_SQL), sa.text(SLOW_SQL)

    @app.exception_handler(sa_exc.SQLAlchemyError)
    def database_error(request: Request, exc: Exception) -> JSONResponse:
        """An answer, not a traceback; poolguard's own errors go on to its middleware."""
        if isinstance(exc, PoolGuardError):
            raise exc
        status = 503 if isinstance(exc, sa_exc.TimeoutError) else 500
        return JSONResponse({"error": type(exc).__name__}, status_code=status)

    @app.get("/item/{item_id}")
    def read_item(item_id: int) -> dict[str, int]:
        with engine.connect() as c:
            row = c.execute(read_sql, {"id": item_id}).one()
        return {"id": row[0], "val": row[1]}

    @app.get("/report")
    def report(seconds: float) -> dict[str, float]:
        with engine.connect() as c:
            c.execute(slow_sql, {"seconds": seconds})
        return {"slept": seconds}

    @app.get("/fleet")
    def fleet_stats() -> dict[str, Any]:
        s = guard.stats()
        return {"fleet": s["fleet"], "quarantine": s["quarantine"], "refusals": s["refusals"]}

    return app


def trace(guard: PoolGuard, path: str, every: float = 0.02) -> None:
    """Append the gate and the member's leases to ``path`` every ``every`` seconds (JSON
    lines, wall-clock time), in-process so that tracing adds no request: the replay lines
    refusals up against what the member had and held at that moment."""
    gate, member = guard.gate, guard._parts.fleet
    with open(path, "a", buffering=1) as f:
        while True:
            g = gate.snapshot()
            m = member.snapshot() if member is not None else {}
            row = {
                "t": round(time.time(), 3),
                "cap": g.capacity,
                "part_cap": g.partition_cap,
                "held": g.held,
                "waiting": g.waiting,
                "held_by": g.held_by_partition,
                "waiting_by": g.waiting_by_partition,
                "leases": m.get("leases"),
                "share": m.get("share"),
                "starving": m.get("starving"),
            }
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
            time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--cap", type=int, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--trace", default=None, help="append gate samples to this file")
    args = ap.parse_args(argv)
    app = build_app(args.dsn, args.redis, args.name, args.cap, args.tag)
    if args.trace:
        threading.Thread(target=trace, args=(app.state.guard, args.trace), daemon=True).start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve(app, lambda port: print(json.dumps({"port": port}), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
