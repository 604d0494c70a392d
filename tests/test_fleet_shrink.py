"""A member whose share shrinks while a slow route holds its slots, and the member that joins.

The scale-up replay (benchmarks/fleet/README.md): two members at 10 of a cap of 20, a rogue
route holding 7 of each member's slots, four more members join, the share falls to 3. The
old members must stop the rogue route first and keep serving their light routes from the
slots they still hold leases for (not queue them behind the rogue's slow statements), and
a newcomer must not open its gate with one or two slots the next rogue request takes. The
fleet-wide cap holds throughout: a gate never holds more than its leases in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleet_support import RedisServer, fleet_keys, private_redis, wait_for
from poolguard.fleet import RedisFleet
from poolguard.observe.alerts import Alerter
from poolguard.policy.gate import Gate, Ticket
from poolguard.policy.quarantine import Quarantine

# A long TTL: a newcomer opens with a part of its share only after one TTL.
FLEET = {"lease_ttl": 6.0, "heartbeat": 0.25, "socket_timeout": 0.2}
CAP = 6


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


def _join(server: RedisServer, name: str) -> tuple[Any, Gate]:
    gate = Gate(CAP, max_share=0.5)  # a route's share: half of the gate's slots
    member = RedisFleet(server.url, name=name, max_connections=CAP, **FLEET).join(
        gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=CAP
    )
    return member, gate


def _within_leases(server: RedisServer, name: str, members: list[tuple[Any, Gate]]) -> None:
    leases = fleet_keys(server, name)["leases"]
    assert sum(leases.values()) <= CAP
    for m, g in members:
        assert g.held <= leases.get(m.id, 0), (g.held, leases)


def test_the_heaviest_route_shrinks_first_and_light_ones_are_served(
    redis_server: RedisServer,
) -> None:
    a, ga = _join(redis_server, "shrink")
    rogue = [ga.try_acquire("rogue", 1) for _ in range(5)]  # nobody else is active: allowed
    assert all(rogue) and ga.capacity == CAP
    b, gb = _join(redis_server, "shrink")  # the fair share falls to 3: b starves
    held: list[Ticket] = [t for t in rogue if t is not None]
    try:
        assert wait_for(lambda: ga.capacity == 3)
        # The rogue route is over its share and the gate over its capacity: it gets nothing.
        assert ga.try_acquire("rogue", 1) is None
        # A light route is served from a slot a still holds a lease for, at once, instead
        # of waiting for one of the rogue's statements to finish (0.8 s in the replay).
        light = ga.acquire("light", 1, 0.5)
        assert light is not None
        held.append(light)
        _within_leases(redis_server, "shrink", [(a, ga), (b, gb)])
        # As the rogue's holders come back, a gives their leases back and b gets its share.
        for t in list(held):
            ga.release(t)
            held.remove(t)
            _within_leases(redis_server, "shrink", [(a, ga), (b, gb)])
        assert wait_for(lambda: gb.capacity == 3 and ga.slots == ga.capacity == 3)
        _within_leases(redis_server, "shrink", [(a, ga), (b, gb)])
    finally:
        for t in held:
            ga.release(t)
        a.close()
        b.close()
    assert fleet_keys(redis_server, "shrink")["leases"] == {}


def test_a_newcomer_opens_its_gate_with_its_whole_base_share(redis_server: RedisServer) -> None:
    a, ga = _join(redis_server, "newcomer")
    rogue = [t for t in (ga.try_acquire("rogue", 1) for _ in range(CAP)) if t is not None]
    assert len(rogue) == CAP
    b, gb = _join(redis_server, "newcomer")
    try:
        assert b.snapshot()["share"] == 3
        assert wait_for(lambda: ga.capacity == 3)
        assert gb.capacity == 0  # nothing free yet: every slot is held by a's rogue
        # Two holders come back: a keeps one slot above those still held for its light
        # routes and gives the other lease back, to b.
        ga.release(rogue.pop())
        ga.release(rogue.pop())
        assert wait_for(lambda: b.snapshot()["leases"] >= 1)
        # One slot would go to the next slow request, and b's light routes would queue
        # behind it: b's gate stays shut until its base share is there.
        assert gb.capacity == 0 and gb.try_acquire("light", 1) is None
        _within_leases(redis_server, "newcomer", [(a, ga), (b, gb)])
        while rogue:
            ga.release(rogue.pop())
        assert wait_for(lambda: gb.capacity == 3)
        assert b.snapshot()["leases"] == 3
        _within_leases(redis_server, "newcomer", [(a, ga), (b, gb)])
    finally:
        for t in rogue:
            ga.release(t)
        a.close()
        b.close()


def test_a_members_gate_counts_a_route_active_for_as_long_as_the_fleet_is_wide(
    redis_server: RedisServer,
) -> None:
    """Each of n members sees 1/n of a route's requests, so a route that the gate keeps
    headroom free for (one granted lately) must count as active n times as long."""
    members = [_join(redis_server, "active") for _ in range(3)]
    m, g = members[0]
    try:
        assert wait_for(lambda: all(x.snapshot()["members"] == 3 for x, _ in members))
        assert wait_for(lambda: g.capacity == 2 and m.snapshot()["leases"] == 2)
        t = g.try_acquire("light", 1)
        assert t is not None
        g.release(t)
        time.sleep(1.2)  # longer ago than one process's notion of "active" (1 s)
        first = g.try_acquire("rogue", 1)  # at its share (1 of 2): the last slot is headroom
        assert first is not None
        try:
            assert g.try_acquire("rogue", 1) is None
        finally:
            g.release(first)
    finally:
        for x, _ in members:
            x.close()
