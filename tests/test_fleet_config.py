"""RedisFleet's options, the import on a core install, the lease arithmetic, a gate whose
capacity moves, and ``read_fleet`` for ``poolguard check --fleet``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from fleet_support import RedisServer, private_redis
from poolguard.fleet import RedisFleet, read_fleet, shares
from poolguard.observe.alerts import Alerter
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine

URL = "redis://127.0.0.1:6399/0"  # never connected to by these checks


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.mark.parametrize(
    ("kw", "option"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": True}, "max_connections"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"socket_timeout": 0.5, "heartbeat": 0.4}, "socket_timeout"),
        ({"lease_ttl": float("nan")}, "lease_ttl"),
        ({"heartbeat": 3.0, "lease_ttl": 5.0}, "heartbeat"),
        ({"fallback_share": -1}, "fallback_share"),
        ({"fallback_share": 50}, "fallback_share"),
        ({"refusal_backoff": -1}, "refusal_backoff"),
        ({"probe_lease": "10"}, "probe_lease"),
        ({"quarantine_linger": 0.1}, "quarantine_linger"),
        ({"meter_provider": object()}, "meter_provider"),
        ({"name": ""}, "name"),
        ({"name": "a b"}, "name"),
    ],
)
def test_every_option_is_checked_at_construction_naming_it(kw: dict[str, Any], option: str) -> None:
    args: dict[str, Any] = {"name": "shop", "max_connections": 40, **kw}
    with pytest.raises((TypeError, ValueError), match=option):
        RedisFleet(URL, **args)


def test_url_is_checked_and_credentials_never_shown() -> None:
    with pytest.raises(ValueError, match="url"):
        RedisFleet("http://x", name="shop", max_connections=4)
    f = RedisFleet("redis://user:secret@10.0.0.1:6380/2", name="shop", max_connections=4)
    assert "secret" not in repr(f) and "secret" not in f.where
    assert f.where == "redis://10.0.0.1:6380/2"


def test_core_install_imports_the_fleet_and_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import poolguard.fleet
        from poolguard.fleet import RedisFleet
        try:
            RedisFleet("redis://127.0.0.1:6379/0", name="shop", max_connections=4)
        except ImportError as e:
            print(e)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "poolguard[redis]" in r.stdout


def test_lease_arithmetic() -> None:
    assert shares.base_share(fair=10, pool=4) == 4
    assert shares.base_share(fair=2, pool=4) == 2
    # Idle above the base share: give back down to it (and never below what is held).
    p = shares.heartbeat_plan(capacity=6, held=1, waiting=0, base=3, pool=6, starving=False)
    assert p == shares.Plan(lower_to=3, want=3, keep=3)
    # Demand above the base: ask for it.
    p = shares.heartbeat_plan(capacity=3, held=3, waiting=2, base=3, pool=6, starving=False)
    assert p.want == 5 and p.lower_to is None
    # Someone starves: stop using what is above the base now, return it as it comes back.
    p = shares.heartbeat_plan(capacity=6, held=5, waiting=4, base=3, pool=6, starving=True)
    assert p == shares.Plan(lower_to=3, want=5, keep=3)
    assert shares.borrow_want(leases=3, held=3, waiting=2, in_flight=0, pool=4) == 4
    assert shares.degraded_capacity(base=3, fallback=1, known=True) == 3
    assert shares.degraded_capacity(base=0, fallback=1, known=False) == 1


def test_gate_capacity_moves_with_reserve_and_partition_share_in_proportion() -> None:
    gate = Gate(10, reserve=2, max_share=0.5)
    gate.set_capacity(5)
    assert (gate.capacity, gate.reserve, gate.partition_cap) == (5, 1, 2)
    gate.set_capacity(20)
    assert (gate.capacity, gate.reserve, gate.partition_cap) == (20, 4, 10)
    gate.set_capacity(1)
    assert (gate.capacity, gate.reserve, gate.partition_cap) == (1, 0, 1)
    assert gate.configured_capacity == 10
    # Critical work keeps its reserve under contention at a fleet-given capacity.
    gate.set_capacity(4)
    held = [gate.try_acquire(p, 1) for p in ("a", "b", "c")]
    assert all(held) and gate.try_acquire("d", 1) is None  # the last slot is the reserve
    crit = gate.try_acquire("d", 0)
    assert crit is not None
    gate.set_capacity(0)  # lowered below what is held: nobody loses a slot, nobody gets one
    assert gate.try_acquire("e", 0) is None and gate.held == 4
    for t in [*held, crit]:
        assert t is not None
        gate.release(t)
    assert gate.held == 0


def test_read_fleet_for_check(redis_server: RedisServer) -> None:
    assert read_fleet(redis_server.url, "shop")["exists"] is False
    fleet = RedisFleet(redis_server.url, name="shop", max_connections=8, heartbeat=0.25)
    members = [
        fleet.join(gate=Gate(5), quarantine=Quarantine(), alerts=Alerter(), pool_capacity=5)
        for _ in range(2)
    ]
    try:
        view = read_fleet(redis_server.url, "shop")
        assert view["exists"] and view["max_connections"] == 8
        assert len(view["members"]) == 2 and view["pools"] == 10
        assert view["leases"] <= 8
        assert all(0 < m["expires_in"] <= 5.0 and m["pid"] for m in view["members"])
        assert view["quarantined"] == 0
    finally:
        for m in members:
            m.close()
    assert read_fleet(redis_server.url, "shop")["members"] == []


def test_metrics_for_leases_borrowing_and_degraded_mode(redis_server: RedisServer) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fleet = RedisFleet(
        redis_server.url, name="otel", max_connections=4, heartbeat=0.25, meter_provider=provider
    )
    gate = Gate(6)
    m = fleet.join(gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=6)
    try:
        held = [gate.try_acquire("default", 1) for _ in range(4)]
        assert all(held) and not m.borrow()  # the fleet's 4 are all here: refused
        redis_server.kill()
        for t in held:
            assert t is not None
            gate.release(t)
        from fleet_support import wait_for

        assert wait_for(lambda: m.snapshot()["mode"] == "degraded", 10)
        points: dict[str, list[Any]] = {}
        data = reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points[metric.name] = list(metric.data.data_points)
        assert points["poolguard.fleet.leases"][0].value == 4
        assert points["poolguard.fleet.degraded"][0].value == 1
        assert points["poolguard.fleet.degraded_episodes"][0].value == 1
        outcomes = {p.attributes["outcome"]: p.value for p in points["poolguard.fleet.borrows"]}
        assert outcomes["refused"] == 1
        assert all(
            p.attributes["poolguard.fleet.name"] == "otel" for p in points["poolguard.fleet.leases"]
        )
    finally:
        m.close()
