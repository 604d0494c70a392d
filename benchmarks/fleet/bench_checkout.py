"""What fleet mode costs a checkout: within the base share (goal: no Redis round trip) and
when borrowing (goal: p99 < 1 ms on loopback).

1. ``with engine.connect(): pass`` on SQLite (a file, QueuePool of 5) through
   ``PoolGuard(engine)`` and ``PoolGuard(engine, fleet=RedisFleet(...))``, alternating
   rounds; the private redis-server's EVALSHA count says how many round trips the loop made
   (the heartbeat's, once a second, are all there should be).
2. ``borrow()`` and ``borrow_async()`` on a real member whose gate is full while the fleet
   has leases free: one EVALSHA each; per-call wall time, p50/p99/max. Beside each borrow,
   in the same loop and against the same redis-server, a bare redis-py ``PING`` and a
   one-line script's EVALSHA (the floor: what the machine makes of any round trip), the
   load average, and the garbage collections that overlapped a borrow over 1 ms: a tail
   that the bare round trips share is the machine's scheduling, not the borrow's.

    python -m benchmarks.fleet.bench_checkout [--n 20000] [--borrows 5000]

Writes ``benchmarks/results/fleet_checkout.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis as redis_py
import sqlalchemy as sa
from benchmarks.fleet.redis_server import PrivateRedis

from poolguard import PoolGuard
from poolguard.fleet import RedisFleet
from poolguard.observe.alerts import Alerter
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fleet_checkout.json"


def _checkouts(engine: sa.Engine, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with engine.connect():
            pass
    return (time.perf_counter() - t0) / n


def bench_base_share(redis: PrivateRedis, n: int, rounds: int) -> dict[str, Any]:
    path = os.path.join(tempfile.mkdtemp(), "bench.db")
    url = f"sqlite:///{path}"
    plain_e, fleet_e = sa.create_engine(url), sa.create_engine(url)
    plain = PoolGuard(plain_e)
    fleet = PoolGuard(fleet_e, fleet=RedisFleet(redis.url, name="bench", max_connections=40))
    try:
        _checkouts(plain_e, 1000)
        _checkouts(fleet_e, 1000)
        per: dict[str, list[float]] = {"plain": [], "fleet": []}
        calls0, t0 = redis.evalsha_calls(), time.monotonic()
        fleet_time = 0.0
        for _ in range(rounds):
            per["plain"].append(_checkouts(plain_e, n))
            s = time.monotonic()
            per["fleet"].append(_checkouts(fleet_e, n))
            fleet_time += time.monotonic() - s
        calls = redis.evalsha_calls() - calls0
        elapsed = time.monotonic() - t0
        snap = fleet.stats()["fleet"]
    finally:
        plain.close()
        fleet.close()
        plain_e.dispose()
        fleet_e.dispose()
    med = {k: statistics.median(v) * 1e6 for k, v in per.items()}
    return {
        "checkouts_with_fleet": n * rounds,
        "redis_round_trips": calls,
        "heartbeats_expected": round(elapsed / 1.0, 1),
        "round_trips_per_checkout": calls / (n * rounds),
        "us_per_checkout_plain": round(med["plain"], 2),
        "us_per_checkout_fleet": round(med["fleet"], 2),
        "us_added": round(med["fleet"] - med["plain"], 2),
        "borrows": snap["borrows"],
    }


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _fill(gate: Gate) -> list[Any]:
    held = []
    while (t := gate.try_acquire("default", 1)) is not None:
        held.append(t)
    return held


class Floor:
    """A bare redis-py client (the member's socket options) on the same redis-server: one
    PING and one EVALSHA of ``return 1`` per borrow, timed the same way."""

    def __init__(self, url: str) -> None:
        self.client = redis_py.Redis.from_url(url, socket_timeout=0.05)
        self.script = self.client.register_script("return 1")
        self.script()  # loaded and connected before timing
        self.ping: list[float] = []
        self.evalsha: list[float] = []

    def sample(self) -> None:
        t0 = time.perf_counter()
        self.client.ping()
        t1 = time.perf_counter()
        self.script()
        self.ping.append(t1 - t0)
        self.evalsha.append(time.perf_counter() - t1)


class GcPauses:
    """Start and end of every garbage collection while it is installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spans.append((self._start, time.perf_counter()))

    def overlapping(self, slow: list[tuple[float, float]]) -> int:
        return sum(1 for a, z in slow if any(s < z and e > a for s, e in self.spans))


def _borrow_loop(
    member: Any, gate: Gate, n: int, floor: Floor
) -> tuple[list[tuple[float, float]], int]:
    spans, granted = [], 0
    for _ in range(n):
        held = _fill(gate)
        t0 = time.perf_counter()
        granted += member.borrow()
        spans.append((t0, time.perf_counter()))
        for t in held:
            gate.release(t)
        member._heartbeat()  # idle again: the borrowed lease goes back
        floor.sample()
    return spans, granted


async def _borrow_loop_async(
    member: Any, gate: Gate, n: int, floor: Floor
) -> tuple[list[tuple[float, float]], int]:
    await member.borrow_async()  # the loop's client connects once, as in an app
    member._heartbeat()
    spans, granted = [], 0
    for _ in range(n):
        held = _fill(gate)
        t0 = time.perf_counter()
        granted += await member.borrow_async()
        spans.append((t0, time.perf_counter()))
        for t in held:
            gate.release(t)
        member._heartbeat()
        floor.sample()  # blocking, as the heartbeat is: nothing else runs on this loop
    return spans, granted


def _figures(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_pct(xs, 0.5) * 1e3, 3),
        "p99_ms": round(_pct(xs, 0.99) * 1e3, 3),
        "max_ms": round(max(xs) * 1e3, 3),
        "over_1ms": sum(x > 1e-3 for x in xs),
    }


def bench_borrow(redis: PrivateRedis, n: int) -> dict[str, Any]:
    """Each borrow finds the gate full and the fleet with leases free; between borrows the
    member gives the borrowed lease back (a heartbeat, run by hand), so every borrow is the
    real thing: one EVALSHA that grants one lease."""
    gate = Gate(8)
    # Two members share 3: base shares of 1 (the other's pool is 1), one lease to borrow.
    fleet = RedisFleet(
        redis.url,
        name="borrow",
        max_connections=3,
        heartbeat=30.0,
        lease_ttl=120.0,
        refusal_backoff=0.0,
    )
    other = fleet.join(gate=Gate(8), quarantine=Quarantine(), alerts=Alerter(), pool_capacity=1)
    member = fleet.join(gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=8)
    out: dict[str, Any] = {}
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        for label in ("sync", "async"):
            floor = Floor(redis.url)
            load_before = os.getloadavg()[0]
            calls0 = redis.evalsha_calls()
            if label == "sync":
                spans, granted = _borrow_loop(member, gate, n, floor)
            else:
                spans, granted = asyncio.run(_borrow_loop_async(member, gate, n, floor))
            # Minus the hand-run heartbeats and the floor's scripts.
            calls = redis.evalsha_calls() - calls0 - 2 * n
            times = [z - a for a, z in spans]
            slow = [(a, z) for a, z in spans if z - a > 1e-3]
            out[label] = {
                "borrows": n,
                "granted": granted,
                "round_trips_per_borrow": round(calls / n, 3),
                **_figures(times),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "bare_ping": _figures(floor.ping),
                "bare_evalsha_return_1": _figures(floor.evalsha),
                "slow_borrows_during_a_gc": pauses.overlapping(slow),
            }
            floor.client.close()
            pauses.spans.clear()
    finally:
        gc.callbacks.remove(pauses)
        member.close()
        other.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="checkouts per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--borrows", type=int, default=5000)
    ap.add_argument("--only-borrow", action="store_true", help="skip the base-share part")
    ap.add_argument("--out", default=str(RESULTS), help="results file (JSON)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    redis = PrivateRedis()
    try:
        if not args.only_borrow:
            result["base_share"] = bench_base_share(redis, args.n, args.rounds)
        result["borrow"] = bench_borrow(redis, args.borrows)
    finally:
        redis.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
