"""CORS and middleware order: poolguard's own 503/504 answers carry the same CORS headers as
the application's other answers when the middlewares are added in the order the docs
recommend (PoolGuardMiddleware first, CORSMiddleware after it, so CORS is the outermost).

FastAPI's and Starlette's ``add_middleware`` wraps outside everything added before: added the
other way round, poolguard answers outside CORS and a browser sees a CORS error instead of
a 503 with Retry-After (the last test shows it)."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time.
import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from poolguard import PoolGuardMiddleware

MakeGuard = Callable[..., Any]

ORIGIN = "https://shop.example"
# Runs until interrupted: SQLite's recursive CTE with no bound.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


@pytest.fixture
def engine(sqlite_file_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, pool_size=1, max_overflow=0)
    yield eng
    eng.dispose()


def build_app(guard: Any, engine: sa.Engine, *, cors_outermost: bool = True, **mw: Any) -> FastAPI:
    app = FastAPI()
    started = asyncio.Event()
    release = asyncio.Event()
    app.state.started, app.state.release = started, release

    @app.get("/ok")
    def ok() -> dict[str, int]:
        with engine.connect() as c:
            return {"one": c.exec_driver_sql("SELECT 1").scalar_one()}

    @app.get("/report")
    def report() -> dict[str, int]:
        with engine.connect() as c:
            return {"rows": c.exec_driver_sql(ENDLESS).scalar_one()}  # 504: time-out

    @app.get("/wait")
    async def wait() -> dict[str, bool]:
        started.set()
        await release.wait()
        return {"done": True}

    cors: dict[str, Any] = {
        "allow_origins": [ORIGIN],
        "allow_methods": ["*"],
        "allow_headers": ["*"],
        # So that the front end's code can read when to retry a 503.
        "expose_headers": ["Retry-After"],
    }
    if cors_outermost:  # the documented order
        app.add_middleware(PoolGuardMiddleware, guard=guard, **mw)
        app.add_middleware(CORSMiddleware, **cors)
    else:
        app.add_middleware(CORSMiddleware, **cors)
        app.add_middleware(PoolGuardMiddleware, guard=guard, **mw)
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


def assert_cors(response: httpx.Response) -> None:
    assert response.headers.get("access-control-allow-origin") == ORIGIN, response.headers
    if response.status_code == 503:
        exposed = response.headers.get("access-control-expose-headers", "").lower()
        assert "retry-after" in exposed
        assert int(response.headers["retry-after"]) >= 1


async def test_a_504_from_a_statement_time_out_carries_cors(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    guard = make_guard(engine, statement_timeout=0.2)
    async with client(build_app(guard, engine)) as c:
        ok = await c.get("/ok", headers={"origin": ORIGIN})
        timed_out = await c.get("/report", headers={"origin": ORIGIN})
    assert ok.status_code == 200
    assert_cors(ok)
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.headers["content-type"].startswith("application/problem+json")
    assert_cors(timed_out)


async def test_a_503_for_a_saturated_pool_carries_cors(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    guard = make_guard(engine, checkout_timeout=0.1)
    async with client(build_app(guard, engine)) as c:
        with engine.connect():  # the pool's only connection is taken
            saturated = await c.get("/ok", headers={"origin": ORIGIN})
    assert saturated.status_code == 503, saturated.text
    assert saturated.json()["status"] == 503
    assert_cors(saturated)


async def test_a_503_for_a_quarantined_statement_carries_cors(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    guard = make_guard(engine, statement_timeout=0.1)
    async with client(build_app(guard, engine)) as c:
        statuses = []
        for _ in range(5):
            r = await c.get("/report", headers={"origin": ORIGIN})
            assert_cors(r)
            statuses.append(r.status_code)
            if r.status_code == 503:
                break
    # Time-outs (504) until the statement is quarantined; then refused at once (503).
    assert statuses[-1] == 503, statuses
    assert set(statuses[:-1]) == {504}
    assert guard.quarantined()


async def test_a_refusal_before_dispatch_carries_cors(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    """The middleware's own refusal (the in-flight limit), sent before the router runs."""
    guard = make_guard(engine)
    app = build_app(guard, engine, max_inflight=1)
    async with client(app) as c:
        first = asyncio.ensure_future(c.get("/wait", headers={"origin": ORIGIN}))
        await asyncio.wait_for(app.state.started.wait(), 5)
        refused = await c.get("/ok", headers={"origin": ORIGIN})
        app.state.release.set()
        done = await first
    assert done.status_code == 200
    assert refused.status_code == 503, refused.text
    assert "inflight_limit" in refused.json()["detail"]
    assert_cors(refused)


async def test_a_preflight_is_answered_by_cors_alone(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    guard = make_guard(engine)
    async with client(build_app(guard, engine)) as c:
        r = await c.options(
            "/ok", headers={"origin": ORIGIN, "access-control-request-method": "GET"}
        )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN


async def test_the_other_order_loses_the_cors_headers(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    """Why the order matters: CORSMiddleware added first ends up inside poolguard, so
    poolguard's 503 goes out without CORS headers (a browser reports a CORS error)."""
    guard = make_guard(engine, checkout_timeout=0.1)
    async with client(build_app(guard, engine, cors_outermost=False)) as c:
        ok = await c.get("/ok", headers={"origin": ORIGIN})
        with engine.connect():
            saturated = await c.get("/ok", headers={"origin": ORIGIN})
    assert_cors(ok)  # the application's own answers still have them
    assert saturated.status_code == 503
    assert "access-control-allow-origin" not in saturated.headers
