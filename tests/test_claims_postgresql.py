"""Claims the docs make about PostgreSQL that had no test of their own, each proven through a
real guard on a real server: ``idle_in_transaction_timeout`` (the server ends an idle
transaction), ``quarantine_allow`` and ``release(sql)``, a connection pooled before the guard
was installed, and async psycopg 3 (``postgresql+psycopg`` with ``create_async_engine``):
time-out, budget, quarantine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import BudgetExceeded, PoolGuard, QueryQuarantined, QueryTimeout
from poolguard.observe.alerts import Alert

pytestmark = pytest.mark.postgresql
MakeGuard = Callable[..., PoolGuard]

SLOW = "select pg_sleep(5)"


def _session_alive(pg_url: str, pid: int) -> bool:
    eng = sa.create_engine(pg_url, poolclass=sa.NullPool)
    try:
        with eng.connect() as c:
            n = c.execute(
                sa.text("select count(*) from pg_stat_activity where pid = :p"), {"p": pid}
            ).scalar_one()
            return bool(n)
    finally:
        eng.dispose()


def _wait_session_gone(pg_url: str, pid: int, within: float = 15.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _session_alive(pg_url, pid):
            return True
        time.sleep(0.05)
    return False


# -- idle_in_transaction_timeout ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_idle_transaction_is_ended_by_the_server(
    make_guard: MakeGuard, pg_url: str, mode: str
) -> None:
    """A request that opens a transaction and then sits on it (waiting on a remote call, a
    forgotten commit) holds its locks until the server ends it: the session is terminated,
    the application's next statement fails as a disconnect, and the pool recovers."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, idle_in_transaction_timeout=0.3, pg_timeout_mode=mode)
    with engine.connect() as c:
        c.begin()
        pid = c.execute(sa.text("select pg_backend_pid()")).scalar_one()
        assert _wait_session_gone(pg_url, pid), "the server kept the idle transaction"
        with pytest.raises(sa.exc.DBAPIError) as ei:
            c.execute(sa.text("select 1"))
        assert ei.value.connection_invalidated
    with engine.connect() as c:  # the pool replaced the terminated connection
        assert c.execute(sa.text("select pg_backend_pid()")).scalar_one() != pid
    assert guard.checked_out == 0


def test_idle_outside_a_transaction_is_left_alone(make_guard: MakeGuard, pg_url: str) -> None:
    """Only an idle *transaction* is ended: a pooled connection idle between requests is not."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    make_guard(engine, idle_in_transaction_timeout=0.2)
    with engine.connect() as c:
        pid = c.execute(sa.text("select pg_backend_pid()")).scalar_one()
        c.commit()
        time.sleep(0.5)
        assert c.execute(sa.text("select pg_backend_pid()")).scalar_one() == pid


# -- quarantine_allow and release(sql) ------------------------------------------------------
def test_allowed_statement_is_never_quarantined(make_guard: MakeGuard, pg_url: str) -> None:
    """A report that is known to be slow, allowed by its SQL text (literals do not matter):
    it keeps timing out and keeps being tried; another statement is quarantined at once."""
    engine = sa.create_engine(pg_url, pool_size=2)
    guard = make_guard(
        engine,
        statement_timeout=0.2,
        quarantine_threshold=1,
        quarantine_allow=["select pg_sleep(100)"],
    )
    for _ in range(3):
        with pytest.raises(QueryTimeout), engine.connect() as c:
            c.execute(sa.text(SLOW))
    assert guard.quarantined() == []
    other = "select pg_sleep(5), 'other'"
    with pytest.raises(QueryTimeout), engine.connect() as c:
        c.execute(sa.text(other))
    with pytest.raises(QueryQuarantined), engine.connect() as c:
        c.execute(sa.text(other))


def test_release_by_sql_lets_the_statement_run_again(make_guard: MakeGuard, pg_url: str) -> None:
    alerts: list[Alert] = []
    engine = sa.create_engine(pg_url, pool_size=2)
    guard = make_guard(
        engine,
        statement_timeout=0.2,
        quarantine_threshold=1,
        quarantine_cooldown=600.0,
        on_alert=alerts.append,
    )
    with pytest.raises(QueryTimeout) as timed_out, engine.connect() as c:
        c.execute(sa.text(SLOW))
    with pytest.raises(QueryQuarantined), engine.connect() as c:
        c.execute(sa.text("select pg_sleep(0)"))  # same fingerprint: refused without running
    assert [q["fingerprint"] for q in guard.quarantined()] == [timed_out.value.fingerprint]
    # Released by its SQL text, with other literals than the one that was quarantined.
    assert guard.release("SELECT pg_sleep(1)") is True
    assert guard.quarantined() == []
    with engine.connect() as c:
        c.execute(sa.text("select pg_sleep(0)"))  # runs again
    assert guard.release("SELECT pg_sleep(1)") is False  # nothing left to release
    kinds = [a.kind for a in alerts]
    assert kinds == ["quarantine_opened", "quarantine_closed"]


# -- a connection pooled before the guard ---------------------------------------------------
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_connection_pooled_before_the_guard_gets_the_timeout(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    engine = sa.create_engine(pg_url.replace("+psycopg", f"+{driver}"), pool_size=1)
    with engine.connect() as c:  # pooled before the guard exists
        pid = c.execute(sa.text("select pg_backend_pid()")).scalar_one()
        assert c.execute(sa.text("show statement_timeout")).scalar_one() == "0"
    make_guard(engine, statement_timeout=0.3)
    with engine.connect() as c:
        assert c.execute(sa.text("select pg_backend_pid()")).scalar_one() == pid  # the same one
        assert c.execute(sa.text("show statement_timeout")).scalar_one() == "300ms"
        with pytest.raises(QueryTimeout):
            c.execute(sa.text(SLOW))


# -- async psycopg 3 --------------------------------------------------------------------------
def _async_psycopg(pg_url: str) -> Any:
    assert pg_url.startswith("postgresql+psycopg://")
    return create_async_engine(pg_url, pool_size=2, max_overflow=0)


async def test_async_psycopg_statement_timeout(make_guard: MakeGuard, pg_url: str) -> None:
    engine = _async_psycopg(pg_url)
    try:
        make_guard(engine, statement_timeout=0.3)
        async with engine.connect() as c:
            assert (await c.execute(sa.text("show statement_timeout"))).scalar_one() == "300ms"
            t0 = time.monotonic()
            with pytest.raises(QueryTimeout) as ei:
                await c.execute(sa.text(SLOW))
            assert time.monotonic() - t0 < 4.0
            await c.rollback()
            assert (await c.execute(sa.text("select 1"))).scalar_one() == 1
        assert ei.value.cause == "statement"
        assert isinstance(ei.value, sa.exc.OperationalError)
    finally:
        await engine.dispose()


async def test_async_psycopg_budget(make_guard: MakeGuard, pg_url: str) -> None:
    engine = _async_psycopg(pg_url)
    try:
        guard = make_guard(engine, statement_timeout=5.0)
        async with guard.budget(max_queries=2):
            async with engine.connect() as c:
                await c.execute(sa.text("select 1"))
                await c.execute(sa.text("select 2"))
                with pytest.raises(BudgetExceeded):
                    await c.execute(sa.text("select 3"))
        # A deadline caps the statement's time-out on the server.
        async with guard.budget(deadline=0.4):
            async with engine.connect() as c:
                with pytest.raises(QueryTimeout) as ei:
                    await c.execute(sa.text(SLOW))
        assert ei.value.timeout <= 0.4
    finally:
        await engine.dispose()


async def test_async_psycopg_quarantine(make_guard: MakeGuard, pg_url: str) -> None:
    engine = _async_psycopg(pg_url)
    try:
        guard = make_guard(engine, statement_timeout=0.2, quarantine_threshold=2)
        for _ in range(2):
            async with engine.connect() as c:
                with pytest.raises(QueryTimeout):
                    await c.execute(sa.text(SLOW))
        async with engine.connect() as c:
            with pytest.raises(QueryQuarantined) as ei:  # refused before it runs
                await c.execute(sa.text(SLOW))
        assert ei.value.retry_after is not None and ei.value.retry_after > 0
        assert len(guard.quarantined()) == 1
    finally:
        await engine.dispose()
