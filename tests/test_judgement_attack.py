"""A client cannot quarantine a healthy statement for everyone; a guilty one is still caught.

The attack (issue #9): with ``deadline_header`` on, requests carrying a deadline shorter than
a healthy statement's run time make that statement time out. Counted as the statement's
strikes, three of them quarantined it for every user for 30 s. A time-out counts towards
quarantine only when the statement ran for the limit the operator set (the guard's, a route
rule's or a budget's ``statement_timeout``), never when a deadline cut it short. Proved here
on PostgreSQL, MariaDB and SQLite, over HTTP (FastAPI ``def`` endpoint) and through
``guard.budget(deadline=...)``; the same guard still quarantines a statement that runs into
its own time-out after ``quarantine_threshold`` strikes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from poolguard import PoolGuardMiddleware, QueryQuarantined, QueryTimeout
from poolguard.errors import BudgetExceeded
from poolguard.integrations.asgi.middleware import RouteRule

MakeGuard = Callable[..., Any]

ATTACKS = 100
HEALTHY_SECONDS = 0.08
ATTACK_DEADLINE = 0.02


@dataclass
class Target:
    """One database: an engine, a healthy ~80 ms statement and a rogue that runs far longer
    (different statements, so different fingerprints)."""

    engine: sa.Engine
    healthy: sa.TextClause
    rogue: sa.TextClause
    #: The rogue's own statement time-out. MariaDB's is above a second: InnoDB waits at
    #: least 1 s for a lock, so a shorter time-out may have been a lock wait, which earns
    #: no strike (a lock holder's victims are not guilty).
    rogue_timeout: float = 0.05


def _sqlite_count_to(n: int) -> sa.TextClause:
    return sa.text(
        "with recursive c(x) as (select 1 union all select x + 1 from c where x < "
        f"{n}) select count(*) from c"
    )


def _sqlite_target(url: str) -> Target:
    engine = sa.create_engine(url, poolclass=sa.QueuePool, pool_size=2, max_overflow=0)
    # A recursive CTE counting to n: calibrated so that the healthy one takes ~80 ms here.
    n = 100_000
    with engine.connect() as c:
        for _ in range(12):
            t0 = time.perf_counter()
            c.execute(_sqlite_count_to(n)).scalar()
            took = time.perf_counter() - t0
            if took >= HEALTHY_SECONDS:
                break
            n = int(n * min(4.0, HEALTHY_SECONDS * 1.2 / max(took, 1e-4)))
    rogue = sa.text(
        "with recursive r(y) as (select 1 union all select y + 1 from r where y < "
        f"{n * 8}) select max(y) from r"
    )
    return Target(engine, _sqlite_count_to(n), rogue)


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def target(request: pytest.FixtureRequest, sqlite_file_url: str) -> Iterator[Target]:
    kind = request.param
    if kind == "postgresql":
        url = request.getfixturevalue("pg_url")
        t = Target(
            sa.create_engine(url, pool_size=2, max_overflow=0),
            sa.text(f"select pg_sleep({HEALTHY_SECONDS})"),
            sa.text("select 1 from pg_sleep(0.5)"),
        )
    elif kind == "mariadb":
        url = request.getfixturevalue("mariadb_url")
        t = Target(
            sa.create_engine(url, pool_size=2, max_overflow=0),
            sa.text(f"select sleep({HEALTHY_SECONDS})"),
            sa.text("select 1 from (select sleep(3) as s) as t"),
            rogue_timeout=2.0,
        )
    else:
        t = _sqlite_target(sqlite_file_url)
    yield t


def _app(guard: Any, t: Target) -> FastAPI:
    app = FastAPI()

    @app.get("/healthy")
    def healthy() -> dict[str, bool]:  # def: anyio's thread pool, as in most FastAPI apps
        with t.engine.connect() as c:
            c.execute(t.healthy).all()
        return {"ok": True}

    @app.get("/rogue")
    def rogue() -> dict[str, bool]:
        with t.engine.connect() as c:
            c.execute(t.rogue).all()
        return {"ok": True}  # pragma: no cover

    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        deadline_header="x-request-deadline",
        routes={"/rogue": RouteRule(statement_timeout=t.rogue_timeout)},
    )
    return app


def _problem(r: httpx.Response) -> str:
    return str(r.json()["type"]).rsplit("/", 1)[-1]


def test_a_short_deadline_header_never_quarantines_a_healthy_statement(
    make_guard: MakeGuard, target: Target
) -> None:
    guard = make_guard(target.engine)
    app = _app(guard, target)

    threshold = guard.config.quarantine.threshold

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    async def attack() -> tuple[list[httpx.Response], httpx.Response, list[dict[str, Any]]]:
        header = {"x-request-deadline": str(ATTACK_DEADLINE)}
        async with client() as c:
            attacks = [await c.get("/healthy", headers=header) for _ in range(ATTACKS)]
            ordinary = await c.get("/healthy")
        return attacks, ordinary, guard.quarantined()

    async def rogue() -> list[httpx.Response]:
        async with client() as c:
            return [await c.get("/rogue") for _ in range(threshold + 1)]

    attacks, ordinary, quarantined = asyncio.run(attack())
    # Every attack request ran out of its own deadline: 504, the client's problem only.
    assert {r.status_code for r in attacks} == {504}
    assert {_problem(r) for r in attacks} <= {"query-timeout", "budget-exceeded"}
    # ... and the statement is not quarantined: the next ordinary request is served.
    assert ordinary.status_code == 200, ordinary.text
    assert quarantined == []
    rogues = asyncio.run(rogue())
    # The rogue runs into its route's own statement time-out: strikes, then quarantine.
    assert [r.status_code for r in rogues] == [504] * threshold + [503]
    assert _problem(rogues[-1]) == "query-quarantined"
    (entry,) = guard.quarantined()
    assert "pg_sleep(0.08)" not in str(entry) and "sleep(0.08)" not in str(entry)
    # Refusals are counted by kind and route; the attack's time-outs are there, not strikes.
    refusals = guard.stats()["refusals"]
    assert refusals["quarantined"] == {"GET /rogue": 1}


def test_a_short_budget_deadline_never_quarantines_a_healthy_statement(
    make_guard: MakeGuard, target: Target
) -> None:
    guard = make_guard(target.engine)
    engine = target.engine
    cut = 0
    for _ in range(ATTACKS):
        with guard.budget(deadline=ATTACK_DEADLINE), engine.connect() as c:
            try:
                c.execute(target.healthy).all()
            except (QueryTimeout, BudgetExceeded):
                cut += 1
    assert cut == ATTACKS
    assert guard.quarantined() == []
    with engine.connect() as c:  # no budget: the guard's own 5 s statement time-out
        c.execute(target.healthy).all()
    # A budget's own statement time-out is the application's limit: its time-outs strike.
    threshold = guard.config.quarantine.threshold
    for _ in range(threshold):
        with guard.budget(statement_timeout=target.rogue_timeout), engine.connect() as c:
            with pytest.raises(QueryTimeout):
                c.execute(target.rogue).all()
    with guard.budget(statement_timeout=target.rogue_timeout), engine.connect() as c:
        with pytest.raises(QueryQuarantined):
            c.execute(target.rogue).all()
    assert len(guard.quarantined()) == 1
