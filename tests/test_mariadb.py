"""PoolGuard on a real MariaDB: max_statement_time per session, SET STATEMENT for a
tightened statement (no extra round trip, counted by the server's Questions counter),
pymysql and aiomysql."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import QueryTimeout

pytestmark = pytest.mark.mariadb
MakeGuard = Callable[..., Any]


def test_statement_timeout_is_enforced_by_the_server(
    make_guard: MakeGuard, mariadb_url: str
) -> None:
    engine = sa.create_engine(mariadb_url)
    make_guard(engine, statement_timeout=0.3)
    with engine.connect() as c:
        assert float(c.execute(sa.text("select @@max_statement_time")).scalar()) == 0.3
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text("select sleep(5)"))
        assert time.monotonic() - t0 < 2.0
        c.rollback()
        assert c.execute(sa.text("select 1")).scalar() == 1
    assert isinstance(ei.value, sa.exc.OperationalError)


def _questions(c: sa.Connection) -> int:
    return int(c.execute(sa.text("show session status like 'Questions'")).one()[1])


def test_no_extra_round_trip_even_when_tightened(make_guard: MakeGuard, mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=2.0)
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
        q0 = _questions(c)
        for i in range(50):
            c.execute(sa.text("select :x"), {"x": i})
        q1 = _questions(c)
    # 50 statements plus the SHOW that reads the counter: nothing else reached the server.
    assert q1 - q0 == 51
    with guard.budget(deadline=1.0), engine.connect() as c:
        q0 = _questions(c)
        for i in range(50):
            c.execute(sa.text("select :x"), {"x": i})
        q1 = _questions(c)
    assert q1 - q0 == 51


def test_deadline_tightens_a_single_statement(make_guard: MakeGuard, mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    guard = make_guard(engine, statement_timeout=5.0)
    with guard.budget(deadline=0.3), engine.connect() as c:
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout):
            c.execute(sa.text("select sleep(3)"))
        assert time.monotonic() - t0 < 1.5


async def test_aiomysql_timeout(make_guard: MakeGuard, mariadb_async_url: str) -> None:
    engine = create_async_engine(mariadb_async_url)
    make_guard(engine, statement_timeout=0.3)
    try:
        async with engine.connect() as c:
            with pytest.raises(QueryTimeout):
                await c.execute(sa.text("select sleep(5)"))
            await c.rollback()
            assert (await c.execute(sa.text("select 1"))).scalar() == 1
    finally:
        await engine.dispose()
