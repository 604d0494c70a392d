"""``connection_storm`` fires for storms, not for a pool doing what it is configured to do.

A healthy burst opens the pool's overflow and closes it again as connections come back:
every connection it opens is one the pool is sized for, and alerting on it taught people to
ignore the alert (issue #9 measured it firing during plain bursts). Failed connects and
reconnects are what a storm is made of: both are tested here on a real PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from poolguard.observe.alerts import Alert

MakeGuard = Callable[..., Any]

pytestmark = pytest.mark.postgresql


def _burst(engine: sa.Engine, n: int) -> None:
    """``n`` checkouts at once, each running one statement; all returned at the end."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            start.wait(10)
            with engine.connect() as c:
                c.execute(sa.text("select pg_sleep(0.05)"))
        except BaseException as e:  # reported below, never swallowed
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_bursts_that_open_the_pools_overflow_raise_no_storm(
    make_guard: MakeGuard, pg_url: str
) -> None:
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=8)  # capacity 10
    alerts: list[Alert] = []
    guard = make_guard(engine, on_alert=alerts.append, checkout_timeout=10.0)
    # Six bursts of twice the pool within a few seconds: each opens the 8 overflow
    # connections and closes them as they come back, 48+ new connections in all, past the
    # storm threshold (max(10, 2 x 10) = 20) several times over.
    for _ in range(6):
        _burst(engine, 20)
    pool = engine.pool
    assert isinstance(pool, sa.QueuePool)
    assert pool.size() + pool.overflow() <= 10  # never more open than the pool allows
    assert guard.stats()["refusals"] == {}
    assert [a.kind for a in alerts if a.kind == "connection_storm"] == []


def test_a_wave_of_failing_connects_is_a_storm(make_guard: MakeGuard, pg_url: str) -> None:
    # A server that refuses connections (nothing listens on port 1): every checkout fails.
    url = sa.make_url(pg_url)

    def connect() -> Any:
        return psycopg.connect(
            host="127.0.0.1", port=1, user="postgres", dbname=url.database, connect_timeout=2
        )

    engine = sa.create_engine("postgresql+psycopg://", creator=connect, pool_size=2, max_overflow=3)
    alerts: list[Alert] = []
    guard = make_guard(engine, on_alert=alerts.append)
    threshold = 10  # max(10, 2 x capacity 5)
    for _ in range(threshold):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert alerts == []  # not more than the threshold yet
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    (storm,) = [a for a in alerts if a.kind == "connection_storm"]
    assert storm.attributes["failed"] == threshold + 1
    assert storm.attributes["pool"] == guard.pool_name
    # Nothing about the server or the error's text in it: names and counts only.
    assert "port" not in storm.message and "refused" not in storm.message.lower()


def test_a_reconnect_wave_is_a_storm(make_guard: MakeGuard, pg_url: str) -> None:
    # A pool that keeps losing its connections (here: every session terminated by the
    # server, again and again, as a failover or a restart loop would) reconnects them all.
    engine = sa.create_engine(pg_url, pool_size=5, max_overflow=0, pool_pre_ping=True)
    admin = sa.create_engine(pg_url, poolclass=sa.NullPool)
    alerts: list[Alert] = []
    guard = make_guard(engine, on_alert=alerts.append, checkout_timeout=10.0, critical_reserve=0)
    try:
        _burst(engine, 5)  # the pool's five connections, opened once: no storm
        assert alerts == []
        for _ in range(3):
            with admin.connect() as c:
                c.execute(
                    sa.text(
                        "select pg_terminate_backend(pid) from pg_stat_activity "
                        "where datname = current_database() and pid <> pg_backend_pid() "
                        "and backend_type = 'client backend' and pid = any(:pids)"
                    ),
                    {"pids": _pids(engine)},
                )
            _burst(engine, 5)  # pre-ping finds each connection dead: five reconnects
    finally:
        admin.dispose()
    # 15 reconnects within seconds: more than max(10, 2 x 5); one alert (debounced).
    storms = [a for a in alerts if a.kind == "connection_storm"]
    assert len(storms) == 1
    assert storms[0].attributes["failed"] == 0
    assert guard.stats()["refusals"] == {}


def _pids(engine: sa.Engine) -> list[int]:
    """The server pids of the pool's idle connections (checked out one by one)."""
    conns = [engine.connect() for _ in range(5)]
    try:
        return [int(c.exec_driver_sql("select pg_backend_pid()").scalar_one()) for c in conns]
    finally:
        for c in conns:
            c.close()
