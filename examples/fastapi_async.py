"""FastAPI with ``async def`` endpoints on an AsyncEngine and AsyncSession, guarded by poolguard.

Async endpoints do not tie up a thread while they wait, so they fail differently: a request
waiting for a pooled connection holds nothing but its place in the queue, and thousands can
pile up in front of a 15-connection pool. ``PoolGuard`` works the same on an ``AsyncEngine``:
waits for a connection park on the event loop (never block it), statements are stopped by the
server (``statement_timeout`` with asyncpg, an interrupt with aiosqlite), and when a client goes
away the middleware cancels its handler, so its statement stops and its connection returns.

Defaults to aiosqlite on a file in the temp directory; set ``DATABASE_URL`` to an asyncpg URL
(``postgresql+asyncpg://user@host/db``) for PostgreSQL. Needs ``sqlalchemy[asyncio]`` and the
driver (``pip install 'poolguard[aiosqlite]'`` or ``'poolguard[asyncpg]'``).

Run it::

    uvicorn examples.fastapi_async:app
    DATABASE_URL=postgresql+asyncpg://user@host/db uvicorn examples.fastapi_async:app
    python examples/fastapi_async.py --self-test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import String, func, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from poolguard import PoolGuard, PoolGuardMiddleware
from poolguard.integrations.asgi.middleware import RouteRule

NAME = "fastapi_async"
DEFAULT_SQLITE = os.path.join(tempfile.gettempdir(), "poolguard-example-fastapi-async.db")
#: MySQL/MariaDB: a long SLEEP() is not reliably stopped by max_statement_time (MDEV-18024);
#: a join that never ends is, between two rows.
MYSQL_SLOW = (
    "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
    "information_schema.columns c"
)
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite+aiosqlite:///{DEFAULT_SQLITE}"


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "poolguard_example_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    total: Mapped[float]


engine: AsyncEngine = create_async_engine(DATABASE_URL)
# The same guard as for a sync engine: 1 s per statement, 0.5 s at most for a connection.
guard = PoolGuard(engine, statement_timeout=1.0, checkout_timeout=0.5)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def setup_database() -> None:
    """Create and fill the example table once (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with SessionLocal() as session, session.begin():
        if await session.scalar(select(func.count()).select_from(Order)) == 0:
            session.add_all(
                Order(id=i, customer=f"customer {i % 7}", total=i * 3.5) for i in range(1, 51)
            )


def slow_sql(dialect: str) -> str:
    """A statement that runs far longer than any web request should (the rogue query)."""
    if dialect == "postgresql":
        return "SELECT pg_sleep(30)"
    if dialect in ("mysql", "mariadb"):
        return MYSQL_SLOW
    return (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT count(*) FROM c"
    )


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await setup_database()
    yield
    guard.close()
    await engine.dispose()


app = FastAPI(title="poolguard example: FastAPI, async def endpoints", lifespan=lifespan)
app.add_middleware(
    PoolGuardMiddleware,
    guard=guard,
    routes={
        # Checkout is what pays: it goes first through the gate and is shed last.
        "POST /orders/{order_id}/pay": RouteRule(priority="critical", max_queries=10),
        "/health": RouteRule(exempt=True),
    },
    # Every other route: 5 s in all, at most 20 statements per request.
    default=RouteRule(deadline=5.0, max_queries=20),
)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"status": "ok", "pool": guard.stats()["pool"]}


@app.get("/orders/{order_id}")
async def read_order(order_id: int, session: SessionDep) -> dict[str, Any]:
    order = await session.get(Order, order_id)
    if order is None:
        raise HTTPException(status_code=404, detail="no such order")
    return {"id": order.id, "customer": order.customer, "total": order.total}


@app.post("/orders/{order_id}/pay")
async def pay_order(order_id: int, session: SessionDep) -> dict[str, Any]:
    async with session.begin():
        order = await session.get(Order, order_id, with_for_update=True)
        if order is None:
            raise HTTPException(status_code=404, detail="no such order")
    return {"id": order_id, "paid": True}


@app.get("/customers/{customer}/spend")
async def customer_spend(customer: str, session: SessionDep) -> dict[str, Any]:
    """Stands in for the query that went wrong in a deploy: it takes far too long."""
    await session.execute(text(slow_sql(engine.dialect.name)))
    return {"customer": customer, "spend": 0}


# -- self-test ----------------------------------------------------------------------------------
async def self_test() -> int:
    """Exercise the app in-process (lifespan included); 0 only if every check passed."""
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
            check(r.status_code == 200, "GET /health -> 200")
            r = await client.get("/orders/7")
            check(r.status_code == 200 and r.json()["total"] == 24.5, "GET /orders/7 -> 200")
            r = await client.post("/orders/7/pay")
            check(r.status_code == 200 and r.json()["paid"], "POST /orders/7/pay -> 200")
            r = await client.get("/orders/999")
            check(r.status_code == 404, "GET /orders/999 -> 404 (the app's own answer)")

            # Ten requests at once: all served, none waits long, none holds a connection after.
            answers = await asyncio.gather(*(client.get(f"/orders/{i}") for i in range(1, 11)))
            check(all(a.status_code == 200 for a in answers), "10 concurrent requests -> 200")

            # The rogue statement: stopped by the database after 1 s, answered 504.
            for attempt in range(1, 4):
                r = await client.get("/customers/ada/spend")
                check(
                    r.status_code == 504
                    and r.headers["content-type"].startswith("application/problem+json")
                    and r.json()["status"] == 504,
                    f"rogue query #{attempt} -> 504 problem+json",
                )
            r = await client.get("/customers/bob/spend")
            check(
                r.status_code == 503 and r.json()["type"].endswith("/query-quarantined"),
                "rogue query #4 -> 503 quarantined",
            )
            r = await client.get("/orders/3")
            check(r.status_code == 200, "healthy endpoint still 200 while the rogue is refused")

            # A request abandoned mid-statement (its task cancelled, as a server does when
            # it shuts down): the handler is cancelled, the statement stops and the
            # connection comes back long before the statement's own time-out would.
            for entry in guard.quarantined():
                guard.release(entry["fingerprint"])
            request = asyncio.ensure_future(client.get("/customers/cy/spend"))
            await asyncio.sleep(0.3)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            for _ in range(50):
                if guard.checked_out == 0:
                    break
                await asyncio.sleep(0.01)
            check(guard.checked_out == 0, "cancelled request gave its connection back at once")
    finally:
        if created and os.path.exists(DEFAULT_SQLITE):
            os.remove(DEFAULT_SQLITE)
    if failures:
        print(f"self-test FAILED: {NAME}: {len(failures)} of {checks} checks failed")
        return 1
    print(f"self-test passed: {NAME} ({checks} checks on {engine.dialect.name}+{engine.driver})")
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
