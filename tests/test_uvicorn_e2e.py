"""End to end through a real uvicorn server, started in-process on 127.0.0.1 with a free
port, driven over real sockets with httpx, bounded in time and stopped at the end.

What only a real server shows: its lifespan reaching the app through the middleware, its own
``receive`` reporting a client that hung up, and refusals measured on the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import PoolGuardMiddleware
from poolguard.core.budget import current_scope
from poolguard.integrations.asgi.middleware import RouteRule

MakeGuard = Callable[..., Any]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` on uvicorn in a thread; yield its base URL; stop it, bounded."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says so, and without it every response stalls ~40 ms (Nagle and
    # delayed ACKs), which any latency measured here would mistake for the server's.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn failed to start"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"


def test_uvicorn_serves_sheds_fast_and_stays_clean(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, pool_size=1, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=3.0)
    lifespan_ran: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        lifespan_ran.append("startup")
        yield {"greeting": "from lifespan"}
        lifespan_ran.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    def item(item_id: int, request: Request) -> dict[str, Any]:  # def: the thread pool
        with engine.connect() as c:
            c.execute(sa.text("select :i"), {"i": item_id})
        s = current_scope()
        assert s is not None
        return {"partition": s.partition, "state": request.state.greeting}

    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        server_timing=True,
        routes={"/items/{item_id}": RouteRule(max_queries=3)},
    )
    with serving(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        r = client.get("/items/1")
        assert r.status_code == 200
        assert r.json() == {"partition": "GET /items/{item_id}", "state": "from lifespan"}
        assert 'db-queries;desc="1"' in r.headers["server-timing"]

        holder = engine.connect()  # the pool's only connection, held up
        results: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: results.update(w=client.get("/items/2")))
        try:
            waiter.start()
            for _ in range(400):
                if guard.gate.waiting:
                    break
                time.sleep(0.005)
            assert guard.gate.waiting == 1
            with httpx.Client(base_url=url, timeout=5) as burst:
                timings = []
                for i in range(10):
                    t0 = time.perf_counter()
                    refused = burst.get(f"/items/{i}")
                    timings.append(time.perf_counter() - t0)
                    assert refused.status_code == 503
                    assert refused.headers["content-type"] == "application/problem+json"
                    assert refused.headers["retry-after"].isdigit()
                    assert refused.json()["type"] == "https://poolguard.dev/problems/shed"
        finally:
            holder.close()
            waiter.join(timeout=5)
        assert results["w"].status_code == 200
        # Refused on the wire in milliseconds, while the pool was held up for seconds.
        assert sorted(timings)[len(timings) // 2] < 0.05, timings
    assert lifespan_ran == ["startup", "shutdown"]


@pytest.mark.postgresql
def test_uvicorn_client_hangup_cancels_the_postgresql_statement(
    make_guard: MakeGuard, pg_async_url: str, pg_url: str
) -> None:
    engine = create_async_engine(pg_async_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine, statement_timeout=10.0)
    admin = sa.create_engine(pg_url, poolclass=sa.NullPool)
    marker = "pg_sleep(5.0002)"  # a statement only this test runs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connected first, so that the hang-up lands in the statement; disposed on the
        # server's own event loop.
        async with engine.connect() as c:
            await c.execute(sa.text("select 1"))
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/sleep")
    async def sleep() -> dict[str, int]:
        async with engine.connect() as c:
            await c.execute(sa.text(f"select {marker}"))
        return {"slept": 1}  # pragma: no cover

    @app.get("/ok")
    async def ok() -> dict[str, int]:
        async with engine.connect() as c:
            return {"one": int((await c.execute(sa.text("select 1"))).scalar_one())}

    def active() -> int:
        with admin.connect() as c:
            n = c.execute(
                sa.text(
                    "select count(*) from pg_stat_activity where state = 'active' "
                    "and query like :q and pid <> pg_backend_pid()"
                ),
                {"q": f"%{marker}%"},
            ).scalar()
        return int(n or 0)

    app.add_middleware(PoolGuardMiddleware, guard=guard)
    try:
        with serving(app) as url:
            with (
                httpx.Client(base_url=url, timeout=0.3) as impatient,
                pytest.raises(httpx.ReadTimeout),
            ):
                impatient.get("/sleep")  # the client gives up and closes its connection
            hung_up = time.monotonic()
            while (guard.checked_out or active()) and time.monotonic() - hung_up < 1.5:
                time.sleep(0.02)
            assert guard.checked_out == 0
            assert engine.sync_engine.pool.checkedout() == 0
            assert active() == 0
            with httpx.Client(base_url=url, timeout=5) as client:
                assert client.get("/ok").json() == {"one": 1}  # and the pool is healthy
    finally:
        admin.dispose()
