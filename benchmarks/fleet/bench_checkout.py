"""What fleet mode costs a checkout: within the base share (goal: no Redis round trip) and
when borrowing (goal: p99 < 1 ms on loopback).

1. ``with engine.connect(): pass`` on SQLite (a file, QueuePool of 5) through
   ``PoolGuard(engine)`` and ``PoolGuard(engine, fleet=RedisFleet(...))``, alternating
   rounds; the private redis-server's EVALSHA count says how many round trips the loop made
   (the heartbeat's, once a second, are all there should be).
2. ``borrow()`` and ``borrow_async()`` on a real member whose gate is full while the fleet
   has leases free: one EVALSHA each; per-call wall time, p50/p99/max.

    python -m benchmarks.fleet.bench_checkout [--n 20000] [--borrows 2000]

Writes ``benchmarks/results/fleet_checkout.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _borrow_loop(member: Any, gate: Gate, n: int) -> tuple[list[float], int]:
    times, granted = [], 0
    for _ in range(n):
        held = _fill(gate)
        t0 = time.perf_counter()
        granted += member.borrow()
        times.append(time.perf_counter() - t0)
        for t in held:
            gate.release(t)
        member._heartbeat()  # idle again: the borrowed lease goes back
    return times, granted


async def _borrow_loop_async(member: Any, gate: Gate, n: int) -> tuple[list[float], int]:
    await member.borrow_async()  # the loop's client connects once, as in an app
    member._heartbeat()
    times, granted = [], 0
    for _ in range(n):
        held = _fill(gate)
        t0 = time.perf_counter()
        granted += await member.borrow_async()
        times.append(time.perf_counter() - t0)
        for t in held:
            gate.release(t)
        member._heartbeat()
    return times, granted


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
    try:
        for label in ("sync", "async"):
            calls0 = redis.evalsha_calls()
            if label == "sync":
                times, granted = _borrow_loop(member, gate, n)
            else:
                times, granted = asyncio.run(_borrow_loop_async(member, gate, n))
            calls = redis.evalsha_calls() - calls0 - n  # minus the hand-run heartbeats
            out[label] = {
                "borrows": n,
                "granted": granted,
                "round_trips_per_borrow": round(calls / n, 3),
                "p50_ms": round(_pct(times, 0.5) * 1e3, 3),
                "p99_ms": round(_pct(times, 0.99) * 1e3, 3),
                "max_ms": round(max(times) * 1e3, 3),
            }
    finally:
        member.close()
        other.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="checkouts per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--borrows", type=int, default=2000)
    args = ap.parse_args(argv)
    redis = PrivateRedis()
    try:
        result = {
            "base_share": bench_base_share(redis, args.n, args.rounds),
            "borrow": bench_borrow(redis, args.borrows),
        }
    finally:
        redis.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
