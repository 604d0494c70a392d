"""The outage replay at fleet scale: several uvicorn processes of the replay app, one fleet
cap below the sum of their pools, one load generator in front of them all.

Scenarios (healthy reads at 50 requests/s spread round-robin over the live processes; the
rogue from a third into the run to its end):

- ``a``: ``select pg_sleep(30)`` twice a second, 4 processes;
- ``b``: ``select pg_sleep(0.8)`` at 25 requests/s, 4 processes;
- ``scale``: as (b), starting with 2 processes and adding 4 more mid-way through the rogue
  phase (an autoscaler reacting to latency).

Measured: the run's server sessions in ``pg_stat_activity`` every 20 ms (all of them, and
the busy ones: not ``idle``) against the cap; rogue time-outs before the first quarantine
refusal (fleet-wide strikes until quarantine); healthy success. Needs PostgreSQL on
127.0.0.1:5432 (trust auth) and redis-server on PATH (a private one is started).

    python -m benchmarks.fleet.replay [--scenario a|b|scale|all] [--duration 30] [--db test_h6]

Writes ``benchmarks/results/fleet_replay.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from benchmarks.fleet.redis_server import PrivateRedis

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fleet_replay.json"
CAP, POOL = 20, 15  # four processes' pools sum to 60: three times the cap
SCENARIOS: dict[str, dict[str, Any]] = {
    "a": {"rogue_seconds": 30.0, "rogue_rps": 2.0, "procs": 4, "scale_to": 0},
    "b": {"rogue_seconds": 0.8, "rogue_rps": 25.0, "procs": 4, "scale_to": 0},
    "scale": {"rogue_seconds": 0.8, "rogue_rps": 25.0, "procs": 2, "scale_to": 6},
}
HEALTHY_RPS = 50.0
CLIENT_TIMEOUT = 10.0


@dataclass
class Outcome:
    kind: str
    at: float  # intended send time, seconds from the start
    status: int
    label: str
    latency: float
    member: int = -1  # index of the process it was sent to
    detail: str = ""  # a refusal's problem document: its kind, reason and partition
    wall: float = 0.0  # time.time() when it was sent, to line up with member traces


@dataclass
class Fleet:
    dsn: str
    redis: str
    tag: str
    trace_dir: str | None = None
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def start(self, n: int) -> None:
        new = []
        for _ in range(n):
            extra = []
            if self.trace_dir is not None:
                extra = ["--trace", f"{self.trace_dir}/member-{len(self.procs)}.jsonl"]
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.fleet.app",
                    "--dsn",
                    self.dsn,
                    "--redis",
                    self.redis,
                    "--name",
                    self.tag,
                    "--cap",
                    str(CAP),
                    "--tag",
                    self.tag,
                    *extra,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs.append(p)
            new.append(p)
        for p in new:
            assert p.stdout is not None
            port = json.loads(p.stdout.readline())["port"]
            deadline = time.monotonic() + 20
            # Ready (as a readiness probe would say) once it answers and holds a lease.
            while time.monotonic() < deadline:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/fleet", timeout=2)
                    if r.status_code == 200 and r.json()["fleet"]["capacity"] > 0:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            self.ports.append(port)

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for port in self.ports:
            try:
                out.append(httpx.get(f"http://127.0.0.1:{port}/fleet", timeout=5).json())
            except httpx.HTTPError:
                pass
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def sampler(dsn: str, tag: str, stop: threading.Event, out: list[tuple[int, int]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.is_set():
            row = c.execute(
                "select count(*), count(*) filter (where state <> 'idle') "
                "from pg_stat_activity where application_name = %s",
                (tag,),
            ).fetchone()
            assert row is not None
            out.append((int(row[0]), int(row[1])))
            stop.wait(0.02)


def _label(status: int, body: bytes) -> str:
    if status == 503:
        return "quarantined" if b"quarantine" in body else "refused"
    return str(status)


def _detail(status: int, body: bytes) -> str:
    """A refusal's kind and detail from its problem document ("" for a 200)."""
    if status == 200:
        return ""
    try:
        d = json.loads(body)
        kind = str(d.get("type", "")).rsplit("/", 1)[-1]
        return f"{kind}: {d.get('detail', '')}"
    except (ValueError, AttributeError):
        return f"{status} (no problem document)"


async def drive(fleet: Fleet, sc: dict[str, Any], duration: float) -> list[Outcome]:
    start = time.monotonic() + 0.5
    rogue_from = duration / 3
    plan = [("read", i / HEALTHY_RPS) for i in range(int(duration * HEALTHY_RPS))]
    n_rogue = int((duration - rogue_from) * sc["rogue_rps"])
    plan += [("rogue", rogue_from + i / sc["rogue_rps"]) for i in range(n_rogue)]
    plan.sort(key=lambda x: x[1])
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=4000)
    async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT) as client:

        async def send(i: int, kind: str, at: float) -> None:
            member = i % len(fleet.ports)
            port = fleet.ports[member]
            path = "/item/7" if kind == "read" else f"/report?seconds={sc['rogue_seconds']}"
            wall = time.time()
            detail = ""
            try:
                r = await client.get(f"http://127.0.0.1:{port}{path}")
                status, label = r.status_code, _label(r.status_code, r.content)
                detail = _detail(r.status_code, r.content)
            except httpx.HTTPError:
                status, label = 0, "client_timeout"
            latency = time.monotonic() - start - at
            outcomes.append(Outcome(kind, at, status, label, latency, member, detail, wall))

        tasks = []
        scaled = False
        for i, (kind, at) in enumerate(plan):
            if sc["scale_to"] and not scaled and at >= duration / 2:
                scaled = True
                extra = sc["scale_to"] - sc["procs"]
                asyncio.get_running_loop().run_in_executor(None, fleet.start, extra)
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, kind, at)))
        await asyncio.gather(*tasks)
    return outcomes


def run(name: str, duration: float, db: str, trace_dir: str | None = None) -> dict[str, Any]:
    sc = SCENARIOS[name]
    dsn = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    raw = f"host=127.0.0.1 port=5432 user=postgres dbname={db}"
    tag = f"fleet-replay-{name}-{os.getpid()}"
    with psycopg.connect(raw, autocommit=True) as c:
        c.execute("drop table if exists fleet_replay_items")
        c.execute("create table fleet_replay_items (id int primary key, val int not null)")
        c.execute("insert into fleet_replay_items select g, 0 from generate_series(1, 1000) g")
    redis = PrivateRedis()
    fleet = Fleet(dsn, redis.url, tag, trace_dir)
    stop, samples = threading.Event(), []
    try:
        fleet.start(sc["procs"])
        th = threading.Thread(target=sampler, args=(raw, tag, stop, samples))
        th.start()
        outcomes = asyncio.run(drive(fleet, sc, duration))
        stats = fleet.stats()
        stop.set()
        th.join(10)
    finally:
        stop.set()
        fleet.stop()
        redis.stop()
        with psycopg.connect(raw, autocommit=True) as c:
            c.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name = %s",
                (tag,),
            )
    healthy = [o for o in outcomes if o.kind == "read"]
    rogue = sorted((o for o in outcomes if o.kind == "rogue"), key=lambda o: o.at + o.latency)
    first_q = next((o.at + o.latency for o in rogue if o.label == "quarantined"), None)
    timeouts_before = sum(
        1 for o in rogue if o.status == 504 and (first_q is None or o.at + o.latency <= first_q)
    )
    lat = sorted(o.latency for o in healthy if o.status == 200)
    return {
        "scenario": name,
        **sc,
        "cap": CAP,
        "pool_per_process": POOL,
        "duration": duration,
        "peak_sessions": max((t for t, _ in samples), default=0),
        "peak_busy_sessions": max((b for _, b in samples), default=0),
        "samples": len(samples),
        "healthy": len(healthy),
        "healthy_ok": round(sum(o.status == 200 for o in healthy) / max(1, len(healthy)), 5),
        "healthy_statuses": _count(o.label for o in healthy),
        "healthy_p50_ms": round(lat[len(lat) // 2] * 1e3, 1) if lat else None,
        "healthy_p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 1) if lat else None,
        "rogue_statuses": _count(o.label for o in rogue),
        "rogue_timeouts_before_quarantine": timeouts_before if first_q is not None else None,
        "timeline": _timeline(healthy, duration),
        "healthy_refusals": [
            {
                "at": round(o.at, 3),
                "wall": round(o.wall, 3),
                "member": o.member,
                "latency_ms": round(o.latency * 1e3, 1),
                "detail": o.detail or o.label,
            }
            for o in healthy
            if o.status != 200
        ],
        "members_at_end": len(stats),
        "strikes_sent": sum(s["fleet"]["quarantine"]["strikes_sent"] for s in stats),
        "remote_opened": sum(s["fleet"]["quarantine"]["remote_opened"] for s in stats),
        "degraded_episodes": sum(s["fleet"]["degraded_episodes"] for s in stats),
        "leases_at_end": [s["fleet"]["leases"] for s in stats],
        "refusals_by_member": [s.get("refusals", {}) for s in stats],
    }


def _timeline(healthy: list[Outcome], duration: float) -> dict[str, list[Any]]:
    """Per second of intended send time: healthy requests not answered 200, and the worst
    latency (ms)."""
    n = int(duration) + 1
    bad, worst = [0] * n, [0.0] * n
    for o in healthy:
        i = min(n - 1, int(o.at))
        bad[i] += o.status != 200
        worst[i] = max(worst[i], round(o.latency * 1e3, 1))
    return {"not_ok": bad, "max_ms": worst}


def _count(labels: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in labels:
        out[x] = out.get(x, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all"])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--db", default="test_h6")
    ap.add_argument(
        "--trace", default=None, help="directory: each member appends its gate every 20 ms"
    )
    ap.add_argument("--out", default=str(RESULTS), help="results file (JSON, merged)")
    args = ap.parse_args(argv)
    results = Path(args.out)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    data = json.loads(results.read_text()) if results.exists() else {}
    for n in names:
        r = run(n, args.duration, args.db, args.trace)
        data[n] = r
        print(json.dumps(r, indent=2), flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
