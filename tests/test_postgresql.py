"""PoolGuard on a real PostgreSQL: server-side time-outs for psycopg 3, psycopg2 and asyncpg,
no extra round trip in the steady state (counted on the server), and the faults: a backend
killed mid-statement, a server restart under load, cancellation at await points."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import BudgetExceeded, PoolSaturated, QueryQuarantined, QueryTimeout

pytestmark = pytest.mark.postgresql
MakeGuard = Callable[..., Any]
HotRow = Callable[[sa.Engine, str], None]
QueuedWriters = Callable[[sa.Engine, str, int, float, list[BaseException]], threading.Thread]

SYNC_DRIVERS = ["psycopg", "psycopg2"]


def sync_url(pg_url: str, driver: str) -> str:
    return pg_url.replace("+psycopg", f"+{driver}")


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_statement_timeout_is_enforced_by_the_server(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=2)
    make_guard(engine, statement_timeout=0.3)
    with engine.connect() as c:
        assert c.execute(sa.text("show statement_timeout")).scalar() == "300ms"
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text("select pg_sleep(5)"))
        assert time.monotonic() - t0 < 2.0
        c.rollback()
        # Healthy afterwards, on the same connection.
        assert c.execute(sa.text("select 1")).scalar() == 1
    err = ei.value
    assert isinstance(err, sa.exc.OperationalError)
    assert err.timeout == pytest.approx(0.3)
    assert err.elapsed >= 0.25
    assert "pg_sleep" in err.summary.lower() or err.summary.upper().startswith("SELECT")
    assert "5" not in str(err.statement)  # the literal-free form stands in for the SQL


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_timed_out_transaction_is_rolled_back(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    engine = sa.create_engine(sync_url(pg_url, driver))
    with engine.begin() as c:
        c.execute(sa.text("drop table if exists pg_rollback_t"))
        c.execute(sa.text("create table pg_rollback_t (x int)"))
    make_guard(engine, statement_timeout=0.2)
    try:
        with pytest.raises(QueryTimeout), engine.begin() as c:
            c.execute(sa.text("insert into pg_rollback_t values (1)"))
            c.execute(sa.text("select pg_sleep(3)"))
        with engine.connect() as c:
            assert c.execute(sa.text("select count(*) from pg_rollback_t")).scalar() == 0
    finally:
        with engine.begin() as c:
            c.execute(sa.text("drop table pg_rollback_t"))


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_deadline_tightens_with_set_local_and_reverts(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=5.0)
    with guard.budget(deadline=0.4), engine.connect() as c:
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text("select pg_sleep(3)"))
        assert time.monotonic() - t0 < 1.5
        assert ei.value.timeout <= 0.4
    with engine.connect() as c:  # same pooled connection: the default is back
        assert c.execute(sa.text("show statement_timeout")).scalar() == "5s"


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_transaction_mode_sets_timeout_per_transaction(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    engine = sa.create_engine(sync_url(pg_url, driver))
    make_guard(engine, statement_timeout=0.25, pg_timeout_mode="transaction")
    with engine.connect() as c:
        with pytest.raises(QueryTimeout):
            c.execute(sa.text("select pg_sleep(3)"))
        c.rollback()
        # Every transaction gets its transaction-local settings, lock_timeout too...
        assert c.execute(sa.text("show statement_timeout")).scalar() == "250ms"
        assert c.execute(sa.text("show lock_timeout")).scalar() == "125ms"
        c.rollback()
        # ...and nothing is set at session level (PgBouncer would leak it to other clients):
        # a statement that bypasses SQLAlchemy sees the server's default.
        cur = c.connection.dbapi_connection.cursor()
        cur.execute("show statement_timeout")
        assert cur.fetchone()[0] != "250ms"
        cur.close()
        c.rollback()


def test_no_extra_round_trip_in_the_steady_state(make_guard: MakeGuard, pg_cluster: Any) -> None:
    """Counted by the server (pg_stat_statements): 200 statements, one SET per connection."""
    admin = sa.create_engine(pg_cluster.url, poolclass=sa.NullPool)
    engine = sa.create_engine(pg_cluster.url, pool_size=2, max_overflow=0)
    with admin.begin() as c:
        c.execute(sa.text("select pg_stat_statements_reset()"))
    guard = make_guard(engine, statement_timeout=2.0)
    for i in range(100):
        with engine.connect() as c:
            c.execute(sa.text("select :x + 1"), {"x": i})
    with guard.budget(deadline=30.0), engine.connect() as c:  # deadline far above the default
        for i in range(100):
            c.execute(sa.text("select :x + 2"), {"x": i})
    with admin.connect() as c:
        rows = c.execute(
            sa.text(
                "select query, calls from pg_stat_statements "
                "where query ilike 'set %' or query ilike '%set_config%' "
                "or query ilike 'select $1 +%'"
            )
        ).all()
    calls = dict(rows)
    sets = sum(n for q, n in calls.items() if "set" in q.lower().split("(")[0])
    selects = sum(n for q, n in calls.items() if q.lower().startswith("select $1"))
    assert selects == 200
    # One connection was ever opened: its settings went out once, in one statement.
    assert sets == 1, calls
    admin.dispose()


def test_near_deadline_set_local_is_not_repeated_per_statement(
    make_guard: MakeGuard, pg_cluster: Any
) -> None:
    admin = sa.create_engine(pg_cluster.url, poolclass=sa.NullPool)
    engine = sa.create_engine(pg_cluster.url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=5.0)
    with engine.connect() as c:
        c.execute(sa.text("select 1"))  # the connection exists: its SET is done
    with admin.begin() as c:
        c.execute(sa.text("select pg_stat_statements_reset()"))
    with guard.budget(deadline=2.0), engine.connect() as c:
        for i in range(50):
            c.execute(sa.text("select :x + 3"), {"x": i})
    with admin.connect() as c:
        sets = c.execute(
            sa.text(
                "select coalesce(sum(calls), 0) from pg_stat_statements "
                "where query ilike '%set_config%'"
            )
        ).scalar()
    # 50 statements in one transaction under a 2 s deadline: the value set serves a band of
    # remaining time, so SET LOCAL goes out a handful of times at most, not 50.
    assert 1 <= sets <= 5
    admin.dispose()


def test_backend_killed_mid_statement_leaks_nothing(make_guard: MakeGuard, pg_url: str) -> None:
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine, statement_timeout=10.0)
    admin = sa.create_engine(pg_url, poolclass=sa.NullPool)
    errors: list[BaseException] = []
    pid: list[int] = []

    def victim() -> None:
        try:
            with engine.connect() as c:
                pid.append(c.execute(sa.text("select pg_backend_pid()")).scalar_one())
                c.execute(sa.text("select pg_sleep(8)"))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=victim)
    t.start()
    while not pid:
        time.sleep(0.01)
    time.sleep(0.2)
    with admin.connect() as c:
        c.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid[0]})
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], sa.exc.OperationalError)
    assert not isinstance(errors[0], QueryTimeout)  # a kill is not a time-out
    assert guard.gate.held == 0
    with engine.connect() as c:  # the pool recovers
        assert c.execute(sa.text("select 1")).scalar() == 1
    admin.dispose()


def test_server_restart_under_load_leaks_nothing(make_guard: MakeGuard, pg_cluster: Any) -> None:
    engine = sa.create_engine(pg_cluster.url, pool_size=3, max_overflow=0, pool_pre_ping=True)
    guard = make_guard(engine, statement_timeout=2.0, checkout_timeout=0.5)
    stop = threading.Event()
    outcomes: dict[str, int] = {"ok": 0, "err": 0}
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            try:
                with engine.connect() as c:
                    c.execute(sa.text("select pg_sleep(0.01)"))
                key = "ok"
            except (
                sa.exc.OperationalError,
                sa.exc.InterfaceError,
                sa.exc.DBAPIError,
                PoolSaturated,
            ):
                key = "err"
                time.sleep(0.02)
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    pg_cluster.restart()
    time.sleep(0.5)
    before = outcomes["ok"]
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert outcomes["ok"] > before  # it serves again after the restart
    assert guard.gate.held == 0


def test_dispose_while_connections_are_out(make_guard: MakeGuard, pg_url: str) -> None:
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine)
    c1 = engine.connect()
    c1.execute(sa.text("select 1"))
    engine.dispose()
    with engine.connect() as c2:
        assert c2.execute(sa.text("show statement_timeout")).scalar() == "5s"
    assert guard.gate.held == 1
    c1.close()


# -- asyncpg -------------------------------------------------------------------------------
async def test_asyncpg_statement_timeout(make_guard: MakeGuard, pg_async_url: str) -> None:
    engine = create_async_engine(pg_async_url, pool_size=2)
    guard = make_guard(engine, statement_timeout=0.3)
    try:
        async with engine.connect() as c:
            assert (await c.execute(sa.text("show statement_timeout"))).scalar() == "300ms"
            with pytest.raises(QueryTimeout):
                await c.execute(sa.text("select pg_sleep(5)"))
            await c.rollback()
            assert (await c.execute(sa.text("select 1"))).scalar() == 1
        async with guard.budget(deadline=0.25), engine.connect() as c:
            with pytest.raises(QueryTimeout) as ei:
                await c.execute(sa.text("select pg_sleep(5)"))
            assert ei.value.timeout <= 0.25
    finally:
        await engine.dispose()


async def test_asyncpg_cancellation_at_every_await_point(
    make_guard: MakeGuard, pg_async_url: str
) -> None:
    engine = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=5.0, checkout_timeout=5.0)

    async def work() -> None:
        async with engine.connect() as c:
            await c.execute(sa.text("select pg_sleep(0.05)"))
            await c.execute(sa.text("select pg_sleep(2)"))

    try:
        # Cancel at increasing delays: during connect, the first statement, the second.
        for delay in (0.0, 0.001, 0.01, 0.03, 0.1, 0.3):
            task = asyncio.create_task(work())
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert guard.gate.held == 0, f"slot held after cancel at {delay}"
        # A waiter for the gate, cancelled, leaves nothing either.
        async with engine.connect() as c:
            await c.execute(sa.text("select 1"))
            task = asyncio.create_task(work())
            await asyncio.sleep(0.05)
            assert guard.gate.waiting == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with engine.connect() as c:
            assert (await c.execute(sa.text("select 1"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_asyncpg_budget_max_queries(make_guard: MakeGuard, pg_async_url: str) -> None:
    engine = create_async_engine(pg_async_url)
    guard = make_guard(engine)
    try:
        async with guard.budget(max_queries=2), engine.connect() as c:
            await c.execute(sa.text("select 1"))
            await c.execute(sa.text("select 2"))
            with pytest.raises(BudgetExceeded):
                await c.execute(sa.text("select 3"))
    finally:
        await engine.dispose()


def test_reclaimed_leak_frees_its_locks(
    hot_row: HotRow, make_guard: MakeGuard, pg_url: str
) -> None:
    """A connection leaked inside a transaction holds row locks; reclaiming it ends the
    server session, so writers of that row are served again while the leaker still holds
    its (now dead) connection."""
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0)
    hot_row(engine, "pg_leak_t")
    guard = make_guard(engine, hold_timeout=0.3, reclaim_leaked=True, statement_timeout=5.0)
    leaked = engine.connect()
    leaked.execute(sa.text("update pg_leak_t set n = n + 1 where id = 1"))  # row lock held
    time.sleep(1.5)  # the watchdog reports and reclaims it
    assert guard.stats()["leaks_reported"] == 1
    with engine.connect() as c:
        c.execute(sa.text("set local lock_timeout = 1000"))
        c.execute(sa.text("update pg_leak_t set n = n + 10 where id = 1"))
        c.commit()
        assert c.execute(sa.text("select n from pg_leak_t")).scalar() == 10  # leak rolled back
    with pytest.raises(sa.exc.DBAPIError):
        leaked.execute(sa.text("select 1"))  # the leaker finds its connection gone
    leaked.close()


def test_lock_holder_is_quarantined_and_its_victims_are_not(
    hot_row: HotRow, make_guard: MakeGuard, pg_url: str
) -> None:
    """A rogue transaction holds a row lock in a long statement; writers of that row time out
    on the lock (lock_timeout, shorter than statement_timeout by default) and are never
    quarantined, while the rogue statement is, after three time-outs."""
    engine = sa.create_engine(pg_url, pool_size=4, max_overflow=0)
    hot_row(engine, "pg_lock_t")
    guard = make_guard(engine, statement_timeout=1.0, quarantine_threshold=3)
    assert guard.lock_timeout == pytest.approx(0.5)
    assert guard.blame_lock_holders  # but one victim at a time: nobody left waiting to ask about
    warm = [engine.connect() for _ in range(3)]  # victims start waiting at once, no connect
    for w in warm:
        w.close()
    victims: list[BaseException] = []

    def rogue(then: Callable[[], None] = lambda: None) -> None:
        with engine.begin() as c:
            c.execute(sa.text("update pg_lock_t set n = n + 1 where id = 1"))
            then()  # the lock is held from here on
            c.execute(sa.text("select pg_sleep(5)"))

    def victim() -> None:
        try:
            with engine.begin() as c:
                c.execute(sa.text("update pg_lock_t set n = n + 100 where id = 1"))
        except QueryTimeout as e:
            victims.append(e)

    for _ in range(3):
        t = threading.Thread(target=victim)
        with pytest.raises(QueryTimeout) as ei:
            rogue(then=t.start)
        t.join(5)
        assert ei.value.cause == "statement"
    assert victims and all(v.cause == "lock" for v in victims)
    quarantined = guard.quarantined()
    assert [q["summary"] for q in quarantined] == [ei.value.summary]
    with pytest.raises(QueryQuarantined):
        rogue()
    victim()  # the lock is gone at once: writers are served again
    assert len(victims) == 3


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_server_side_cursor_under_a_tightened_budget(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    """stream_results and yield_per use a named cursor, which runs only the statement it
    declares: the transaction-local settings must go out on a cursor of their own."""
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=5.0)
    with engine.connect() as c:
        shown = c.execute(sa.text("show statement_timeout")).scalar()
        assert shown == "5s"
    with guard.budget(deadline=2.0), engine.connect() as c:
        rows = c.execute(sa.text("select generate_series(1, 10)").execution_options(yield_per=3))
        assert sum(r[0] for r in rows) == 55
        assert 1500 <= int(c.execute(sa.text("show statement_timeout")).scalar()[:-2]) <= 2000


async def test_asyncpg_server_side_cursor_under_a_tightened_budget(
    make_guard: MakeGuard, pg_async_url: str
) -> None:
    engine = create_async_engine(pg_async_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine, statement_timeout=5.0)
    try:
        async with guard.budget(deadline=2.0), engine.connect() as c:
            result = await c.stream(sa.text("select generate_series(1, 10)"))
            assert sum([r[0] async for r in result]) == 55
    finally:
        await engine.dispose()


def test_lock_victim_under_a_nearly_spent_deadline_fails_as_a_lock_wait(
    hot_row: HotRow, make_guard: MakeGuard, pg_url: str
) -> None:
    """A deadline cuts the victim's statement time-out below lock_timeout; lock_timeout
    comes down with it, so the victim still fails as a lock wait and earns no strike."""
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0)
    hot_row(engine, "pg_lock_v")
    guard = make_guard(engine, statement_timeout=5.0, quarantine_threshold=1)
    assert guard.lock_timeout == pytest.approx(1.0)  # "auto": min(1 s, statement_timeout / 2)
    with engine.begin() as holder:
        holder.execute(sa.text("update pg_lock_v set n = 1 where id = 1"))
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei, guard.budget(deadline=0.4):
            with engine.begin() as c:
                c.execute(sa.text("update pg_lock_v set n = 2 where id = 1"))
        waited = time.monotonic() - t0
    assert ei.value.cause == "lock"
    # Half the time left when the statement started (the deadline ticks during checkout).
    assert 0.1 <= ei.value.timeout <= 0.2
    assert ei.value.timeout * 0.9 <= waited < 0.7
    assert guard.quarantined() == []
    with engine.connect() as c:  # the pooled connection is back at the session defaults
        assert c.execute(sa.text("show lock_timeout")).scalar() == "1s"


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_lock_holder_is_blamed_by_its_queued_victims(
    hot_row: HotRow, queued_writers: QueuedWriters, make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    """Writers queue behind a transaction that holds their row and runs a long statement;
    each lock wait that ends while others still wait names the blocker, and its running
    statement takes the strike: quarantined within its first run, before its own time-out."""
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=8, max_overflow=0)
    hot_row(engine, "pg_blame_t")
    guard = make_guard(engine, statement_timeout=3.0, quarantine_threshold=3, partition_share=1.0)
    assert guard.lock_timeout == pytest.approx(1.0)  # "auto": min(1 s, statement_timeout / 2)
    errors: list[BaseException] = []
    with engine.begin() as rogue:
        rogue.execute(sa.text("update pg_blame_t set n = 1 where id = 1"))
        # PostgreSQL's lock_timeout counts each lock a statement waits for: the first
        # writer waits for the rogue's transaction, the next ones first for the row's
        # tuple lock that it holds, then anew. So some writers fail while others wait,
        # and some outlive the rogue.
        starter = queued_writers(engine, "pg_blame_t", 6, 0.25, errors)
        with pytest.raises(QueryTimeout) as ei:
            rogue.execute(sa.text("select pg_sleep(5)"))
    starter.join(15)
    assert len(errors) >= 3, errors
    assert all(isinstance(e, QueryTimeout) and e.cause == "lock" for e in errors), errors
    assert guard.stats()["lock_holders_blamed"] >= 3
    quarantined = guard.quarantined()
    assert [q["fingerprint"] for q in quarantined] == [ei.value.fingerprint]
    with pytest.raises(QueryQuarantined), engine.begin() as rogue:
        rogue.execute(sa.text("update pg_blame_t set n = 2 where id = 1"))
        rogue.execute(sa.text("select pg_sleep(5)"))
    with engine.begin() as c:  # refused at once, its transaction rolled back: writers pass
        c.execute(sa.text("update pg_blame_t set n = n + 1 where id = 1"))
        # Writers that outlived the rogue added 100 each; neither rogue's write stayed.
        assert c.execute(sa.text("select n from pg_blame_t")).scalar() % 100 == 1


def test_blame_can_be_turned_off(
    hot_row: HotRow, queued_writers: QueuedWriters, make_guard: MakeGuard, pg_url: str
) -> None:
    engine = sa.create_engine(pg_url, pool_size=8, max_overflow=0)
    hot_row(engine, "pg_blame_off")
    guard = make_guard(
        engine,
        statement_timeout=3.0,
        quarantine_threshold=3,
        partition_share=1.0,
        blame_lock_holders=False,
    )
    errors: list[BaseException] = []
    with engine.begin() as rogue:
        rogue.execute(sa.text("update pg_blame_off set n = 1 where id = 1"))
        starter = queued_writers(engine, "pg_blame_off", 6, 0.25, errors)
        with pytest.raises(QueryTimeout):
            rogue.execute(sa.text("select pg_sleep(5)"))
    starter.join(15)
    assert len(errors) >= 3
    assert guard.stats()["lock_holders_blamed"] == 0
    assert guard.quarantined() == []  # one own time-out of three


async def test_asyncpg_lock_holder_is_blamed(make_guard: MakeGuard, pg_async_url: str) -> None:
    """The same on asyncpg: the blame's own connection is opened on the event loop."""
    engine = create_async_engine(pg_async_url, pool_size=8, max_overflow=0)
    guard = make_guard(engine, statement_timeout=3.0, quarantine_threshold=3, partition_share=1.0)
    errors: list[BaseException] = []

    async def victim() -> None:
        try:
            async with engine.begin() as c:
                await c.execute(sa.text("update pg_blame_a set n = n + 100 where id = 1"))
        except BaseException as e:
            errors.append(e)

    try:
        async with engine.begin() as c:
            await c.execute(sa.text("drop table if exists pg_blame_a"))
            await c.execute(sa.text("create table pg_blame_a (id int primary key, n int)"))
            await c.execute(sa.text("insert into pg_blame_a values (1, 0)"))
        async with engine.begin() as rogue:
            await rogue.execute(sa.text("update pg_blame_a set n = 1 where id = 1"))

            async def queue() -> None:
                for _ in range(6):
                    await asyncio.sleep(0.25)
                    tasks.append(asyncio.create_task(victim()))

            tasks: list[asyncio.Task[None]] = []
            starter = asyncio.create_task(queue())
            with pytest.raises(QueryTimeout) as ei:
                await rogue.execute(sa.text("select pg_sleep(5)"))
            await starter
        await asyncio.gather(*tasks)
        assert len(errors) >= 3 and all(getattr(e, "cause", None) == "lock" for e in errors)
        assert guard.stats()["lock_holders_blamed"] >= 3
        assert [q["fingerprint"] for q in guard.quarantined()] == [ei.value.fingerprint]
        async with engine.begin() as c:
            await c.execute(sa.text("drop table pg_blame_a"))
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("cancel", "driver", "mode"),
    [
        (True, "psycopg", "session"),
        (True, "psycopg2", "session"),
        (False, "psycopg", "session"),
        # "transaction" means PgBouncer: backend pids mean nothing there, so nothing is
        # cancelled by pid and the running copies reach their own time-out.
        (True, "psycopg", "transaction"),
    ],
)
def test_quarantine_cancels_the_statement_s_running_executions(
    make_guard: MakeGuard, pg_url: str, cancel: bool, driver: str, mode: str
) -> None:
    """Once a statement is quarantined, its executions still running hold connections (and
    maybe locks) until their own time-out: poolguard cancels them at once."""
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=4, max_overflow=0)
    guard = make_guard(
        engine,
        statement_timeout=3.0,
        quarantine_threshold=1,
        partition_share=1.0,
        cancel_quarantined=cancel,
        pg_timeout_mode=mode,
    )
    slow = sa.text("select pg_sleep(:s)")
    outcome: list[BaseException] = []
    started = threading.Event()

    def long_run() -> None:
        try:
            with engine.connect() as c:
                started.set()
                c.execute(slow, {"s": 10})
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=long_run)
    t.start()
    started.wait(5)
    time.sleep(0.2)  # it is running
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout), guard.budget(statement_timeout=0.3), engine.connect() as c:
        c.execute(slow, {"s": 10})  # its time-out quarantines the statement
    t.join(10)
    stopped_after = time.monotonic() - t0
    [err] = outcome
    assert isinstance(err, QueryTimeout)
    if cancel and mode == "session":
        assert err.cause == "quarantined"
        assert "quarantined" in str(err)
        assert stopped_after < 2.0  # not its own 3 s time-out
        assert guard.stats()["quarantined_cancelled"] == 1
    else:
        assert err.cause == "statement"
        assert stopped_after >= 2.0
        assert guard.stats()["quarantined_cancelled"] == 0
    assert len(guard.quarantined()) == 1
    with engine.connect() as c:  # every connection came back healthy
        assert c.execute(sa.text("select 1")).scalar() == 1


async def test_asyncpg_quarantine_cancels_running_executions(
    make_guard: MakeGuard, pg_async_url: str
) -> None:
    engine = create_async_engine(pg_async_url, pool_size=4, max_overflow=0)
    guard = make_guard(engine, statement_timeout=3.0, quarantine_threshold=1, partition_share=1.0)
    slow = sa.text("select pg_sleep(:s)")

    async def long_run() -> None:
        async with engine.connect() as c:
            await c.execute(slow, {"s": 10})

    try:
        task = asyncio.create_task(long_run())
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout):
            async with guard.budget(statement_timeout=0.3), engine.connect() as c:
                await c.execute(slow, {"s": 10})
        with pytest.raises(QueryTimeout) as ei:
            await task
        assert ei.value.cause == "quarantined"
        assert time.monotonic() - t0 < 2.0
        async with engine.connect() as c:
            assert (await c.execute(sa.text("select 1"))).scalar() == 1
    finally:
        await engine.dispose()


def test_session_ids_are_trusted_only_when_the_server_confirms_them(
    make_guard: MakeGuard, pg_url: str
) -> None:
    """Behind a pooler the driver's pid is the pooler's: a cancel sent to it could stop
    another client's statement. The id is used only when the server reported the same."""
    from poolguard.core.holds import conn_state
    from poolguard.dialects.base import SERVER_ID

    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine)
    with engine.connect() as c:
        server_pid = c.execute(sa.text("select pg_backend_pid()")).scalar()
        # poolguard's own per-connection state, never the application's connection.info
        assert conn_state(c.connection._connection_record).backend_pid == server_pid
        assert not any(str(k).startswith("poolguard") for k in c.connection.info)
        raw = c.connection.dbapi_connection
        assert guard.enforcer.backend_pid(raw, {SERVER_ID: server_pid}) == server_pid
        assert guard.enforcer.backend_pid(raw, {SERVER_ID: server_pid + 1}) is None
        assert guard.enforcer.backend_pid(raw, {}) is None


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_the_dialects_first_connect_queries_are_not_the_callers(
    make_guard: MakeGuard, pg_url: str, driver: str
) -> None:
    """A fresh engine's first checkout runs SQLAlchemy's own queries (server version,
    schema, string settings) inside the caller's checkout: they are the connection's, not
    the caller's. A budget of one statement takes the caller's one, and the statistics list
    only it."""
    engine = sa.create_engine(sync_url(pg_url, driver), pool_size=1)
    seen: list[str] = []
    # A dialect-level listener: the first-connect Connection fires no Connection events.
    sa.event.listen(engine, "do_execute", lambda cursor, stmt, params, ctx: seen.append(stmt))
    guard = make_guard(engine)
    with guard.budget(max_queries=1), engine.connect() as c:
        assert c.execute(sa.text("SELECT 41 + 1")).scalar() == 42
    assert len(seen) > 1, "the dialect ran its own queries first: the test needs them"
    summaries = [row["summary"] for row in guard.stats()["statements"]]
    assert summaries == ["SELECT"], summaries
