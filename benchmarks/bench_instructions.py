"""Instructions per statement and per checkout, counted by valgrind's callgrind.

    python benchmarks/bench_instructions.py [--iterations 300] [--seeds 0,1,2] [--cases ...]
                                            [--json benchmarks/results/instructions.json]
                                            [--src DIR] [--markdown]

Why instructions and not time: on the shared machines this project runs on, wall-clock
figures for the same code swing by 3x from hour to hour, while the number of instructions a
loop executes moves by a fraction of a percent. What poolguard adds is CPU work in the
client, so instructions are its honest measure (they do not show cache misses or a slower
CPU, which is why ``bench_overhead.py`` still times the same loops).

How: each case runs in a fresh child Python under ``valgrind --tool=callgrind
--collect-atstart=no --toggle-collect=sys_call_tracing``. The child sets everything up,
warms the loop up, then runs the measured loop through ``sys.call_tracing``: a C function
nothing else calls, so callgrind counts exactly the loop (no start-up, import or set-up).
``sys.call_tracing`` with no trace function set changes nothing about how the loop runs.
Each case runs with ``PYTHONHASHSEED`` 0, 1 and 2 (set ordering and dict layouts move a
few instructions) and the median is reported.

Cases, each on SQLite in memory, one engine per child:

- per statement, ``conn.execute(text("SELECT 1")).scalar()`` on a connection already checked
  out: ``bare``; ``floor`` (one ``do_execute`` listener that runs the statement and returns
  True: what any listener-based guard cannot go below); ``poolguard`` (``PoolGuard(engine)``,
  OpenTelemetry API only, no SDK); ``poolguard-budget`` (the same inside
  ``guard.budget(deadline=3600)``); ``otel`` (opentelemetry-instrumentation-sqlalchemy,
  API only, no SDK: its tracer is the API's no-op one);
- per checkout + return, ``engine.connect().close()``: ``checkout-bare`` and
  ``checkout-poolguard``.

``--src DIR`` puts DIR first on the child's ``sys.path`` (an unpacked ``git archive`` of an
older commit's ``src/``), to count another version of poolguard with the same script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "instructions.json"
#: The C function the measured loop runs in (see the module docstring).
MARKER = "sys_call_tracing"
STATEMENT_CASES = ("bare", "floor", "poolguard", "poolguard-budget", "otel")
CHECKOUT_CASES = ("checkout-bare", "checkout-poolguard")
CASES = STATEMENT_CASES + CHECKOUT_CASES
#: Against which case each one's added instructions are counted.
BASELINE = dict.fromkeys(STATEMENT_CASES, "bare") | dict.fromkeys(CHECKOUT_CASES, "checkout-bare")
WARMUP = 200


# -- the child: one case, one loop --------------------------------------------------------------
def _child(case: str, n: int) -> None:
    from sqlalchemy import create_engine, event, text

    engine = create_engine("sqlite://")
    stmt = text("SELECT 1")
    guard: Any = None
    closers: list[Callable[[], object]] = [engine.dispose]

    if case == "floor":

        @event.listens_for(engine, "do_execute")
        def _run(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
            cursor.execute(statement, parameters)
            return True

    elif case == "otel":
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        inst = SQLAlchemyInstrumentor()
        # The instrumentation declares sqlalchemy<2.1 and silently does nothing on 2.1
        # without skip_dep_check.
        if inst.instrument(engine=engine, skip_dep_check=True) is None:
            raise SystemExit("SQLAlchemyInstrumentor.instrument() did nothing")
        closers.insert(0, inst.uninstrument)
    elif case in ("poolguard", "poolguard-budget", "checkout-poolguard"):
        from poolguard import PoolGuard

        guard = PoolGuard(engine)
        closers.insert(0, guard.close)

    if case.startswith("checkout"):

        def loop(k: int) -> None:
            connect = engine.connect
            for _ in range(k):
                connect().close()

    else:
        conn = engine.connect()
        closers.insert(0, conn.close)
        execute = conn.execute

        def loop(k: int) -> None:
            for _ in range(k):
                execute(stmt).scalar()

    budget = guard.budget(deadline=3600.0) if case == "poolguard-budget" else None
    if budget is not None:
        budget.__enter__()
    loop(WARMUP)
    if guard is not None:
        # Its scan runs once a second: under valgrind's slowdown, several times at random
        # during the loop, which is no per-statement cost.
        guard._watchdog.stop()
    # What a collection costs depends on everything the process holds: only the objects
    # the loop makes are left for the collector to look at.
    gc.collect()
    gc.freeze()
    sys.call_tracing(loop, (n,))  # the only code callgrind counts
    if budget is not None:
        scope = budget.scope
        budget.__exit__(None, None, None)
        if scope.queries != WARMUP + n:  # the budget really saw every statement
            raise SystemExit(f"budget counted {scope.queries} of {WARMUP + n} statements")
    if guard is not None and case != "checkout-poolguard":
        rows = guard.stats()["statements"]
        if not rows or sum(r["count"] for r in rows) < WARMUP + n:
            raise SystemExit("poolguard did not record the statements")
    for close in closers:
        close()


# -- the parent: valgrind, seeds, medians --------------------------------------------------------
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def count(case: str, seed: int, n: int, src: Path | None) -> int:
    """Instructions the child's measured loop of ``n`` iterations executed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--collect-atstart=no",
            f"--toggle-collect={MARKER}",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            case,
            "--iterations",
            str(n),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{case} (seed {seed}) failed:\n{proc.stderr.decode(errors='replace')[-3000:]}"
            )
        m = _TOTALS.search(out.read_bytes())
        if m is None or int(m.group(1)) == 0:
            raise RuntimeError(
                f"callgrind counted nothing for {case}: is {MARKER} in this Python's symbols?"
            )
        return int(m.group(1))


def measure(
    cases: Sequence[str], seeds: Sequence[int], n: int, src: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for case in cases:
        per_seed = []
        for seed in seeds:
            total = count(case, seed, n, src)
            per_seed.append(total / n)
            log(f"  {case:<20} seed {seed}: {total / n:>10,.0f} instructions per iteration")
        results[case] = {
            "per_iteration": round(statistics.median(per_seed)),
            "per_seed": [round(x, 1) for x in per_seed],
        }
    for case, r in results.items():
        base = results.get(BASELINE[case])
        if base is not None and case != BASELINE[case]:
            added = r["per_iteration"] - base["per_iteration"]
            r["added"] = added
            r["added_pct"] = round(100 * added / base["per_iteration"], 1)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| case | instructions per iteration | added | added % |",
        "|---|---:|---:|---:|",
    ]
    for case, r in results.items():
        added = f"{r['added']:+,}" if "added" in r else ""
        pct = f"{r['added_pct']:+.1f} %" if "added_pct" in r else ""
        lines.append(f"| {case} | {r['per_iteration']:,} | {added} | {pct} |")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    dists = ("sqlalchemy", "opentelemetry-api", "opentelemetry-instrumentation-sqlalchemy")
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    vg = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    out["valgrind"] = vg.stdout.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="measured loop (default 300)")
    parser.add_argument("--seeds", default="0,1,2", help="PYTHONHASHSEED values (default 0,1,2)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"default {','.join(CASES)}")
    parser.add_argument("--json", type=Path, default=None, help=f"write here (e.g. {DEFAULT_JSON})")
    parser.add_argument("--src", type=Path, default=None, help="count the poolguard in this dir")
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.iterations)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    seeds = [int(s) for s in args.seeds.split(",")]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = measure(cases, seeds, args.iterations, args.src, log)
    print(table(results))
    if args.json is not None:
        doc = {
            "method": (
                f"callgrind Ir of {args.iterations} iterations after {WARMUP} warm-up ones, "
                f"collected only inside {MARKER}; median over PYTHONHASHSEED {args.seeds}"
            ),
            "versions": _versions(),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
