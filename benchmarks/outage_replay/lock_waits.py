"""How long legitimate lock waits last: what the default ``lock_timeout`` must stay above.

A lock time-out shorter than a legitimate wait fails healthy requests; a long one lets a
rogue lock holder's victims pile up before the first of them names it (scenario c). So the
default is chosen from the waits healthy traffic produces: writers of one hot row, as in
scenario (c)'s first phase but at up to four times its rate, with no rogue at all. Each rate
runs on a fresh server in ``poolguard`` mode (zero config); the update's duration in
``stats()`` is its lock wait plus a sub-millisecond update, measured by the guard itself.

    python -m benchmarks.outage_replay.lock_waits            # 25, 50, 100 writes/s, ~1 min
    python -m benchmarks.outage_replay.lock_waits --json benchmarks/results/lock_waits.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from .app import HOT_ID, ROWS, WRITE_SQL
from .load import READ, WRITE, Planned, run_load
from .run import Server, code_version, reset_table


def schedule(write_rps: float, read_rps: float, seconds: float) -> list[Planned]:
    out = [
        Planned(i / write_rps, WRITE, "POST", f"/item/{HOT_ID}/incr")
        for i in range(int(write_rps * seconds))
    ]
    out += [
        Planned(i / read_rps, READ, "GET", f"/item/{2 + i % (ROWS - 1)}")
        for i in range(int(read_rps * seconds))
    ]
    return sorted(out, key=lambda p: p.t)


def measure(write_rps: float, seconds: float, log_dir: Path) -> dict[str, Any]:
    tag = f"outage_replay_{os.getpid()}_locks_{int(write_rps)}"
    reset_table()
    with Server("poolguard", tag, 0.0, log_dir / f"lock_waits_{int(write_rps)}.log") as srv:
        result = run_load(srv.url, schedule(write_rps, 25.0, seconds), tag, seconds)
        stats = srv.stats() or {}
    writes = [o for o in result.outcomes if o.kind == WRITE]
    ok = sum(1 for o in writes if o.status == 200)
    update = WRITE_SQL.split(" set ")[0].lower()
    row = next(
        (
            s
            for s in stats.get("guard", {}).get("statements", [])
            if str(s.get("summary", "")).lower().startswith("update")
            or update in str(s.get("normalized", "")).lower()
        ),
        {},
    )
    lat = sorted(o.latency for o in writes)
    return {
        "write_rps": write_rps,
        "writes": len(writes),
        "writes_ok": ok,
        "update_p50_ms": _ms(row.get("p50")),
        "update_p99_ms": _ms(row.get("p99")),
        "update_max_ms": _ms(row.get("max")),
        "request_p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
        "request_max_ms": round(1000 * lat[-1], 1) if lat else None,
    }


def _ms(v: Any) -> float | None:
    return round(1000 * float(v), 1) if isinstance(v, (int, float)) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,50,100", help="hot-row writes per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/outage_replay_logs"))
    args = parser.parse_args(argv)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        row = measure(rate, args.seconds, args.log_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json is not None:
        out = {
            "run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "poolguard_version": code_version(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
