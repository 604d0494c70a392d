"""Closed-loop load on fast routes, with and without poolguard: refusals and goodput.

A guard that refuses healthy work gets uninstalled, so this measures what zero-config
poolguard costs a healthy app that is simply busy: N clients, each sending its next request
when the last answer arrives (a closed loop never offers more than the stack serves), on the
outage replay's app (FastAPI ``def`` endpoints on anyio's 40-thread pool, SQLAlchemy's
default pool of 5 + 10, psycopg 3, one uvicorn worker in a subprocess). Three of four
requests read a row by primary key, one in four updates a row (never the same row twice in
a row, never the replay's hot row).

Both apps are served at once, in two processes; for each client count the load alternates
between them in slices (2 s measured each, after 0.5 s of warm-up), in ABBA order, so that
the machine's drifting load weighs on both alike. A pair's goodput ratio is poolguard's
successful requests/s over the plain app's; the figures reported are medians over the pairs
(9 per client count by default). Refusals are every answer that is not 200 in poolguard
mode, warm-ups included (any at all is a failure), cross-checked against
``stats()["refusals"]``.

    python benchmarks/bench_closed_loop.py       # 9 pairs x (16, 30, 60), ~3 min
    python benchmarks/bench_closed_loop.py --json benchmarks/results/closed_loop.json
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
#: Unmeasured seconds before each slice: connections opened, the pool warm.
WARM_UP = 0.5


async def closed_loop(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` workers for ``seconds``: each sends its next request on the last answer."""
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    statuses: Counter[str] = Counter()
    warm_statuses: Counter[str] = Counter()
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
                if not measure:
                    warm_statuses[label] += 1  # not timed, but a refusal is a refusal
                elif t1 <= until:
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
        "warm_up_statuses": dict(warm_statuses),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * p99, 1) if p99 is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="16,30,60", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per slice")
    parser.add_argument("--runs", type=int, default=9, help="slice pairs per client count")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/closed_loop_logs"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.runs <= 15 or not 1 <= args.seconds <= 60:
        parser.error("--runs within [1, 15], --seconds within [1, 60]")

    reset_table()
    runs: list[dict[str, Any]] = []
    tag = f"closed_loop_{os.getpid()}"
    with contextlib.ExitStack() as stack:
        servers = {
            m: stack.enter_context(
                Server(m, f"{tag}_{m}", 0.0, args.log_dir / f"closed_loop_{m}.log")
            )
            for m in MODES
        }
        for n in counts:
            for r in range(args.runs):
                # ABBA: the order alternates, so a drift of the machine's load within a
                # pair weighs on both modes alike.
                order = MODES if r % 2 == 0 else MODES[::-1]
                cells = {
                    m: asyncio.run(closed_loop(servers[m].url, n, args.seconds)) for m in order
                }
                for cell in cells.values():
                    every = Counter(cell["statuses"]) + Counter(cell["warm_up_statuses"])
                    cell["refused"] = sum(v for k, v in every.items() if k != "200")
                base = max(cells["defaults"]["goodput_rps"], 1e-9)
                ratio = cells["poolguard"]["goodput_rps"] / base
                runs.append({"run": r, "clients": n, "ratio": round(ratio, 3), **cells})
                pg = cells["poolguard"]
                print(
                    f"clients {n} pair {r}: defaults {cells['defaults']['goodput_rps']} rps, "
                    f"poolguard {pg['goodput_rps']} rps (ratio {ratio:.3f}), refused "
                    f"{pg['refused']} {pg['statuses']}",
                    flush=True,
                )
        stats = servers["poolguard"].stats() or {}
    guard = stats.get("guard") or {}
    summary: dict[str, Any] = {}
    for n in counts:
        mine = [x for x in runs if x["clients"] == n]
        summary[str(n)] = {
            "ratio_median": round(statistics.median(x["ratio"] for x in mine), 3),
            "ratio_min": min(x["ratio"] for x in mine),
            "ratio_max": max(x["ratio"] for x in mine),
            "refused_total": sum(x["poolguard"]["refused"] for x in mine),
            "poolguard_requests": sum(sum(x["poolguard"]["statuses"].values()) for x in mine),
            "defaults_non_200_total": sum(x["defaults"]["refused"] for x in mine),
            "defaults_rps_median": statistics.median(x["defaults"]["goodput_rps"] for x in mine),
            "poolguard_rps_median": statistics.median(x["poolguard"]["goodput_rps"] for x in mine),
            "pairs": len(mine),
        }
    summary["refusals_in_stats"] = guard.get("refusals", {})
    if "probe" in stats:
        summary["probe"] = stats["probe"]
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        out = {
            "run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds_per_slice": args.seconds,
            "load_average": os.getloadavg(),
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
