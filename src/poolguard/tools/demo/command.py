"""``poolguard demo``: its arguments, the two phases in order, and what it prints."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from typing import NoReturn

from poolguard.tools.demo.phase import run_phase
from poolguard.tools.demo.progress import Progress
from poolguard.tools.demo.report import render_table, report_json, summary_line
from poolguard.tools.demo.results import PhaseResult
from poolguard.tools.demo.scenario import (
    CONTRAST_DURATION,
    DEFAULT_DURATION,
    HEALTHY_RATE,
    MAX_DURATION,
    MIN_DURATION,
    PATIENCE,
    ROGUE_RATE,
)
from poolguard.tools.demo.workload import DemoError, Workload, workload_for

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Errors are one line and exit 2, like the other ``poolguard`` commands."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not MIN_DURATION <= value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_DURATION:g} and {MAX_DURATION:g} seconds, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="poolguard demo",
        description=(
            "Replay the outage poolguard was born from: a web app with healthy endpoints and "
            "one rogue query, under steady load, first without poolguard (SQLAlchemy's "
            "defaults), then with PoolGuard(engine) and PoolGuardMiddleware. Runs on an "
            "embedded SQLite database unless --database-url says otherwise."
        ),
    )
    parser.add_argument(
        "--duration",
        type=_duration,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"seconds of load per phase (default {DEFAULT_DURATION:g}); the rogue fills the "
        f"unprotected pool after about 6 s, so use {CONTRAST_DURATION:g} or more to see the "
        "outage",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="run on this database instead (postgresql+psycopg://..., mariadb+pymysql://...); "
        "nothing is created there, and credentials are never printed",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON (progress goes to stderr)"
    )
    return parser


async def _run(
    workload: Workload, duration: float, progress: Progress
) -> tuple[PhaseResult, PhaseResult]:
    progress.line(
        f"poolguard demo on {workload.label}: {HEALTHY_RATE:g} healthy req/s, "
        f"{ROGUE_RATE:g} rogue req/s, {duration:g} s per phase, clients give up after "
        f"{PATIENCE:g} s"
    )
    without = await run_phase("WITHOUT poolguard", False, workload, duration, progress)
    progress.line(summary_line(without))
    with_ = await run_phase("WITH poolguard", True, workload, duration, progress)
    progress.line(summary_line(with_))
    return without, with_


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 done, 2 bad arguments or unusable database,
    130 interrupted). ``--help`` and argument errors return too, they never raise."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    tmpdir = tempfile.mkdtemp(prefix="poolguard-demo-")
    started = time.monotonic()
    try:
        try:
            workload = workload_for(args.database_url, tmpdir)
            workload.check()
        except DemoError as err:
            print(f"poolguard demo: {err}", file=sys.stderr)
            return 2
        progress = Progress(sys.stderr if args.json else sys.stdout)
        if args.duration < CONTRAST_DURATION:
            progress.line(
                f"note: with --duration under {CONTRAST_DURATION:g} s the outage has little time "
                "to show (the rogue fills the unprotected pool after about 6 s)"
            )
        try:
            without, with_ = asyncio.run(_run(workload, args.duration, progress))
        except KeyboardInterrupt:
            print("\npoolguard demo: interrupted", file=sys.stderr)
            return 130
        if args.json:
            report = report_json(workload, args.duration, without, with_)
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(report, indent=2))
            return 0
        print()
        print(render_table(without, with_))
        alerts = with_.alerts
        if alerts:
            print()
            print("poolguard's alerts during the WITH phase:")
            for a in alerts:
                print(f"  {a}")
        print()
        threads = ", ".join(sorted(set(without.endpoint_threads) | set(with_.endpoint_threads)))
        print(
            f"Success is a 2xx within the clients' {PATIENCE:g} s patience; latencies run from "
            "each request's intended send time (open loop), failures included.\n"
            f"def endpoints ran on: {threads or '-'} (Starlette's thread pool, as under "
            f"uvicorn). Total {time.monotonic() - started:.1f} s."
        )
        return 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
