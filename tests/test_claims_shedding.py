"""CoDel queue-delay shedding through the middleware, on a real pool that is saturated: once
the queue in front of the pool has stood above its target for an interval, requests are
refused with a 503 before their handler runs, critical ones excepted, and admitted again
once the queue drains."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from poolguard import PoolGuard, PoolGuardMiddleware, RouteRule

pytestmark = pytest.mark.postgresql
MakeGuard = Callable[..., PoolGuard]
CAPACITY = 3


def _app(guard: PoolGuard, engine: sa.Engine, ran: list[str]) -> Starlette:
    def work(request: Request) -> JSONResponse:
        ran.append(request.url.path)
        with engine.connect() as c:
            return JSONResponse({"n": c.execute(sa.text("select 1")).scalar_one()})

    def critical(request: Request) -> JSONResponse:
        ran.append(request.url.path)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/work", work), Route("/critical", critical)])
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        # Deadlines far past the test: a queued request must not give up under load.
        routes={
            "/work": RouteRule(deadline=60.0),
            "/critical": RouteRule(priority="critical", deadline=60.0),
        },
    )
    return app


def _in_background(app: Starlette, path: str, out: list[httpx.Response]) -> threading.Thread:
    def get() -> None:
        out.append(TestClient(app).get(path))

    t = threading.Thread(target=get)
    t.start()
    return t


def _until(cond: Callable[[], bool]) -> None:
    end = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.005)


def test_standing_queue_is_shed_before_the_handler_runs_and_ends_when_it_drains(
    make_guard: MakeGuard, pg_url: str
) -> None:
    engine = sa.create_engine(pg_url, pool_size=CAPACITY, max_overflow=0)
    guard = make_guard(
        engine, checkout_timeout=60.0, critical_reserve=0, shed_target=0.005, shed_interval=0.1
    )
    ran: list[str] = []
    app = _app(guard, engine, ran)
    client = TestClient(app)
    held = [engine.connect() for _ in range(CAPACITY)]  # the pool is saturated
    background: list[httpx.Response] = []
    threads = []
    try:
        for c in held:
            c.execute(sa.text("select 1"))
        # 1. A request is admitted (nobody queued) and queues at the gate.
        threads.append(_in_background(app, "/work", background))
        _until(lambda: guard.gate.waiting == 1)
        time.sleep(0.15)
        # 2. The next one sees a queue delay past the 5 ms target, but one sample above
        #    target is a burst, not a standing queue: admitted, it queues too.
        threads.append(_in_background(app, "/work", background))
        _until(lambda: guard.gate.waiting == 2)
        time.sleep(0.15)
        # 3. Above target for longer than the 100 ms interval, with fewer waiters than the
        #    pool's size (so not for lack of capacity): refused before the handler runs.
        r = client.get("/work")
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        assert int(r.headers["retry-after"]) >= 1
        assert ran == ["/work", "/work"]  # only the two admitted ones ran
        assert guard.gate.waiting == 2  # the refused request never joined the queue
        assert guard.stats()["shedding"]["levels"]["GET /work"] == 2
        # 4. Critical work is never shed for queue delay.
        assert client.get("/critical").status_code == 200
    finally:
        for c in held:
            c.close()
        for t in threads:
            t.join(60)
    # 5. The queue drained: both queued requests were served, and the next is admitted.
    assert [r.status_code for r in background] == [200, 200]
    assert guard.gate.waiting == 0
    assert client.get("/work").status_code == 200
    assert ran == ["/work", "/work", "/critical", "/work"]
