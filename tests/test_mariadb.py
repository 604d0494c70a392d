"""PoolGuard on a real MariaDB: max_statement_time per session, SET STATEMENT for a
tightened statement (no extra round trip, counted by the server's Questions counter),
pymysql and aiomysql."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import QueryTimeout

pytestmark = pytest.mark.mariadb
MakeGuard = Callable[..., Any]
HotRow = Callable[[sa.Engine, str], None]
QueuedWriters = Callable[[sa.Engine, str, int, float, list[BaseException]], threading.Thread]


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


@pytest.mark.parametrize(
    ("deadline", "cause", "limit", "strikes"),
    [
        # 3 s left: the lock wait comes down to 1 s in the same SET STATEMENT.
        (3.0, "lock", 1.0, 0),
        # 0.6 s left: InnoDB's lock wait cannot go below 1 s, so max_statement_time ends the
        # wait; that time-out may be a victim's, so it earns no strike.
        (0.6, "statement", 0.6, 0),
    ],
)
def test_lock_victim_under_a_deadline_earns_no_strike(
    hot_row: HotRow,
    make_guard: MakeGuard,
    mariadb_url: str,
    deadline: float,
    cause: str,
    limit: float,
    strikes: int,
) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=2, max_overflow=0)
    hot_row(engine, "my_lock_v")
    # A session lock wait of 5 s, for the deadline to bring down.
    guard = make_guard(engine, statement_timeout=10.0, quarantine_threshold=1, lock_timeout=5.0)
    with engine.begin() as holder:
        holder.execute(sa.text("update my_lock_v set n = 1 where id = 1"))
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei, guard.budget(deadline=deadline):
            with engine.begin() as c:
                c.execute(sa.text("update my_lock_v set n = 2 where id = 1"))
        waited = time.monotonic() - t0
    assert ei.value.cause == cause
    # The time left when the statement started; InnoDB's lock wait is whole seconds.
    assert limit - 0.3 <= ei.value.timeout <= limit
    assert waited < limit + 0.5
    assert len(guard.quarantined()) == strikes
    with engine.connect() as c:  # the session's lock wait is untouched
        assert c.execute(sa.text("select @@innodb_lock_wait_timeout")).scalar() == 5


def test_tightened_statement_time_out_still_earns_a_strike(
    make_guard: MakeGuard, mariadb_url: str
) -> None:
    """With 3 s left the lock wait is 1 s, so a statement time-out is the statement's own."""
    engine = sa.create_engine(mariadb_url)
    guard = make_guard(engine, statement_timeout=10.0, quarantine_threshold=1)
    with guard.budget(statement_timeout=2.5), engine.connect() as c:
        with pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text("select sleep(4)"))
    assert ei.value.cause == "statement"
    assert len(guard.quarantined()) == 1


def test_lock_holder_is_blamed_and_cancelled(
    hot_row: HotRow, queued_writers: QueuedWriters, make_guard: MakeGuard, mariadb_url: str
) -> None:
    """Writers queue behind a transaction that holds their row in a long statement: their
    lock waits name it (information_schema.innodb_lock_waits), three quarantine it, and the
    quarantine kills its running statement (KILL QUERY), which frees the row."""
    engine = sa.create_engine(mariadb_url, pool_size=8, max_overflow=0)
    hot_row(engine, "my_blame_t")
    guard = make_guard(engine, statement_timeout=4.0, quarantine_threshold=3, partition_share=1.0)
    errors: list[BaseException] = []
    with engine.begin() as rogue:
        rogue.execute(sa.text("update my_blame_t set n = 1 where id = 1"))
        # Lock waits of 2 s, ending at 2.3, 2.6, 2.9, 3.2 and 3.5 s.
        starter = queued_writers(engine, "my_blame_t", 5, 0.3, errors)
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei:
            rogue.execute(sa.text("select sleep(10)"))
        stopped_after = time.monotonic() - t0
    starter.join(15)
    assert ei.value.cause == "quarantined"
    assert stopped_after < 3.8  # killed before its own 4 s time-out
    assert len(errors) >= 3 and all(getattr(e, "cause", None) == "lock" for e in errors)
    stats = guard.stats()
    assert stats["lock_holders_blamed"] >= 3
    assert stats["quarantined_cancelled"] == 1
    assert [q["fingerprint"] for q in guard.quarantined()] == [ei.value.fingerprint]
    with engine.connect() as c:
        # InnoDB ends only the killed statement, not its transaction: the rogue's block
        # caught the error and committed its update (n = 1); writers that outlived the
        # rogue added 100 each after it.
        assert c.execute(sa.text("select n from my_blame_t")).scalar() % 100 == 1


def test_connection_ids_are_trusted_only_when_the_server_confirms_them(
    make_guard: MakeGuard, mariadb_url: str
) -> None:
    """Behind ProxySQL or MaxScale the handshake's id is the proxy's: KILL QUERY sent to it
    could stop another client's statement. It is used only when CONNECTION_ID() agrees."""
    from poolguard.core.holds import conn_state
    from poolguard.dialects.base import SERVER_ID

    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine)
    with engine.connect() as c:
        server_id = c.execute(sa.text("select connection_id()")).scalar()
        # poolguard's own per-connection state, never the application's connection.info
        assert conn_state(c.connection._connection_record).backend_pid == server_id
        assert not any(str(k).startswith("poolguard") for k in c.connection.info)
        raw = c.connection.dbapi_connection
        assert guard.enforcer.backend_pid(raw, {SERVER_ID: server_id + 1}) is None
