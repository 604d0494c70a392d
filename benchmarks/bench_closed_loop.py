"""Closed-loop load on fast routes, with and without poolguard: refusals and goodput.

A guard that refuses healthy work gets uninstalled, so this measures what zero-config
poolguard costs a healthy app that is simply busy: N clients, each sending its next request
when the last answer arrives (a closed loop never offers more than the stack serves), on the
outage replay's app (FastAPI ``def`` endpoints on anyio's 40-thread pool, SQLAlchemy's
default pool of 5 + 10, psycopg 3, one uvicorn worker in a subprocess). Three of four
requests read a row by primary key, one in four updates a row (never the same row twice in
a row, never the replay's hot row).

For each client count (16, 30 and 60 by default) and each run, the two modes (``defaults``:
plain SQLAlchemy; ``poolguard``: ``PoolGuard(engine)`` and the middleware, no arguments)
run one after the other, in alternating order, on fresh servers: the goodput ratio of a
run is poolguard's successful requests/s over the plain app's in that same run, and the
figures reported are medians over the runs. Refusals are every answer that is not 200 in
poolguard mode (any at all is a failure), cross-checked against ``stats()["refusals"]``.

    python benchmarks/bench_closed_loop.py     # 3 runs x (16, 30, 60) x 2 modes, ~4 min
    python benchmarks/bench_closed_loop.py --runs 5 --json benchmarks/results/closed_loop.json
    OUTAGE_REPLAY_PROBE=1 python benchmarks/bench_closed_loop.py --runs 1   # + gate samples

Needs PostgreSQL on 127.0.0.1:5432 (``OUTAGE_REPLAY_DB`` names the database, default
``test``) and the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.outage_replay.app import HOT_ID, ROWS  # noqa: E402
from benchmarks.outage_replay.run import Server, code_version, reset_table  # noqa: E402

MODES = ("defaults", "poolguard")
WARM_UP = 2.0


async def closed_loop(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` workers for ``seconds``: each sends its next request on the last answer."""
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    statuses: Counter[str] = Counter()
    ok = 0
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def worker(w: int, until: float, measure: bool) -> None:
            nonlocal ok
            i = w
            while loop.time() < until:
                row = 2 + (i * 7919) % (ROWS - 1)
                if row == HOT_ID:
                    row += 1
                t0 = loop.time()
                try:
                    if i % 4 == 3:
                        r = await client.post(f"{url}/item/{row}/incr")
                    else:
                        r = await client.get(f"{url}/item/{row}")
                    label = str(r.status_code)
                    if r.status_code != 200:
                        with contextlib.suppress(Exception):
                            body = r.json()
                            label += f" {body.get('type', '').rsplit('/', 1)[-1]}"
                            label += f"/{body.get('detail', '')[:40]}" if "shed" in label else ""
                except httpx.HTTPError as e:
                    label = f"error {type(e).__name__}"
                t1 = loop.time()
                if measure and t1 <= until:
                    statuses[label] += 1
                    if label == "200":
                        ok += 1
                        latencies.append(t1 - t0)
                i += clients

        warm = loop.time() + WARM_UP
        await asyncio.gather(*(worker(w, warm, False) for w in range(clients)))
        start = loop.time()
        await asyncio.gather(*(worker(w, start + seconds, True) for w in range(clients)))
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else None
    return {
        "ok": ok,
        "goodput_rps": round(ok / seconds, 1),
        "statuses": dict(statuses),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * p99, 1) if p99 is not None else None,
    }


def run_cell(mode: str, clients: int, seconds: float, log_dir: Path) -> dict[str, Any]:
    tag = f"closed_loop_{os.getpid()}_{mode}_{clients}"
    reset_table()
    with Server(mode, tag, 0.0, log_dir / f"closed_loop_{mode}_{clients}.log") as srv:
        cell = asyncio.run(closed_loop(srv.url, clients, seconds))
        stats = srv.stats() or {}
    guard = stats.get("guard") or {}
    cell["refusals_in_stats"] = guard.get("refusals", {})
    if "probe" in stats:
        cell["probe"] = stats["probe"]
    cell["refused"] = sum(n for k, n in cell["statuses"].items() if k != "200")
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="16,30,60", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/closed_loop_logs"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.runs <= 9 or not 2 <= args.seconds <= 60:
        parser.error("--runs within [1, 9], --seconds within [2, 60]")

    runs: list[dict[str, Any]] = []
    for r in range(args.runs):
        for n in counts:
            order = MODES if r % 2 == 0 else MODES[::-1]
            cells = {m: run_cell(m, n, args.seconds, args.log_dir) for m in order}
            ratio = cells["poolguard"]["goodput_rps"] / max(cells["defaults"]["goodput_rps"], 1e-9)
            runs.append({"run": r, "clients": n, "ratio": round(ratio, 3), **cells})
            pg = cells["poolguard"]
            print(
                f"run {r} clients {n}: defaults {cells['defaults']['goodput_rps']} rps, "
                f"poolguard {pg['goodput_rps']} rps (ratio {ratio:.3f}), poolguard refused "
                f"{pg['refused']} {pg['statuses']} stats {pg['refusals_in_stats']}"
                + (f" probe {pg['probe']}" if "probe" in pg else ""),
                flush=True,
            )
    summary = {}
    for n in counts:
        mine = [x for x in runs if x["clients"] == n]
        summary[str(n)] = {
            "ratio_median": round(statistics.median(x["ratio"] for x in mine), 3),
            "ratio_min": min(x["ratio"] for x in mine),
            "ratio_max": max(x["ratio"] for x in mine),
            "refused_total": sum(x["poolguard"]["refused"] for x in mine),
            "defaults_non_200_total": sum(x["defaults"]["refused"] for x in mine),
            "defaults_rps_median": statistics.median(x["defaults"]["goodput_rps"] for x in mine),
            "poolguard_rps_median": statistics.median(x["poolguard"]["goodput_rps"] for x in mine),
            "runs": len(mine),
        }
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        out = {
            "run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": args.seconds,
            "poolguard_version": code_version(),
            "summary": summary,
            "runs": runs,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    try:
        sys.exit(main())
    finally:
        print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
