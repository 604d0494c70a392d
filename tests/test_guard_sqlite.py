"""PoolGuard on SQLite (sqlite3 and aiosqlite): installation, time-outs by interrupt, budgets
through a real engine, the gate in front of a real pool, leaks and dispose."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import (
    BudgetExceeded,
    PoolGuard,
    PoolGuardError,
    PoolSaturated,
    QueryQuarantined,
    QueryTimeout,
)

# Runs until interrupted: SQLite's recursive CTE with no bound.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"

MakeGuard = Callable[..., Any]


def file_engine(url: str, **kw: Any) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.QueuePool, **kw)


# -- construction --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"statement_timeout": 0}, "statement_timeout"),
        ({"statement_timeout": -1}, "statement_timeout"),
        ({"checkout_timeout": "1"}, "checkout_timeout"),
        ({"hold_timeout": float("nan")}, "hold_timeout"),
        ({"capacity": 0}, "capacity"),
        ({"partition_share": 1.5}, "partition_share"),
        ({"critical_reserve": 99}, "critical_reserve"),
        ({"trace_statements": "some"}, "trace_statements"),
        ({"pg_timeout_mode": "bouncer"}, "pg_timeout_mode"),
        ({"lock_timeout": 0}, "lock_timeout"),
        ({"blame_lock_holders": "yes"}, "blame_lock_holders"),
    ],
)
def test_wrong_option_fails_at_construction_naming_it(kwargs: dict, name: str) -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises((TypeError, ValueError), match=name):
        PoolGuard(engine, **kwargs)
    # A failed construction leaves nothing installed: a correct guard can follow.
    PoolGuard(engine).close()


def test_unknown_option_is_refused() -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(TypeError, match="stament_timeout"):
        PoolGuard(engine, stament_timeout=1.0)  # type: ignore[call-arg]


def test_not_an_engine_is_refused() -> None:
    with pytest.raises(TypeError, match="Engine"):
        PoolGuard("sqlite://")  # type: ignore[arg-type]


def test_second_guard_on_one_engine_is_refused(make_guard: MakeGuard) -> None:
    engine = sa.create_engine("sqlite://")
    make_guard(engine)
    with pytest.raises(RuntimeError, match="already has a PoolGuard"):
        PoolGuard(engine)


def _listener_counts(engine: sa.Engine) -> dict[str, int]:
    counts = {
        n: len(getattr(engine.dialect.dispatch, n))
        for n in ["do_execute", "do_executemany", "do_execute_no_params", "handle_error"]
    }
    for n in ["engine_disposed", "commit", "rollback"]:
        counts[n] = len(getattr(engine.dispatch, n))
    for n in ["connect", "checkin", "detach"]:
        counts["pool." + n] = len(getattr(engine.pool.dispatch, n))
    return counts


def test_close_removes_every_hook(sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url)
    before = _listener_counts(engine)
    guard = PoolGuard(engine)
    during = _listener_counts(engine)
    assert during != before
    assert "connect" in engine.pool.__dict__  # the gate is in front of the pool
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
    guard.close()
    guard.close()  # idempotent
    assert _listener_counts(engine) == before
    assert "connect" not in engine.pool.__dict__
    assert not guard._watchdog.alive
    PoolGuard(engine).close()  # and a new guard may be installed
    engine.dispose()


# -- time-outs -----------------------------------------------------------------------------
def test_sqlite_statement_past_its_timeout_raises_query_timeout(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = file_engine(sqlite_file_url)
    make_guard(engine, statement_timeout=0.2)
    t0 = time.monotonic()
    with engine.connect() as c, pytest.raises(QueryTimeout) as ei:
        c.execute(sa.text(ENDLESS))
    took = time.monotonic() - t0
    err = ei.value
    assert isinstance(err, sa.exc.OperationalError)
    assert isinstance(err, PoolGuardError)
    assert err.timeout == pytest.approx(0.2)
    assert 0.2 <= err.elapsed < 2.0
    assert took < 2.0
    assert len(err.fingerprint) == 16
    assert err.summary.upper().startswith("SELECT") or err.summary.upper().startswith("WITH")
    assert err.http_status == 504
    # The connection is healthy afterwards.
    with engine.connect() as c:
        assert c.execute(sa.text("select 41 + 1")).scalar() == 42


def test_interrupted_write_is_rolled_back(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url)
    with engine.begin() as c:
        c.execute(sa.text("create table t (x int)"))
    make_guard(engine, statement_timeout=0.2)
    with pytest.raises(QueryTimeout), engine.begin() as c:
        c.execute(sa.text("insert into t values (1)"))
        c.execute(sa.text(ENDLESS))
    with engine.connect() as c:
        assert c.execute(sa.text("select count(*) from t")).scalar() == 0
        # A later statement and its commit are not interrupted by the old deadline.
        time.sleep(0.3)
        c.execute(sa.text("insert into t values (2)"))
        c.commit()
        assert c.execute(sa.text("select count(*) from t")).scalar() == 1


def test_budget_deadline_shortens_the_statement_timeout(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine, statement_timeout=5.0)
    t0 = time.monotonic()
    with guard.budget(deadline=0.3), engine.connect() as c, pytest.raises(QueryTimeout) as ei:
        c.execute(sa.text(ENDLESS))
    assert time.monotonic() - t0 < 1.5
    assert ei.value.timeout <= 0.3


def test_no_statement_starts_past_the_deadline(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine)
    with guard.budget(deadline=0.05), engine.connect() as c:
        c.execute(sa.text("select 1"))
        time.sleep(0.08)
        with pytest.raises(BudgetExceeded) as ei:
            c.execute(sa.text("select 2"))
    assert ei.value.limit == "deadline"


def test_max_queries_through_an_engine(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine)
    with guard.budget(max_queries=3) as scope, engine.connect() as c:
        for i in range(3):
            c.execute(sa.text(f"select {i}"))
        with pytest.raises(BudgetExceeded, match="max_queries"):
            c.execute(sa.text("select 99"))
    assert scope.queries == 3
    assert scope.db_time > 0
    # The refused statement never ran, and the connection is fine.
    with engine.connect() as c:
        assert c.execute(sa.text("select 1")).scalar() == 1


def test_max_connections_through_an_engine(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine)
    with guard.budget(max_connections=1), engine.connect() as c:
        c.execute(sa.text("select 1"))
        with pytest.raises(BudgetExceeded, match="max_connections"):
            engine.connect()
    assert guard.gate.held == 0


# -- the gate ------------------------------------------------------------------------------
def test_exhausted_pool_fails_fast_with_pool_saturated(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = file_engine(sqlite_file_url, pool_size=1, max_overflow=0)
    make_guard(engine, checkout_timeout=0.15)
    with engine.connect() as held:
        held.execute(sa.text("select 1"))
        t0 = time.monotonic()
        with pytest.raises(PoolSaturated) as ei:
            engine.connect()
        waited = time.monotonic() - t0
    assert 0.1 <= waited < 1.0  # bounded by checkout_timeout, not SQLAlchemy's 30 s
    assert isinstance(ei.value, sa.exc.TimeoutError)
    assert ei.value.http_status == 503


def test_deadline_bounds_the_checkout_wait(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=5.0)
    with engine.connect():
        t0 = time.monotonic()
        with guard.budget(deadline=0.1), pytest.raises(PoolSaturated) as ei:
            engine.connect()
        assert time.monotonic() - t0 < 1.0
    assert ei.value.reason == "deadline"


def test_rogue_partition_cannot_starve_another(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url, pool_size=4, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=2.0, partition_share=0.5)
    stop = threading.Event()
    errors: list[BaseException] = []

    def rogue() -> None:
        try:
            with guard.budget(partition="rogue"), engine.connect() as c:
                c.execute(sa.text("select 1"))
                stop.wait(5)
        except PoolSaturated:
            pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rogue) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    snap = guard.gate.snapshot()
    # Work-conserving while nobody else waits: the rogue may take all but the critical
    # reserve (one of four)...
    assert snap.held_by_partition.get("rogue") == 3
    # ...but the healthy partition is served as soon as a rogue connection is returned,
    # ahead of the rogue waiters that queued earlier.
    got: list[int] = []

    def healthy() -> None:
        with guard.budget(partition="healthy"), engine.connect() as c:
            got.append(c.execute(sa.text("select 7")).scalar_one())

    h = threading.Thread(target=healthy)
    h.start()
    time.sleep(0.05)
    stop.set()
    h.join(5)
    for t in threads:
        t.join(5)
    assert got == [7]
    assert not errors


def test_hold_timeout_reports_a_leak_once(
    make_guard: MakeGuard, sqlite_file_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = file_engine(sqlite_file_url)
    alerts: list[Any] = []
    guard = make_guard(engine, hold_timeout=0.2, on_alert=alerts.append)
    caplog.set_level(logging.WARNING, logger="poolguard")
    assert alerts == []
    line = sys._getframe().f_lineno + 1
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
        time.sleep(1.0)
    leaks = [r for r in caplog.records if "hold_timeout" in r.getMessage()]
    assert len(leaks) == 1
    # It names where the connection was checked out: file, line and function.
    where = f"test_guard_sqlite.py:{line} in test_hold_timeout_reports_a_leak_once"
    assert where in leaks[0].getMessage()
    assert guard.stats()["leaks_reported"] == 1
    assert [a.kind for a in alerts] == ["leak"]


def test_dispose_while_connections_are_out(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    engine = file_engine(sqlite_file_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=0.2)
    c1 = engine.connect()
    c1.execute(sa.text("select 1"))
    engine.dispose()
    assert guard.gate.held == 1
    # The new pool is guarded too.
    with engine.connect() as c2:
        c2.execute(sa.text("select 2"))
        assert guard.gate.held == 2
    c1.close()
    assert guard.gate.held == 0


# -- quarantine ----------------------------------------------------------------------------
def test_statement_that_keeps_timing_out_is_quarantined(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = file_engine(sqlite_file_url)
    with engine.begin() as c:
        c.execute(sa.text("create table t (x int)"))
    alerts: list[Any] = []
    guard = make_guard(
        engine,
        statement_timeout=0.1,
        quarantine_threshold=3,
        quarantine_cooldown=30.0,
        on_alert=alerts.append,
    )
    for _ in range(3):
        with engine.connect() as c, pytest.raises(QueryTimeout):
            c.execute(sa.text(ENDLESS))
    with engine.connect() as c:
        c.execute(sa.text("insert into t values (1)"))
        t0 = time.monotonic()
        with pytest.raises(QueryQuarantined) as ei:
            c.execute(sa.text(ENDLESS))
        assert time.monotonic() - t0 < 0.05  # refused without touching the database
        # The refusal did not roll the transaction back.
        assert c.execute(sa.text("select count(*) from t")).scalar() == 1
        c.commit()
    assert ei.value.retry_after > 0
    assert [q["fingerprint"] for q in guard.quarantined()] == [ei.value.fingerprint]
    assert "quarantine_opened" in [a.kind for a in alerts]
    assert guard.release(ei.value.fingerprint)
    assert guard.quarantined() == []


def test_stats_snapshot_is_json_and_worst_first(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    import json

    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine, statement_timeout=0.1)
    with engine.connect() as c:
        for i in range(5):
            c.execute(sa.text(f"select {i}, 'zebra-secret'"))
        with pytest.raises(QueryTimeout):
            c.execute(sa.text(ENDLESS))
    snap = json.loads(json.dumps(guard.stats()))
    rows = snap["statements"]
    assert rows[0]["timeouts"] == 1
    cheap = next(r for r in rows if r["count"] == 5)
    assert "zebra" not in json.dumps(snap)  # literals never reach the stats
    assert cheap["summary"].upper().startswith("SELECT")


# -- async (aiosqlite) ---------------------------------------------------------------------
async def test_aiosqlite_timeout_and_gate(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    url = sqlite_file_url.replace("sqlite://", "sqlite+aiosqlite://")
    engine = create_async_engine(
        url, poolclass=sa.AsyncAdaptedQueuePool, pool_size=1, max_overflow=0
    )
    make_guard(engine, statement_timeout=0.2, checkout_timeout=0.2)
    try:
        async with engine.connect() as c:
            with pytest.raises(QueryTimeout):
                await c.execute(sa.text(ENDLESS))
            assert (await c.execute(sa.text("select 5"))).scalar() == 5
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tk = asyncio.create_task(ticker())
            with pytest.raises(PoolSaturated):
                async with engine.connect():
                    pass
            tk.cancel()
            assert ticks >= 5  # the wait for a connection did not block the event loop
    finally:
        await engine.dispose()


async def test_async_waiter_cancelled_gives_its_place_back(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    url = sqlite_file_url.replace("sqlite://", "sqlite+aiosqlite://")
    engine = create_async_engine(
        url, poolclass=sa.AsyncAdaptedQueuePool, pool_size=1, max_overflow=0
    )
    guard = make_guard(engine, checkout_timeout=5.0)
    try:
        async with engine.connect() as c:
            await c.execute(sa.text("select 1"))

            async def want() -> None:
                async with engine.connect() as c2:
                    await c2.execute(sa.text("select 2"))

            task = asyncio.create_task(want())
            await asyncio.sleep(0.05)
            assert guard.gate.waiting == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert guard.gate.waiting == 0
        async with engine.connect() as c:
            assert (await c.execute(sa.text("select 3"))).scalar() == 3
    finally:
        await engine.dispose()


def test_listeners_are_on_the_sync_engine_of_an_async_engine(make_guard: MakeGuard) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    guard = make_guard(engine)
    assert guard.sync_engine is engine.sync_engine
    assert event.contains(engine.sync_engine, "do_execute", guard._statements.on_do_execute)


def test_guard_does_not_switch_on_connection_events(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    """Any Connection-level listener makes SQLAlchemy run its event plumbing on every
    execute; the guard's hooks are all pool and dialect events."""
    engine = file_engine(sqlite_file_url)
    make_guard(engine)
    assert engine._has_events is False
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
    assert engine._has_events is False


@pytest.mark.parametrize("poolclass", [sa.pool.SingletonThreadPool, sa.pool.StaticPool])
def test_pools_that_share_one_connection_leak_no_slot(
    make_guard: MakeGuard, poolclass: Any
) -> None:
    engine = sa.create_engine("sqlite://", poolclass=poolclass)
    guard = make_guard(engine)
    outer = engine.connect()
    for _ in range(50):  # more than the gate's capacity, overlapping the outer checkout
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
    # One slot at most: StaticPool returns its one record on every close, so the first
    # inner close already ends the outer hold (an undercount, never a leak).
    assert guard.gate.held <= 1
    outer.close()
    assert guard.gate.held == 0


def test_tightened_timeout_still_earns_a_quarantine_strike(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    """A budget's statement time-out below lock_timeout still proves the statement ran too
    long on SQLite (an interrupt never fires in a lock wait), so it counts."""
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine, statement_timeout=2.0, quarantine_threshold=1)
    with guard.budget(statement_timeout=0.2), engine.connect() as c:
        with pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text(ENDLESS))
    assert ei.value.cause == "statement"
    assert [q["fingerprint"] for q in guard.quarantined()] == [ei.value.fingerprint]


def _hold_write_lock(url: str) -> sqlite3.Connection:
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS lk (n INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO lk VALUES (1)")
    return holder


@pytest.mark.parametrize(("budget", "lock_wait"), [(None, 0.5), (0.3, 0.15)])
def test_lock_wait_is_bounded_and_no_strike(
    make_guard: MakeGuard, sqlite_file_url: str, budget: float | None, lock_wait: float
) -> None:
    """A writer blocked by another connection's write lock waits lock_timeout (the busy
    timeout: 5 s by the driver's default), or half its deadline when that is shorter; it
    fails as a lock wait, earns no quarantine strike, and leaves the pool as it was."""
    engine = file_engine(sqlite_file_url)
    guard = make_guard(engine, statement_timeout=1.0, quarantine_threshold=1)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE lk (n INTEGER)"))
    holder = _hold_write_lock(sqlite_file_url)
    try:
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei, guard.budget(deadline=budget), engine.begin() as c:
            c.execute(sa.text("INSERT INTO lk VALUES (2)"))
        waited = time.monotonic() - t0
    finally:
        holder.rollback()
        holder.close()
    assert ei.value.cause == "lock"
    # Half the time left when the statement started (the deadline ticks during checkout).
    assert lock_wait - 0.1 <= ei.value.timeout <= lock_wait
    assert ei.value.timeout * 0.9 <= waited < lock_wait + 0.5
    assert guard.quarantined() == []
    with engine.begin() as c:  # the lock is gone: the same statement goes through
        c.execute(sa.text("INSERT INTO lk VALUES (3)"))
        assert c.execute(sa.text("SELECT count(*) FROM lk")).scalar() == 1


async def test_aiosqlite_lock_wait_is_bounded(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    """The busy timeout is set on aiosqlite's own thread too, and lowered under a deadline."""
    url = sqlite_file_url.replace("sqlite://", "sqlite+aiosqlite://")
    engine = create_async_engine(url, poolclass=sa.AsyncAdaptedQueuePool)
    guard = make_guard(engine, statement_timeout=1.0)
    try:
        async with engine.begin() as c:
            await c.execute(sa.text("CREATE TABLE lk (n INTEGER)"))
        holder = _hold_write_lock(sqlite_file_url)
        try:
            for budget, lock_wait in [(None, 0.5), (0.3, 0.15)]:
                with pytest.raises(QueryTimeout) as ei:
                    with guard.budget(deadline=budget):
                        async with engine.begin() as c:
                            await c.execute(sa.text("INSERT INTO lk VALUES (2)"))
                assert ei.value.cause == "lock"
                assert lock_wait - 0.1 <= ei.value.timeout <= lock_wait
                assert ei.value.elapsed < lock_wait + 0.5
        finally:
            holder.rollback()
            holder.close()
        assert guard.quarantined() == []
    finally:
        await engine.dispose()


def test_blame_is_off_where_the_server_cannot_name_a_blocker(make_guard: MakeGuard) -> None:
    """SQLite has no pg_blocking_pids: the option is accepted and does nothing."""
    guard = make_guard(sa.create_engine("sqlite://"), blame_lock_holders=True)
    assert guard.blame_lock_holders is False
    assert guard.stats()["lock_holders_blamed"] == 0
