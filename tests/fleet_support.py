"""Helpers for the fleet tests: private redis-servers and child processes.

Every test gets a redis-server of its own on a free port (``--save "" --appendonly no``: a
restart loses everything, which is exactly the case fleet mode must survive), never the
shared one on 6379. Under ``CI`` a missing binary fails the test; elsewhere it skips and says
how to get one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(msg: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


class RedisServer:
    """One private redis-server: start, SIGSTOP/SIGCONT, kill, restart on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server not found: apt-get install redis-server (or put it on PATH)")
        self.binary = str(binary)
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="poolguard-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        _unavailable(f"redis-server did not start on port {self.port}")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=10)

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (connections accepted by the kernel, nothing answered)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: every key is gone (no persistence)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(pred: Callable[[], object], timeout: float = 20.0, every: float = 0.02) -> bool:
    """Poll ``pred`` until truthy; generous bounds: 2 cores are shared by many test runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def fleet_keys(server: RedisServer, name: str) -> dict[str, Any]:
    """What the fleet ``name`` holds in Redis: leases per member and quarantine entries."""
    c = server.client()
    try:
        p = f"poolguard:{{{name}}}:"
        return {
            "leases": {k: int(v) for k, v in c.hgetall(p + "leases").items()},
            "quarantined": sorted(k[len(p) + 2 :] for k in c.scan_iter(p + "q:*")),
        }
    finally:
        c.close()


# -- child processes -----------------------------------------------------------------------
#: Counts checkouts held across processes, atomically, in the test's own Redis keys: one
#: hash field per child (so a child killed with SIGKILL is dropped by its parent) and the
#: highest total ever seen.
_HOLD = """
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
local total = 0
for _, x in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(x) end
local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
if total > peak then redis.call('SET', KEYS[2], total) end
return total
"""


class HoldCounter:
    """The fleet-wide number of checkouts held right now, and its peak (test keys)."""

    def __init__(self, url: str, tag: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        self.keys = [f"test:{tag}:held", f"test:{tag}:peak"]
        self.script = self.client.register_script(_HOLD)

    def add(self, who: str, n: int) -> int:
        return int(self.script(keys=self.keys, args=[who, n]))

    def drop(self, who: str) -> None:
        self.client.hdel(self.keys[0], who)

    def peak(self) -> int:
        return int(self.client.get(self.keys[1]) or 0)

    def now(self) -> int:
        return sum(int(x) for x in self.client.hvals(self.keys[0]))


def gate_worker(
    url: str,
    name: str,
    who: str,
    fleet_kw: dict[str, Any],
    pool: int,
    threads: int,
    duration: float,
    hold: float,
    out: Any,
    skew: float = 0.0,
) -> None:
    """A child process: one member over a real Gate, ``threads`` threads checking out slots
    (borrowing when the gate is full, as the guard does) and holding each for ``hold`` s.
    ``skew`` moves this process's wall clock (``time.time``), as another host's would be.
    Puts a result dict on ``out`` when done (a child killed mid-run puts nothing)."""
    import threading as th

    if skew:
        real = time.time
        time.time = lambda: real() + skew  # type: ignore[assignment]

    from poolguard.fleet import RedisFleet
    from poolguard.observe.alerts import Alerter
    from poolguard.policy.gate import Gate
    from poolguard.policy.quarantine import Quarantine

    gate = Gate(pool)
    member = RedisFleet(url, name=name, **fleet_kw).join(
        gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=pool
    )
    counter = HoldCounter(url, name)
    stop = time.monotonic() + duration
    got = [0, 0]  # acquired, refused
    lock = th.Lock()

    def loop() -> None:
        while time.monotonic() < stop:
            t = gate.try_acquire("default", 1)
            if t is None and member.borrow():
                t = gate.try_acquire("default", 1)
            if t is None:
                t = gate.acquire("default", 1, 0.2)
            if t is None:
                with lock:
                    got[1] += 1
                continue
            counter.add(who, 1)
            time.sleep(hold)
            counter.add(who, -1)
            gate.release(t)
            with lock:
                got[0] += 1

    ts = [th.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    snap = member.snapshot()
    member.close()
    g = gate.snapshot()
    out.put(
        {
            "who": who,
            "acquired": got[0],
            "refused": got[1],
            "held": g.held,
            "waiting": g.waiting,
            "fleet": snap,
        }
    )


def spawn(target: Callable[..., None], *args: Any) -> Any:
    """Start ``target(*args)`` in a fresh interpreter (spawn: no inherited threads)."""
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


def queue() -> Any:
    import multiprocessing as mp

    return mp.get_context("spawn").Queue()


def live_leases(server: RedisServer, name: str) -> dict[str, int]:
    """Leases in Redis that have not expired (by Redis's clock): what a test must leave at
    zero. A member killed with SIGKILL leaves a row behind that expires within one TTL."""
    c = server.client()
    try:
        p = f"poolguard:{{{name}}}:"
        sec, usec = c.time()
        now = sec * 1000 + usec // 1000
        alive = {m for m, exp in c.zrange(p + "expiry", 0, -1, withscores=True) if exp > now}
        return {k: int(v) for k, v in c.hgetall(p + "leases").items() if k in alive}
    finally:
        c.close()


def private_redis() -> Iterator[RedisServer]:
    """A private redis-server for one test (a fixture body: ``yield from private_redis()``)."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def guard_worker(
    db_url: str,
    redis_url: str,
    name: str,
    fleet_kw: dict[str, Any],
    guard_kw: dict[str, Any],
    sql: str,
    duration: float,
    every: float,
    out: Any,
    ctl: Any,
    threads: int = 1,
) -> None:
    """A child process: ``PoolGuard(engine, fleet=RedisFleet(...))`` with ``threads``
    threads running ``sql`` every ``every`` seconds for ``duration`` s, each outcome stamped
    with ``time.time()`` (one host, one clock). ``ctl`` takes ("release", sql) and
    ("stop",). Puts {"ready": True} once the guard joined, then the result: events,
    ``stats()["fleet"]``, the largest capacity its gate had while degraded, the leak check."""
    import queue as q
    import threading as th

    import sqlalchemy as sa

    from poolguard import PoolGuard, PoolSaturated, QueryQuarantined, QueryTimeout
    from poolguard.fleet import RedisFleet

    engine = sa.create_engine(db_url, pool_size=guard_kw.pop("pool_size", 3), max_overflow=0)
    guard = PoolGuard(engine, fleet=RedisFleet(redis_url, name=name, **fleet_kw), **guard_kw)
    out.put({"ready": True})
    events: list[tuple[float, str]] = []
    stop = time.monotonic() + duration
    halt = th.Event()
    worst = [0, 0]  # the largest capacity while degraded, and the base share then

    def loop() -> None:
        while time.monotonic() < stop and not halt.is_set():
            t0 = time.time()
            try:
                with engine.connect() as c:
                    c.execute(sa.text(sql))
                kind = "ok"
            except QueryQuarantined:
                kind = "quarantined"
            except QueryTimeout:
                kind = "timeout"
            except PoolSaturated:
                kind = "saturated"
            except Exception as e:
                kind = f"error:{type(e).__name__}"
            events.append((t0, kind))
            halt.wait(max(0.0, min(every, stop - time.monotonic())))

    ts = [th.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    while time.monotonic() < stop:
        try:
            cmd = ctl.get(timeout=0.01)
        except q.Empty:
            cmd = None
        snap = guard.stats()["fleet"]
        if snap["mode"] == "degraded" and snap["capacity"] > worst[0]:
            worst[:] = [snap["capacity"], snap["share"]]
        if cmd is None:
            continue
        if cmd[0] == "stop":
            break
        if cmd[0] == "release":
            guard.release(cmd[1])
            events.append((time.time(), "released"))
    halt.set()
    for t in ts:
        t.join()
    fleet = guard.stats()["fleet"]
    g = guard.gate.snapshot()
    leak = {"held": g.held, "waiting": g.waiting, "checkedout": engine.pool.checkedout()}
    guard.close()
    engine.dispose()
    out.put(
        {
            "events": sorted(events),
            "fleet": fleet,
            "degraded_capacity": worst,
            "leak": leak,
        }
    )


def cancel_worker(
    url: str, name: str, fleet_kw: dict[str, Any], pool: int, n: int, members: int, out: Any
) -> None:
    """A child process: ``n`` asyncio checkouts against a full gate (borrowing first, as the
    guard does), each cancelled after a random 0-5 ms, in the borrow's round trip or in the
    gate's queue. Reports the gate and the member after everything settled."""
    import asyncio
    import random

    from poolguard.fleet import RedisFleet
    from poolguard.observe.alerts import Alerter
    from poolguard.policy.gate import Gate
    from poolguard.policy.quarantine import Quarantine

    gate = Gate(pool)
    member = RedisFleet(url, name=name, **fleet_kw).join(
        gate=gate, quarantine=Quarantine(), alerts=Alerter(), pool_capacity=pool
    )
    rnd = random.Random(os.getpid())
    # Start together: both members in, each at its base share.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = member.snapshot()
        if snap["members"] >= members and gate.capacity == snap["share"]:
            break
        time.sleep(0.02)

    async def one() -> None:
        if await member.borrow_async():
            t = gate.try_acquire("default", 1)
            if t is not None:
                gate.release(t)
                return
        t = await gate.acquire_async("default", 1, 5.0)
        if t is not None:
            try:
                await asyncio.sleep(0.001)
            finally:
                gate.release(t)

    async def main() -> dict[str, Any]:
        holders = [gate.try_acquire("default", 1) for _ in range(gate.capacity)]
        loop = asyncio.get_running_loop()
        tasks = []
        for i in range(n):
            task = asyncio.ensure_future(one())
            loop.call_later(rnd.uniform(0, 0.005), task.cancel)
            tasks.append(task)
            if i % 20 == 0:
                await asyncio.sleep(0.001)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for h in holders:
            if h is not None:
                gate.release(h)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        errors = [type(r).__name__ for r in results if isinstance(r, Exception)]
        return {"cancelled": cancelled, "errors": errors}

    r = asyncio.run(main())
    # Idle now: within a heartbeat or two the member holds its base share and nothing more.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and member.snapshot()["borrowed"]:
        time.sleep(0.05)
    snap = member.snapshot()
    g = gate.snapshot()
    member.close()
    out.put({**r, "held": g.held, "waiting": g.waiting, "fleet": snap})
