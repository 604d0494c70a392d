"""Refusal follows the pool, not a count: a busy app whose pool keeps up is never refused,
and a rogue route is still confined when the pool really is contended.

Measured before (issue #9): 16 simultaneous GETs of one route got one 503 while the pool held
no connection and nobody waited, and at 30 half were refused (the route's in-flight share,
about 15, knew nothing of the pool). Here on a real PostgreSQL behind a real uvicorn, with
FastAPI ``def`` endpoints on anyio's 40-thread pool and SQLAlchemy's default pool (5 + 10).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from poolguard import PoolGuardMiddleware
from test_uvicorn_e2e import serving

MakeGuard = Callable[..., Any]

pytestmark = pytest.mark.postgresql


def _app(engine: sa.Engine, guard: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:  # def: the thread pool, as in most apps
        with engine.connect() as c:
            return {"id": int(c.execute(sa.text("select :i"), {"i": item_id}).scalar_one())}

    @app.get("/report")
    def report() -> dict[str, int]:
        with engine.connect() as c:
            c.execute(sa.text("select pg_sleep(2.5)"))
        return {"done": 1}

    app.add_middleware(PoolGuardMiddleware, guard=guard)  # zero config
    return app


def _simultaneous(url: str, paths: list[str]) -> list[httpx.Response]:
    """Every path requested at the same moment, each on a client connection of its own."""
    start = threading.Barrier(len(paths))
    out: list[httpx.Response | BaseException] = [RuntimeError("not sent")] * len(paths)

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                start.wait(10)
                out[i] = client.get(paths[i])
        except BaseException as e:  # reported by the caller
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("n", [16, 30])
def test_simultaneous_requests_with_free_connections_are_never_refused(
    make_guard: MakeGuard, pg_url: str, n: int
) -> None:
    engine = sa.create_engine(pg_url)  # SQLAlchemy's default pool: 5 + 10
    guard = make_guard(engine)
    with serving(_app(engine, guard)) as url:
        for round_ in range(3):
            responses = _simultaneous(url, [f"/items/{round_ * n + i}" for i in range(n)])
            assert [r.status_code for r in responses] == [200] * n, [
                r.text for r in responses if r.status_code != 200
            ]
    assert guard.stats()["refusals"] == {}


def test_a_rogue_route_under_real_contention_is_still_confined(
    make_guard: MakeGuard, pg_url: str
) -> None:
    engine = sa.create_engine(pg_url)
    # A 3 s checkout bound: the rogue's waiters stay queued long enough for the test to
    # act while they wait (the share applies once they have waited half of it).
    guard = make_guard(engine, checkout_timeout=3.0)
    healthy: list[int] = []
    stop = threading.Event()

    with serving(_app(engine, guard)) as url:

        def healthy_traffic() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    healthy.append(client.get(f"/items/{i}").status_code)
                    i += 1
                    time.sleep(0.01)

        background = threading.Thread(target=healthy_traffic)
        background.start()
        try:
            time.sleep(0.3)
            # 30 slow requests at once: more than the pool, so most wait at the gate.
            first: list[httpx.Response] = []
            wave = threading.Thread(
                target=lambda: first.extend(_simultaneous(url, ["/report"] * 30))
            )
            wave.start()
            # Once its waiters have waited half their checkout bound, the route is held to
            # its share of the requests in flight: the next wave is refused at the door,
            # before a thread or the pool is spent on it.
            deadline = time.monotonic() + 5
            while guard.gate.oldest_wait(time.monotonic(), "GET /report") < 1.6:
                assert time.monotonic() < deadline, "the rogue never queued at the gate"
                time.sleep(0.01)
            t0 = time.monotonic()
            second = _simultaneous(url, ["/report"] * 20)
            refused_in = time.monotonic() - t0
            wave.join(30)
        finally:
            stop.set()
            background.join(30)

    assert {r.status_code for r in second} == {503}
    assert {r.json()["type"].rsplit("/", 1)[-1] for r in second} == {"shed"}
    # Refused before dispatch, not after a wait for the pool: a gate wait would last the 3 s
    # checkout bound and end as pool-saturated, not shed (20 requests took 1.04 s once on a
    # loaded 2-core machine, so the bound is the wait's, not a guess at this machine's speed).
    assert refused_in < 2.0
    refusals = guard.stats()["refusals"]
    door = refusals.get("inflight", {}).get("GET /report", 0) + refusals.get("shed", {}).get(
        "GET /report", 0
    )
    assert door >= 20
    # The healthy route kept being served, and nothing of it was refused.
    assert len(healthy) > 20 and set(healthy) == {200}
    assert all("GET /items/{item_id}" not in by for by in refusals.values())
    assert {r.status_code for r in first} <= {200, 503}


def test_admission_knows_when_the_pool_grows(
    make_guard: MakeGuard, sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the pool's own connections (its overflow for a burst) marks the pool as
    growing for one shedding interval, and admission tells the shedder so (which then
    sheds no normal work for the queue's delay: test_shedding); reusing a pooled
    connection does not. A 1 s interval keeps the test off this machine's timing."""
    interval = 1.0
    engine = sa.create_engine(sqlite_file_url, pool_size=1, max_overflow=1)
    guard = make_guard(engine, shed_interval=interval)
    seen: list[bool] = []
    shedder = guard._parts.shedder("default")
    decide = shedder.decide

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["growing"])
        return decide(*args, **kwargs)

    monkeypatch.setattr(shedder, "decide", spy)
    assert guard.admit("normal").admit
    with engine.connect(), engine.connect():  # the second one is the pool's overflow
        pass
    assert guard.admit("normal").admit
    time.sleep(interval)
    with engine.connect():  # a pooled connection: no growth
        pass
    assert guard.admit("normal").admit
    assert seen == [False, True, False]
