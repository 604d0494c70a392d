"""``poolguard check --fleet``: the live fleet's members and shared cap, read from Redis,
replace --workers/--replicas in the worst-case arithmetic (issue #11, item 4)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fleet_support import RedisServer, private_redis
from poolguard.fleet import RedisFleet
from poolguard.observe.alerts import Alerter
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine
from poolguard.tools.cli import main


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


def test_check_reads_the_live_fleet(
    redis_server: RedisServer, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three members whose pools add up to 45 but share a cap of 12: the worst case is 12,
    not 45 (what --workers 3 --replicas 1 would say)."""
    fleet = RedisFleet(redis_server.url, name="shop", max_connections=12, heartbeat=0.25)
    members = [
        fleet.join(gate=Gate(15), quarantine=Quarantine(), alerts=Alerter(), pool_capacity=15)
        for _ in range(3)
    ]
    try:
        args = ["check", "--database-url", pg_url, "--fleet", redis_server.url]
        assert main([*args, "--fleet-name", "shop", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["fleet"]["workers"] == 3 and doc["fleet"]["cap"] == 12
        assert doc["worst_case"] == 12
        assert main([*args, "--fleet-name", "shop"]) == 0
        assert "3 members sharing a cap of 12" in capsys.readouterr().out
        # The same pools without the fleet's cap: 3 x (5 + 10).
        assert main(
            ["check", "--database-url", pg_url, "--workers", "3", "--replicas", "1", "--json"]
        ) in (0, 1)
        assert json.loads(capsys.readouterr().out)["worst_case"] == 45
    finally:
        for m in members:
            m.close()


def test_check_fleet_usage_and_unknown_fleet(
    redis_server: RedisServer, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["check", "--database-url", pg_url, "--fleet", redis_server.url]
    assert main(base) == 2
    assert "--fleet needs --fleet-name" in capsys.readouterr().err
    assert main([*base, "--fleet-name", "x", "--workers", "2"]) == 2
    assert "leave out --workers" in capsys.readouterr().err
    assert main([*base, "--fleet-name", "nobody"]) == 2
    assert "no fleet named 'nobody'" in capsys.readouterr().err
