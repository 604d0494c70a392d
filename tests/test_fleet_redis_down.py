"""Redis is a helper, never a dependency of a request: hung, dead, restarted or flushed.

Children are real guards on PostgreSQL (``PoolGuard(engine, fleet=...)``), three threads
each, over a budget smaller than their pools, so they borrow all the time. The parent hangs
Redis (SIGSTOP, longer than a lease TTL), kills it, restarts it empty, and samples the
server's busy connections from ``pg_stat_activity`` meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from fleet_support import RedisServer, guard_worker, private_redis, queue, spawn, wait_for
from poolguard.fleet import RedisFleet
from poolguard.observe.alerts import Alert, Alerter
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine

FLEET = {"max_connections": 4, "lease_ttl": 1.5, "heartbeat": 0.25, "socket_timeout": 0.1}
WORK = "SELECT pg_sleep(0.01)"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


def _busy_sampler(pg_url: str, stop: threading.Event, peaks: list[int]) -> None:
    """Every 20 ms: the test database's backends running a statement (ours excluded)."""
    eng = sa.create_engine(pg_url, poolclass=sa.NullPool)
    db = sa.make_url(pg_url).database
    with eng.connect() as c:
        while not stop.is_set():
            n = c.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                    "AND state <> 'idle' AND pid <> pg_backend_pid()"
                ),
                {"db": db},
            ).scalar_one()
            peaks.append(int(n))
            stop.wait(0.02)
    eng.dispose()


def test_hung_dead_and_restarted_redis_cost_no_request(
    pg_url: str, redis_server: RedisServer
) -> None:
    outs, ctls, procs = [], [], []
    for _ in range(2):
        out, ctl = queue(), queue()
        # checkout_timeout 2 s: a request may wait for a slot behind its siblings, never on
        # Redis (the socket time-out is 0.1 s).
        procs.append(
            spawn(
                guard_worker,
                pg_url,
                redis_server.url,
                "outage",
                FLEET,
                {"pool_size": 3, "checkout_timeout": 2.0},
                WORK,
                60.0,
                0.0,
                out,
                ctl,
                3,
            )
        )
        assert out.get(timeout=60) == {"ready": True}
        outs.append(out)
        ctls.append(ctl)
    stop, busy = threading.Event(), []
    sampler = threading.Thread(target=_busy_sampler, args=(pg_url, stop, busy))
    sampler.start()
    try:
        time.sleep(2.0)
        redis_server.pause()  # hung: accepts nothing, answers nothing; longer than a TTL
        time.sleep(3.0)
        redis_server.resume()
        time.sleep(2.0)
        redis_server.kill()  # dead
        time.sleep(2.0)
        redis_server.start()  # back, empty: the members rejoin
        assert wait_for(
            lambda: len(redis_server.client().hgetall("poolguard:{outage}:leases")) == 2, 20
        )
        time.sleep(2.0)
    finally:
        for ctl in ctls:
            ctl.put(("stop",))
        results = [out.get(timeout=60) for out in outs]
        for p in procs:
            p.join(30)
        stop.set()
        sampler.join(30)
    for r in results:
        kinds = {k for _, k in r["events"]}
        assert kinds == {"ok"}, {k: sum(1 for _, x in r["events"] if x == k) for k in kinds}
        assert len(r["events"]) > 100
        assert r["fleet"]["mode"] == "connected"
        assert r["fleet"]["degraded_episodes"] >= 2  # the hang and the death
        cap_then, share_then = r["degraded_capacity"]
        assert 0 < cap_then <= share_then == 2  # the last known share: 4 // 2
        assert r["leak"] == {"held": 0, "waiting": 0, "checkedout": 0}
    # The budget held on the server all along, Redis or not (6 threads, pools of 3 each).
    assert busy and max(busy) <= FLEET["max_connections"], max(busy)
    assert redis_server.client().hgetall("poolguard:{outage}:leases") == {}


def _member(server: RedisServer, alerts: Alerter, **kw: Any) -> tuple[Any, Gate, Quarantine]:
    gate, quarantine = Gate(4), Quarantine(threshold=1, cooldown=30.0)
    fleet = RedisFleet(server.url, name="solo", **{**FLEET, **kw})
    m = fleet.join(gate=gate, quarantine=quarantine, alerts=alerts, pool_capacity=4)
    return m, gate, quarantine


def test_noscript_after_a_script_flush_is_handled(redis_server: RedisServer) -> None:
    m, gate, _ = _member(redis_server, Alerter())
    other, other_gate, _ = _member(redis_server, Alerter())
    try:
        assert wait_for(lambda: gate.capacity == 2 and other_gate.capacity == 2, 10)
        other.close()
        redis_server.client().script_flush()  # what a restart or a failover also does
        held = [gate.try_acquire("default", 1) for _ in range(2)]
        assert all(held) and gate.try_acquire("default", 1) is None
        assert m.borrow()  # EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA: granted all the same
        assert gate.capacity == 3
        held.append(gate.try_acquire("default", 1))
        assert held[-1] is not None
        redis_server.client().script_flush()
        assert asyncio.run(m.borrow_async())  # the asyncio client's scripts too
        assert gate.capacity == 4
        time.sleep(1.0)  # heartbeats after the flush
        assert m.snapshot()["mode"] == "connected"
        assert m.snapshot()["degraded_episodes"] == 0
        for t in held:
            gate.release(t)
    finally:
        m.close()
        other.close()


def test_degraded_alert_local_quarantine_and_clean_rejoin(redis_server: RedisServer) -> None:
    got: list[Alert] = []
    m, gate, q = _member(redis_server, Alerter(got.append, debounce=0.0))
    try:
        assert gate.capacity == 4
        redis_server.kill()
        assert wait_for(lambda: m.snapshot()["mode"] == "degraded", 10)
        assert [a.kind for a in got] == ["fleet_degraded"]
        assert gate.capacity == 4  # its last known share (alone: the whole budget)
        # A new quarantine still trips locally; the fleet hears of it on rejoin.
        t = q.record_timeout("f" * 16, "SELECT t", time.monotonic())
        assert t is not None
        m.transition(t)
        assert q.check("f" * 16, time.monotonic()) is not None
        redis_server.start()
        assert wait_for(lambda: m.snapshot()["mode"] == "connected", 20)
        assert [a.kind for a in got] == ["fleet_degraded", "fleet_rejoined"]
        c = redis_server.client()
        assert c.hgetall("poolguard:{solo}:leases") == {m.id: "4"}
        assert wait_for(lambda: c.exists("poolguard:{solo}:q:" + "f" * 16), 10)
    finally:
        m.close()
    assert redis_server.client().hgetall("poolguard:{solo}:leases") == {}


def test_a_member_that_starts_without_redis_uses_its_fallback_share(
    redis_server: RedisServer,
) -> None:
    redis_server.kill()
    got: list[Alert] = []
    started = time.monotonic()
    m, gate, _ = _member(redis_server, Alerter(got.append), fallback_share=1)
    try:
        assert time.monotonic() - started < 2.0  # joining does not hang on a dead Redis
        assert gate.capacity == 1 and m.snapshot()["mode"] == "degraded"
        redis_server.start()
        assert wait_for(lambda: gate.capacity == 4, 20)
    finally:
        m.close()
