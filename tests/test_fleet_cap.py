"""The fleet-wide connection cap, across OS processes, on a real Redis.

Each child is one member over a real Gate (the guard's checkout path in miniature: try the
gate, borrow when it is full, then wait). Checkouts held are counted fleet-wide, atomically,
in the test's own Redis keys, so the peak is exact even with children killed by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleet_support import (
    HoldCounter,
    RedisServer,
    cancel_worker,
    fleet_keys,
    gate_worker,
    live_leases,
    private_redis,
    queue,
    spawn,
    wait_for,
)
from poolguard.fleet import RedisFleet
from poolguard.observe.alerts import Alerter
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine

FAST = {"lease_ttl": 1.0, "heartbeat": 0.25, "socket_timeout": 0.2}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


def _join(server: RedisServer, name: str, pool: int, cap: int, **kw: Any) -> tuple[Any, Gate]:
    gate = Gate(pool)
    member = RedisFleet(server.url, name=name, max_connections=cap, **{**FAST, **kw}).join(
        gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=pool
    )
    return member, gate


def test_cap_holds_with_members_started_and_killed_mid_lease(redis_server: RedisServer) -> None:
    cap, pool = 6, 5  # three members' pools sum to 15: the cap is what binds
    kw = {"max_connections": cap, **FAST}
    out = queue()
    args = (redis_server.url, "shop", kw, pool, 4, 7.0, 0.02, out)
    procs = {
        f"m{i}": spawn(gate_worker, redis_server.url, "shop", f"m{i}", *args[2:]) for i in range(3)
    }
    counter = HoldCounter(redis_server.url, "shop")
    assert wait_for(lambda: counter.peak() > 0, 30), "no child got a connection"
    time.sleep(1.0)
    for victim, late in (("m0", "m3"), ("m1", "m4")):
        # Killed while it holds leases (and, most likely, checkouts).
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].join(10)
        counter.drop(victim)  # its checkouts died with it; its leases expire in Redis
        procs[late] = spawn(
            gate_worker, redis_server.url, "shop", late, kw, pool, 4, 3.0, 0.02, out
        )
        time.sleep(1.0)
    results = [out.get(timeout=60) for _ in range(3)]  # m2, m3, m4 finish
    for p in procs.values():
        p.join(30)
    assert counter.peak() <= cap, f"fleet held {counter.peak()} checkouts with a cap of {cap}"
    assert counter.peak() >= cap - 1, "the members never used the fleet's budget"
    for r in results:
        assert r["acquired"] > 0, r
        assert r["held"] == 0 and r["waiting"] == 0, r
    assert live_leases(redis_server, "shop") == {}


def test_crashed_members_leases_return_within_ttl_plus_heartbeat(redis_server: RedisServer) -> None:
    cap = 4
    out = queue()
    kw = {"max_connections": cap, **FAST}
    # The child uses the whole budget: four threads, pool 4, holding for long.
    child = spawn(gate_worker, redis_server.url, "crash", "hog", kw, cap, 4, 60.0, 5.0, out)
    counter = HoldCounter(redis_server.url, "crash")
    assert wait_for(lambda: counter.now() == cap, 30), "the child never took the budget"
    member, gate = _join(redis_server, "crash", cap, cap)
    try:
        assert gate.capacity == 0  # nothing free: the survivor starts with no lease
        assert not member.borrow()
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.join(10)
        counter.drop("hog")
        # A waiting checkout makes the survivor ask for leases at every heartbeat.
        tickets = []

        def got_all() -> bool:
            t = gate.try_acquire("default", 1)
            if t is None and member.borrow():
                t = gate.try_acquire("default", 1)
            if t is not None:
                tickets.append(t)
            return len(tickets) == cap

        assert wait_for(got_all, 30, every=0.01)
        back = time.monotonic() - killed
        bound = FAST["lease_ttl"] + FAST["heartbeat"]
        # Not before the TTL (the dead member's leases were its own until then), and within
        # TTL + heartbeat plus a generous allowance for a loaded machine.
        assert back > FAST["lease_ttl"] * 0.5, back
        assert back < bound + 3.0, back
        assert list(live_leases(redis_server, "crash")) == [member.id]
        for t in tickets:
            gate.release(t)
    finally:
        member.close()
    assert live_leases(redis_server, "crash") == {}


def test_base_share_needs_no_round_trip_and_borrowing_one(redis_server: RedisServer) -> None:
    # Heartbeats every 3 s: the counting below takes milliseconds right after one.
    slow = {"lease_ttl": 10.0, "heartbeat": 3.0}
    a, gate_a = _join(redis_server, "share", 5, 6, **slow)
    b, gate_b = _join(redis_server, "share", 5, 6, **slow)
    try:
        # b found the budget taken (a's share was 5 of 6 alone): at a's next heartbeat a
        # gives back what it does not use above the new fair share, 3; b's takes it.
        assert wait_for(lambda: gate_a.capacity == 3 and gate_b.capacity == 3, 20)
        time.sleep(0.05)
        calls = _count_commands(redis_server)
        held = [gate_a.try_acquire("default", 1) for _ in range(3)]
        assert all(held)
        assert _count_commands(redis_server) == calls  # the base share: no round trip
        # The gate is full; the fleet has nothing free (b holds its base share): refused,
        # after one round trip.
        assert gate_a.try_acquire("default", 1) is None
        time.sleep(0.06)  # past the refusal back-off of a's first borrow above
        assert not a.borrow()
        assert _count_commands(redis_server) == calls + 1
        b.close()  # b leaves: its leases are free at once
        time.sleep(0.06)
        calls = _count_commands(redis_server)
        assert a.borrow()
        assert _count_commands(redis_server) == calls + 1
        t = gate_a.try_acquire("default", 1)
        assert t is not None and gate_a.capacity == 4
        assert fleet_keys(redis_server, "share")["leases"] == {a.id: 4}
        for x in [*held, t]:
            gate_a.release(x)
    finally:
        a.close()
        b.close()
    assert fleet_keys(redis_server, "share")["leases"] == {}


def _count_commands(server: RedisServer) -> int:
    c = server.client()
    try:
        return sum(int(v["calls"]) for k, v in c.info("commandstats").items() if "evalsha" in k)
    finally:
        c.close()


def test_a_thousand_cancelled_acquires_leak_nothing(redis_server: RedisServer) -> None:
    # Two members with pools of 4 share 7: base shares of 3, one lease to borrow in turn.
    kw = {"max_connections": 7, **FAST}
    out = queue()
    procs = [spawn(cancel_worker, redis_server.url, "cancel", kw, 4, 500, 2, out) for _ in range(2)]
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    for r in results:
        assert r["errors"] == []
        assert r["cancelled"] > 100, r  # most were cancelled, in a borrow or in the queue
        assert r["held"] == 0 and r["waiting"] == 0, r
        assert r["fleet"]["borrowed"] == 0, r["fleet"]  # borrowed leases went back
        assert r["fleet"]["leases"] <= r["fleet"]["share"], r["fleet"]
        b = r["fleet"]["borrows"]
        # Borrowing was asked for (a borrow may find nothing to do: the other member took
        # the spare lease, or one was in flight): what matters is that nothing leaked.
        assert sum(b.values()) > 0, b
    assert fleet_keys(redis_server, "cancel")["leases"] == {}


def test_clock_skew_between_members_changes_nothing(redis_server: RedisServer) -> None:
    # Wall clocks an hour apart either way: leases are timed by Redis's clock alone.
    cap, pool = 5, 4
    kw = {"max_connections": cap, **FAST}
    out = queue()
    procs = {
        who: spawn(gate_worker, redis_server.url, "skew", who, kw, pool, 3, 5.0, 0.02, out, skew)
        for who, skew in (("ahead", 3600.0), ("behind", -3600.0), ("on_time", 0.0))
    }
    counter = HoldCounter(redis_server.url, "skew")
    assert wait_for(lambda: counter.peak() > 0, 30)
    time.sleep(1.0)
    os.kill(procs["ahead"].pid, signal.SIGKILL)
    procs["ahead"].join(10)
    counter.drop("ahead")
    killed = time.monotonic()
    assert wait_for(lambda: len(live_leases(redis_server, "skew")) == 2, 30)
    assert time.monotonic() - killed < FAST["lease_ttl"] + FAST["heartbeat"] + 3.0
    results = [out.get(timeout=60) for _ in range(2)]
    for p in procs.values():
        p.join(30)
    assert counter.peak() <= cap
    for r in results:
        assert r["acquired"] > 0 and r["held"] == 0 and r["waiting"] == 0, r
    assert live_leases(redis_server, "skew") == {}
