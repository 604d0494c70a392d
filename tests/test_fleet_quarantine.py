"""The fleet-wide quarantine, across OS processes, on real PostgreSQL and a real Redis.

The rogue statement is ``pg_sleep`` past a 0.2 s statement time-out; literals do not count
in a fingerprint, so ``pg_sleep(0)`` is the same statement, fast: children run it in a loop
and record, with ``time.time()`` (one host, one clock), when it was refused.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from fleet_support import RedisServer, guard_worker, private_redis, queue, spawn, wait_for
from poolguard import QueryQuarantined, QueryTimeout
from poolguard.fleet import RedisFleet

ROGUE = "SELECT pg_sleep(5)"
SAME = "SELECT pg_sleep(0)"  # the same fingerprint, and fast
FLEET = {"max_connections": 12, "lease_ttl": 2.0, "heartbeat": 0.25, "socket_timeout": 0.2}
GUARD = {"statement_timeout": 0.2, "quarantine_threshold": 3, "quarantine_cooldown": 30.0}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


class Child:
    """A guard_worker child with its queues."""

    def __init__(self, pg_url: str, server: RedisServer, name: str, sql: str, **kw: Any) -> None:
        self.out, self.ctl = queue(), queue()
        guard_kw = {**GUARD, **kw.pop("guard", {})}
        self.proc = spawn(
            guard_worker,
            pg_url,
            server.url,
            name,
            {**FLEET, **kw.pop("fleet", {})},
            guard_kw,
            sql,
            kw.pop("duration", 30.0),
            kw.pop("every", 0.02),
            self.out,
            self.ctl,
        )
        assert self.out.get(timeout=60) == {"ready": True}

    def finish(self) -> dict[str, Any]:
        self.ctl.put(("stop",))
        r: dict[str, Any] = self.out.get(timeout=60)
        self.proc.join(30)
        assert r["leak"] == {"held": 0, "waiting": 0, "checkedout": 0}, r["leak"]
        return r


def _times(r: dict[str, Any], kind: str) -> list[float]:
    return [t for t, k in r["events"] if k == kind]


def _trip(guard: Any, engine: sa.Engine, times: int) -> None:
    for _ in range(times):
        with pytest.raises(QueryTimeout), engine.connect() as c:
            c.execute(sa.text(ROGUE))


def _entries(server: RedisServer, name: str) -> list[dict[str, str]]:
    c = server.client()
    try:
        return [c.hgetall(k) for k in c.scan_iter(f"poolguard:{{{name}}}:q:*")]
    finally:
        c.close()


def test_quarantine_refused_everywhere_within_a_second_and_released_everywhere(
    pg_url: str, redis_server: RedisServer, make_guard: Callable[..., Any]
) -> None:
    b = Child(pg_url, redis_server, "shop", SAME)
    c = Child(pg_url, redis_server, "shop", SAME)
    engine = sa.create_engine(pg_url, pool_size=3, max_overflow=0)
    guard = make_guard(engine, fleet=RedisFleet(redis_server.url, name="shop", **FLEET), **GUARD)
    _trip(guard, engine, 3)
    opened = time.time()
    assert [e["fingerprint"] for e in guard.quarantined()]
    time.sleep(1.5)
    b.ctl.put(("release", SAME))  # released on b: everywhere
    assert wait_for(lambda: not guard.quarantined(), 5)
    released = time.time()
    with engine.connect() as conn:  # runs again here
        conn.execute(sa.text(SAME))
    time.sleep(1.0)
    rb, rc = b.finish(), c.finish()
    for r in (rb, rc):
        refused = _times(r, "quarantined")
        assert refused, "never refused"
        assert refused[0] - opened < 1.0, refused[0] - opened
        # Refused, not run, from one second after the open until the release.
        assert not [t for t in _times(r, "ok") if opened + 1.0 < t < released - 0.1]
        assert _times(r, "ok")[-1] > released, "not released here"
    assert rc["fleet"]["quarantine"]["remote_opened"] == 1
    assert rc["fleet"]["quarantine"]["remote_closed"] == 1
    assert _entries(redis_server, "shop") == []
    engine.dispose()


def test_strikes_from_every_member_count_towards_one_threshold(
    pg_url: str, redis_server: RedisServer, make_guard: Callable[..., Any]
) -> None:
    # Two children time out once each and leave; the third strike, here, quarantines the
    # statement although no member saw three time-outs of its own.
    for _ in range(2):
        one = Child(pg_url, redis_server, "strikes", ROGUE, every=60.0, duration=1.0)
        r = one.out.get(timeout=60)
        one.proc.join(30)
        assert [k for _, k in r["events"]] == ["timeout"]
        assert r["fleet"]["quarantine"]["strikes_sent"] == 1
    engine = sa.create_engine(pg_url, pool_size=3, max_overflow=0)
    fleet = RedisFleet(redis_server.url, name="strikes", **FLEET)
    guard = make_guard(engine, fleet=fleet, **GUARD)
    _trip(guard, engine, 1)
    assert wait_for(lambda: guard.quarantined(), 5), "the fleet's third strike did not open it"
    with pytest.raises(QueryQuarantined), engine.connect() as c:
        c.execute(sa.text(SAME))
    (entry,) = _entries(redis_server, "strikes")
    assert entry["timeouts"] == "3" and entry["trips"] == "1"
    guard.release(SAME)
    assert wait_for(lambda: _entries(redis_server, "strikes") == [], 5)
    engine.dispose()


def test_one_probe_per_cooldown_across_the_fleet_and_a_new_member_keeps_the_state(
    pg_url: str, redis_server: RedisServer
) -> None:
    kw = {"guard": {"quarantine_cooldown": 1.0}, "duration": 60.0}
    children = [Child(pg_url, redis_server, "probe", ROGUE, **kw) for _ in range(3)]
    assert wait_for(lambda: _entries(redis_server, "probe"), 30), "never quarantined"
    time.sleep(5.0)
    (before,) = _entries(redis_server, "probe")
    # A member that starts now reads the state: refused from its first execution, and the
    # fleet's entry is not reset (same episode, same cool-down end).
    late = Child(pg_url, redis_server, "probe", SAME, guard={"quarantine_cooldown": 1.0})
    time.sleep(0.5)
    rl = late.finish()
    (after,) = _entries(redis_server, "probe")
    results = [ch.finish() for ch in children]
    assert rl["events"] and rl["events"][0][1] == "quarantined", rl["events"][:3]
    assert "ok" not in {k for _, k in rl["events"]}
    assert int(after["trips"]) >= int(before["trips"])
    assert int(after["opened_at"]) == int(before["opened_at"])
    # Every time-out after the first refusal anywhere (plus a margin for executions that
    # had started) was the fleet's one probe of a cool-down, and each reopened it once.
    first_refusal = min(_times(r, "quarantined")[0] for r in results)
    probes = sorted(t for r in results for t in _times(r, "timeout") if t > first_refusal + 0.5)
    (final,) = _entries(redis_server, "probe")
    assert 1 <= len(probes) <= int(final["trips"]) - 1, (probes, final)
    # Cool-downs double from 1 s: probes are at least a cool-down apart, never together.
    assert all(b - a > 0.9 for a, b in itertools.pairwise(probes)), probes
