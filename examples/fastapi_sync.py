"""FastAPI with ``def`` endpoints on a sync SQLAlchemy Engine, guarded by poolguard.

The most common setup, and the one the outage happens on: FastAPI runs ``def`` endpoints on
a 40-thread pool, SQLAlchemy's pool has 5 + 10 connections and waits 30 s for one. Here:

- ``PoolGuard(engine, ...)`` bounds every statement (1 s by default here) and every wait
  for a connection (0.5 s);
- ``PoolGuardMiddleware`` gives each request a budget, with two route rules: the reports
  route may run statements for 10 s and is shed first under load; ``/health`` is exempt
  (never shed, no budget) so a load balancer still sees the process alive;
- a ``Session`` dependency, as in FastAPI's SQL tutorial: nothing poolguard-specific in the
  endpoints. Refusals come back as ``application/problem+json`` 503/504.

Run it::

    uvicorn examples.fastapi_sync:app            # SQLite file in the temp directory
    DATABASE_URL=postgresql+psycopg://user@host/db uvicorn examples.fastapi_sync:app
    python examples/fastapi_sync.py --self-test  # in-process checks, exit 0 when all pass
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Engine, String, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from poolguard import PoolGuard, PoolGuardMiddleware
from poolguard.integrations.asgi.middleware import RouteRule

NAME = "fastapi_sync"
DEFAULT_SQLITE = os.path.join(tempfile.gettempdir(), "poolguard-example-fastapi-sync.db")
#: MySQL/MariaDB: a long SLEEP() is not reliably stopped by max_statement_time (MDEV-18024);
#: a join that never ends is, between two rows.
MYSQL_SLOW = (
    "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
    "information_schema.columns c"
)
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE}"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "poolguard_example_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[float]


# SQLAlchemy's default pool (5 + 10): poolguard protects it as it is.
engine: Engine = create_engine(DATABASE_URL)
# One guard per engine. Statements may run 1 s unless a route says otherwise; a checkout
# waits at most 0.5 s, so a saturated pool answers 503 quickly instead of hanging.
guard = PoolGuard(engine, statement_timeout=1.0, checkout_timeout=0.5)


def setup_database(bind: Engine) -> None:
    """Create and fill the example table once (idempotent)."""
    Base.metadata.create_all(bind)
    with Session(bind) as session, session.begin():
        if session.scalar(select(func.count()).select_from(Item)) == 0:
            session.add_all(Item(id=i, name=f"item {i}", price=i * 1.25) for i in range(1, 101))


def slow_sql(dialect: str) -> str:
    """A statement that runs far longer than any web request should (the rogue query)."""
    if dialect == "postgresql":
        return "SELECT pg_sleep(30)"
    if dialect in ("mysql", "mariadb"):
        return MYSQL_SLOW
    # SQLite: counts to a billion; poolguard's progress handler interrupts it.
    return (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT count(*) FROM c"
    )


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    setup_database(engine)
    yield
    guard.close()
    engine.dispose()


app = FastAPI(title="poolguard example: FastAPI, def endpoints", lifespan=lifespan)
app.add_middleware(
    PoolGuardMiddleware,
    guard=guard,
    routes={
        # Reports legitimately run long statements; under load they go first.
        "GET /reports/prices": RouteRule(
            deadline=30.0, statement_timeout=10.0, priority="sheddable"
        ),
        # Health checks must answer even when the pool is saturated.
        "/health": RouteRule(exempt=True),
    },
)


def get_session() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@app.get("/health")
def health() -> dict[str, Any]:
    stats = guard.stats()
    return {"status": "ok", "pool": stats["pool"], "quarantined": len(stats["quarantine"])}


@app.get("/items/{item_id}")
def read_item(item_id: int, session: SessionDep) -> dict[str, Any]:
    item = session.get(Item, item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item.id, "name": item.name, "price": item.price}


@app.get("/reports/prices")
def price_report(session: SessionDep) -> dict[str, Any]:
    count, average = session.execute(select(func.count(), func.avg(Item.price))).one()
    return {"items": count, "average_price": round(float(average or 0), 2)}


@app.get("/items/{item_id}/recommendations")
def recommendations(item_id: int, session: SessionDep) -> dict[str, Any]:
    """Stands in for the query that went wrong in a deploy: it takes far too long."""
    session.execute(text(slow_sql(engine.dialect.name)))
    return {"item_id": item_id, "recommendations": []}


# -- self-test ----------------------------------------------------------------------------------
async def self_test() -> int:
    """Exercise the app in-process (lifespan included); 0 only if every check passed.

    httpx's ASGITransport drives the app on this event loop; FastAPI still runs the ``def``
    endpoints on its thread pool, exactly as under uvicorn.
    """
    import httpx

    failures: list[str] = []
    checks = 0

    def check(ok: bool, what: str) -> None:
        nonlocal checks
        checks += 1
        if not ok:
            failures.append(what)
            print(f"FAILED: {what}", file=sys.stderr)

    created = DATABASE_URL.startswith("sqlite") and not os.path.exists(DEFAULT_SQLITE)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://example.test") as client,
        ):
            r = await client.get("/health")
            check(r.status_code == 200 and r.json()["status"] == "ok", "GET /health -> 200")
            r = await client.get("/items/3")
            check(r.status_code == 200 and r.json()["name"] == "item 3", "GET /items/3 -> 200")
            r = await client.get("/items/9999")
            check(r.status_code == 404, "GET /items/9999 -> 404 (the app's own answer)")
            r = await client.get("/reports/prices")
            check(r.status_code == 200 and r.json()["items"] == 100, "GET /reports/prices -> 200")

            # The rogue query: stopped by the database after 1 s, answered as a problem
            # document that names the statement by its fingerprint, never by its text.
            for attempt in range(1, 4):
                r = await client.get("/items/1/recommendations")
                check(
                    r.status_code == 504
                    and r.headers["content-type"].startswith("application/problem+json")
                    and r.json()["status"] == 504,
                    f"rogue query #{attempt} -> 504 problem+json",
                )
                check(
                    not any(s in r.text for s in ("RECURSIVE", "pg_sleep", "SLEEP(", "1000000")),
                    "no SQL text or literal in the problem document",
                )
            # Three time-outs: the statement is quarantined and refused without running.
            r = await client.get("/items/2/recommendations")
            check(
                r.status_code == 503
                and r.json()["type"].endswith("/query-quarantined")
                and "retry-after" in r.headers,
                "rogue query #4 -> 503 quarantined, with Retry-After",
            )
            r = await client.get("/items/4")
            check(r.status_code == 200, "healthy endpoint still 200 while the rogue is refused")
            quarantined = guard.quarantined()
            check(len(quarantined) == 1, "guard.quarantined() lists the rogue statement")
            for entry in quarantined:
                guard.release(entry["fingerprint"])  # an operator's manual release
            check(guard.checked_out == 0, "no connection left checked out")
    finally:
        if created and os.path.exists(DEFAULT_SQLITE):
            os.remove(DEFAULT_SQLITE)
    if failures:
        print(f"self-test FAILED: {NAME}: {len(failures)} of {checks} checks failed")
        return 1
    print(f"self-test passed: {NAME} ({checks} checks on {engine.dialect.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="run the in-process checks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.self_test:
        return asyncio.run(self_test())
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
