"""Open-loop load: a fixed schedule of intended send times, latency measured from them.

Each request has an intended send time on a fixed schedule. The dispatcher starts it at that
time (or as soon after as the event loop can), and its latency is measured from the *intended*
time, so queueing anywhere (client, server, pool) counts: the coordinated-omission-free way.
A request that has no answer 10 s after its intended time is a client time-out (a failure).

While the load runs, ``pg_stat_activity`` is polled every 100 ms for the number of server
connections whose ``application_name`` is the run's tag (so other users of the database do
not count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import psycopg

from .app import DB_NAME, HOT_ID, ROWS

CLIENT_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
PG_DSN = f"host=127.0.0.1 port=5432 user=postgres dbname={DB_NAME}"

#: Request kinds. Healthy traffic is READ and WRITE.
READ, WRITE, ROGUE = "read", "write", "rogue"
HEALTHY = (READ, WRITE)


@dataclass(frozen=True)
class Scenario:
    """One row of the postmortem, as traffic.

    ``rogue`` is "slow" (``select pg_sleep(rogue_seconds)`` from ``GET /report``) or "lock"
    (``POST /item/{hot}/audit``: update the hot row, sleep ``rogue_seconds``, commit), sent at
    ``rogue_rps`` during the second phase. ``burst_factor`` > 0 replaces the rogue with healthy
    traffic at that multiple of the pool's measured capacity during the second phase.

    Scenario d's healthy query costs ``pg_sleep(0.25)`` so that twice the pool's capacity
    (15 / 0.25 = 60 requests/s in theory) stays within what one uvicorn worker and one load
    process can carry on a 2-core machine: measured here, the whole stack saturates near
    200-250 requests/s even for the cheapest query, so a 0.1 s query (a 300 requests/s
    burst) would measure the machine, not the pool. Its first phase runs at 25 requests/s
    (under half the capacity): the "unloaded" baseline.
    """

    key: str
    title: str
    healthy_rps: float = 50.0
    write_share: float = 0.0
    rogue: str | None = None
    rogue_seconds: float = 0.0
    rogue_rps: float = 0.0
    healthy_cost: float = 0.0
    burst_factor: float = 0.0


SCENARIOS: dict[str, Scenario] = {
    "a": Scenario(
        "a", "a: pg_sleep(30) twice a second", rogue="slow", rogue_seconds=30.0, rogue_rps=2.0
    ),
    "b": Scenario("b", "b: pg_sleep(0.8) at 25/s", rogue="slow", rogue_seconds=0.8, rogue_rps=25.0),
    "c": Scenario(
        "c",
        "c: hot-row lock held 5 s, once a second",
        write_share=0.5,
        rogue="lock",
        rogue_seconds=5.0,
        rogue_rps=1.0,
    ),
    "d": Scenario(
        "d",
        "d: healthy burst at 2x pool capacity (pg_sleep(0.25) each)",
        healthy_rps=25.0,
        healthy_cost=0.25,
        burst_factor=2.0,
    ),
}


@dataclass(frozen=True)
class Planned:
    t: float  # intended send time, seconds after the run's start
    kind: str
    method: str
    path: str


@dataclass
class Outcome:
    t: float
    kind: str
    status: int  # HTTP status; 0 for a client time-out, -1 for a transport error
    label: str  # "200", "503 query-quarantined", "504 query-timeout/lock", "timeout", ...
    latency: float  # seconds from the intended send time to the answer (or to giving up)
    lag: float = 0.0  # seconds the client sent it after its intended time (its own delay)


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    connections: list[tuple[float, int]]  # (seconds after start, server connections)
    late_sends: int  # requests sent more than 10 ms after their intended time
    max_send_lag: float
    wall: float
    extra: dict[str, object] = field(default_factory=dict)


def phase_start(duration: float) -> float:
    """When the rogue (or the burst) starts: a third into the run (10 s of 30)."""
    return round(duration / 3.0, 3)


def _even(rate: float, start: float, end: float) -> Iterable[float]:
    if rate <= 0 or end <= start:
        return
    n = math.floor((end - start) * rate + 1e-9)
    for i in range(n):
        yield start + i / rate


def plan(scenario: Scenario, duration: float, burst_rps: float = 0.0) -> list[Planned]:
    """The fixed schedule of one run, sorted by intended send time."""
    start = phase_start(duration)
    out: list[Planned] = []
    times = list(_even(scenario.healthy_rps, 0.0, start if burst_rps else duration))
    if burst_rps:
        times += list(_even(burst_rps, start, duration))
    every = round(1 / scenario.write_share) if scenario.write_share else 0
    for i, t in enumerate(times):
        if every and i % every == 1:
            out.append(Planned(t, WRITE, "POST", f"/item/{HOT_ID}/incr"))
        else:
            out.append(Planned(t, READ, "GET", f"/item/{2 + i % (ROWS - 1)}"))
    if scenario.rogue == "slow":
        for t in _even(scenario.rogue_rps, start, duration):
            out.append(Planned(t, ROGUE, "GET", f"/report?seconds={scenario.rogue_seconds:g}"))
    elif scenario.rogue == "lock":
        for t in _even(scenario.rogue_rps, start, duration):
            path = f"/item/{HOT_ID}/audit?seconds={scenario.rogue_seconds:g}"
            out.append(Planned(t, ROGUE, "POST", path))
    out.sort(key=lambda p: p.t)
    return out


def _label(status: int, body: bytes) -> str:
    if status == 200:
        return "200"
    try:
        doc = json.loads(body)
    except ValueError:
        return str(status)
    if not isinstance(doc, dict):
        return str(status)
    kind = doc.get("type")
    if isinstance(kind, str):
        return f"{status} {_problem_name(kind.rsplit('/', 1)[-1], str(doc.get('detail', '')))}"
    err = doc.get("error")
    return f"{status} {err}" if isinstance(err, str) else str(status)


def _problem_name(kind: str, detail: str) -> str:
    """poolguard's problem type, refined by the reason its detail gives (never SQL)."""
    if kind == "query-timeout":
        return kind + ("/lock" if "lock wait" in detail else "")
    if kind == "budget-exceeded":
        match = re.search(r"budget (\w+) exhausted", detail)
    else:  # shed and pool-saturated end with "(reason)"
        match = re.search(r"\((\w+)\)$", detail)
    return f"{kind}/{match.group(1)}" if match else kind


def _client(max_connections: int = 4000) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    # Per-phase limits above the client deadline: the deadline is enforced per request, from
    # its intended send time, by the driver itself.
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(CLIENT_TIMEOUT + 5.0))


async def _poll_connections(
    tag: str, t0: float, stop: asyncio.Event, out: list[tuple[float, int]], max_polls: int
) -> None:
    loop = asyncio.get_running_loop()
    conn = await psycopg.AsyncConnection.connect(
        PG_DSN, autocommit=True, application_name="outage_replay_poller", connect_timeout=5
    )
    try:
        for _ in range(max_polls):
            if stop.is_set():
                break
            cur = await conn.execute(
                "select count(*) from pg_stat_activity where application_name = %s", (tag,)
            )
            row = await cur.fetchone()
            out.append((round(loop.time() - t0, 3), int(row[0]) if row else 0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
    finally:
        await conn.close()


async def warm_up(base_url: str, requests: int = 40, concurrency: int = 5) -> None:
    """Open the pool's first connections and the server's code paths; not measured."""
    async with _client(64) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(f"{base_url}/item/{2 + i % (ROWS - 1)}", timeout=5.0)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))), 30.0)


async def measure_capacity(base_url: str, seconds: float = 4.0, workers: int = 40) -> float:
    """Closed loop, ``workers`` concurrent clients for ``seconds``: successful requests/s."""
    loop = asyncio.get_running_loop()
    async with _client(workers + 8) as client:
        end = loop.time() + seconds
        done = 0

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while loop.time() < end:
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"{base_url}/item/{2 + i % (ROWS - 1)}", timeout=5.0)
                    if r.status_code == 200 and loop.time() <= end:
                        done += 1
                i += workers

        t0 = loop.time()
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(workers))), seconds + 10.0)
        return done / (min(loop.time(), end) - t0)


async def _fetch(client: httpx.AsyncClient, p: Planned, base_url: str) -> tuple[int, bytes]:
    r = await client.request(p.method, base_url + p.path)
    return r.status_code, await r.aread()


async def drive(base_url: str, schedule: list[Planned], tag: str, duration: float) -> LoadResult:
    """Send ``schedule`` open-loop; bounded: it returns by ``duration + 15 s`` at the latest."""
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    connections: list[tuple[float, int]] = []
    stop = asyncio.Event()
    late = 0
    max_lag = 0.0
    async with _client() as client:
        t0 = loop.time() + 0.2
        poller = asyncio.ensure_future(
            _poll_connections(tag, t0, stop, connections, int((duration + 20) / POLL_INTERVAL))
        )

        async def send(p: Planned) -> None:
            intended = t0 + p.t
            lag = loop.time() - intended
            status, label = 0, "timeout"
            try:
                # The deadline runs from the intended send time (asyncio.wait_for rather than
                # asyncio.timeout_at: the project supports Python 3.10).
                left = max(0.0, intended + CLIENT_TIMEOUT - loop.time())
                status, body = await asyncio.wait_for(_fetch(client, p, base_url), left)
                label = _label(status, body)
            except asyncio.TimeoutError:
                pass
            except httpx.HTTPError as e:
                status, label = -1, f"error {type(e).__name__}"
            outcomes.append(Outcome(p.t, p.kind, status, label, loop.time() - intended, lag))

        tasks: set[asyncio.Task[None]] = set()
        try:
            for p in schedule:
                delay = t0 + p.t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = loop.time() - (t0 + p.t)
                max_lag = max(max_lag, lag)
                if lag > 0.01:
                    late += 1
                task = asyncio.ensure_future(send(p))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                # Every send ends by its own deadline; the margin only bounds a stuck loop.
                await asyncio.wait(set(tasks), timeout=CLIENT_TIMEOUT + 5.0)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(set(tasks), timeout=5.0)
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(poller, 5.0)
    outcomes.sort(key=lambda o: o.t)
    return LoadResult(outcomes, connections, late, max_lag, loop.time() - t0)


def run_load(base_url: str, schedule: list[Planned], tag: str, duration: float) -> LoadResult:
    """:func:`drive` on a fresh event loop, after a warm-up."""

    async def main() -> LoadResult:
        await warm_up(base_url)
        return await drive(base_url, schedule, tag, duration)

    started = time.monotonic()
    result = asyncio.run(main())
    result.extra["elapsed_total"] = round(time.monotonic() - started, 2)
    return result
