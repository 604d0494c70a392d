"""Fleet mode through ``PoolGuard(engine, fleet=RedisFleet(...))`` on every engine kind:
sync and async, PostgreSQL, MariaDB and SQLite (a fleet on one host).

Two guards on two engines are two members (each joins with a member id of its own); the
processes tests are in test_fleet_cap.py and friends. Here: the shared cap holds through the
guard's own checkout path (borrowing included), ``stats()["fleet"]`` tells the story, and a
quarantine opened by one guard refuses on the other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fleet_support import RedisServer, fleet_keys, private_redis, wait_for
from poolguard import QueryQuarantined
from poolguard.fleet import RedisFleet

FLEET = {"lease_ttl": 2.0, "heartbeat": 0.25, "socket_timeout": 0.2}
HOLD = {
    "postgresql": "SELECT pg_sleep(0.05)",
    "mariadb": "SELECT SLEEP(0.05)",
    "sqlite": "SELECT 1",
}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


class Peak:
    """Checkouts held across both guards right now, and the most ever (one process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.now += n
            self.peak = max(self.peak, self.now)


@pytest.mark.parametrize("kind", ["postgresql", "mariadb", "sqlite"])
def test_sync_guards_share_the_cap(
    kind: str,
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    make_guard: Callable[..., Any],
) -> None:
    url = request.getfixturevalue(
        {"postgresql": "pg_url", "mariadb": "mariadb_url", "sqlite": "sqlite_file_url"}[kind]
    )
    fleet = RedisFleet(redis_server.url, name=f"sync-{kind}", max_connections=3, **FLEET)
    engines = [sa.create_engine(url, pool_size=3, max_overflow=0) for _ in range(2)]
    guards = [make_guard(e, fleet=fleet, checkout_timeout=5.0) for e in engines]
    peak, errors = Peak(), []

    def work(engine: sa.Engine) -> None:
        for _ in range(15):
            try:
                with engine.connect() as c:
                    peak.add(1)
                    try:
                        c.execute(sa.text(HOLD[kind]))
                        if kind == "sqlite":
                            time.sleep(0.02)
                    finally:
                        peak.add(-1)
            except Exception as e:
                errors.append(e)

    threads = [threading.Thread(target=work, args=(e,)) for e in engines for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert peak.peak <= 3  # six threads, two pools of three, one budget of three
    assert peak.peak >= 2
    stats = [g.stats()["fleet"] for g in guards]
    assert {s["members"] for s in stats} == {2}
    assert sum(s["capacity"] for s in stats) <= 3
    assert all(s["mode"] == "connected" for s in stats)
    for g in guards:
        g.close()
    assert fleet_keys(redis_server, f"sync-{kind}")["leases"] == {}
    for e in engines:
        e.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_async_guards_share_the_cap_and_the_quarantine(
    kind: str,
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    make_guard: Callable[..., Any],
) -> None:
    url = request.getfixturevalue(
        {"postgresql": "pg_async_url", "mariadb": "mariadb_async_url"}[kind]
    )
    rogue = {"postgresql": "SELECT pg_sleep(5)", "mariadb": "SELECT SLEEP(5)"}[kind]
    same = {"postgresql": "SELECT pg_sleep(0)", "mariadb": "SELECT SLEEP(0)"}[kind]
    fleet = RedisFleet(redis_server.url, name=f"async-{kind}", max_connections=3, **FLEET)

    async def main() -> None:
        engines = [create_async_engine(url, pool_size=3, max_overflow=0) for _ in range(2)]
        guards = [
            make_guard(e, fleet=fleet, checkout_timeout=5.0, statement_timeout=0.3) for e in engines
        ]
        peak = Peak()

        async def work(engine: Any) -> None:
            for _ in range(10):
                async with engine.connect() as c:
                    peak.add(1)
                    try:
                        await c.execute(sa.text(HOLD[kind]))
                    finally:
                        peak.add(-1)

        await asyncio.gather(*(work(e) for e in engines for _ in range(3)))
        assert 2 <= peak.peak <= 3
        if kind == "mariadb":
            # aiomysql's time-outs earn no strike today, fleet or not (reported separately).
            for g in guards:
                g.close()
            for e in engines:
                await e.dispose()
            return
        # Three time-outs on the first guard; the second refuses without running it.
        for _ in range(3):
            with pytest.raises(sa.exc.OperationalError):
                async with engines[0].connect() as c:
                    await c.execute(sa.text(rogue))
        assert wait_for(lambda: guards[1].quarantined(), 5)
        with pytest.raises(QueryQuarantined):
            async with engines[1].connect() as c:
                await c.execute(sa.text(same))
        assert guards[1].stats()["fleet"]["quarantine"]["remote_opened"] == 1
        guards[1].release(same)
        assert wait_for(lambda: not guards[0].quarantined(), 5)
        for g in guards:
            g.close()
        for e in engines:
            await e.dispose()

    asyncio.run(main())
    assert fleet_keys(redis_server, f"async-{kind}") == {"leases": {}, "quarantined": []}
