"""Run the outage replay: scenarios x modes, each against a fresh server subprocess.

    python -m benchmarks.outage_replay.run --scenario a --mode poolguard --duration 30
    python -m benchmarks.outage_replay.run --all            # the whole matrix (about 15 min)
    python -m benchmarks.outage_replay.run --all --quick    # 8 s runs: a smoke test

Results are merged into benchmarks/results/outage_replay.json (a cell run again replaces its
old result) and the markdown table is printed. Every server subprocess and every server
connection a run opened is cleaned up at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg

from .app import MODES, ROWS, TABLE
from .load import (
    HEALTHY,
    PG_DSN,
    ROGUE,
    SCENARIOS,
    WRITE,
    LoadResult,
    Outcome,
    Scenario,
    measure_capacity,
    phase_start,
    plan,
    run_load,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "outage_replay.json"
TAG_PREFIX = "outage_replay_"
BIN = 0.5  # seconds per timeline bin
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


# -- the database -------------------------------------------------------------------------------
def reset_table() -> None:
    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"drop table if exists {TABLE}")
        conn.execute(f"create table {TABLE} (id int primary key, val bigint not null)")
        conn.execute(f"insert into {TABLE} select g, 0 from generate_series(1, %s) g", (ROWS,))
        conn.execute(f"analyze {TABLE}")


def terminate_backends(tag: str) -> int:
    """End the server sessions of one run (pg_sleep(30) outlives its client otherwise)."""
    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = %s and pid <> pg_backend_pid()",
            (tag,),
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0


# -- the server subprocess ---------------------------------------------------------------------
class Server:
    """``benchmarks.outage_replay.app`` in a subprocess; a context manager that always stops it."""

    def __init__(self, mode: str, tag: str, healthy_cost: float, log_path: Path) -> None:
        self.mode = mode
        self.tag = tag
        self.healthy_cost = healthy_cost
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.outage_replay.app",
            "--mode",
            self.mode,
            "--tag",
            self.tag,
            "--healthy-cost",
            str(self.healthy_cost),
        ]
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True
            )
        finally:
            log.close()
        try:
            port = self._read_port()
            self.url = f"http://127.0.0.1:{port}"
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(STARTUP_TIMEOUT)
        if not line or not line[0].strip():
            raise RuntimeError(f"server did not start; see {self.log_path}")
        return int(json.loads(line[0])["port"])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/_bench/ready", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready within {STARTUP_TIMEOUT:g} s; see {self.log_path}")

    def stats(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(self.url + "/_bench/stats", timeout=5.0)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else {"status": r.status_code}

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            with contextlib.suppress(Exception):
                terminate_backends(self.tag)


# -- statistics ----------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, math.ceil(q / 100.0 * len(s)) - 1)
    return s[min(k, len(s) - 1)]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 1)


def ok_rate(outcomes: Sequence[Outcome]) -> float | None:
    if not outcomes:
        return None
    return round(100.0 * sum(o.status == 200 for o in outcomes) / len(outcomes), 2)


def latency_block(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    lat = [o.latency for o in outcomes]
    return {
        "n": len(outcomes),
        "ok_pct": ok_rate(outcomes),
        "p50_ms": ms(pct(lat, 50)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(max(lat) if lat else None),
    }


def is_refused(o: Outcome) -> bool:
    """Refused before dispatch: poolguard's shed answers (in-flight limit or queue delay)."""
    return o.label.startswith("503 shed")


def recovery_time(healthy: Sequence[Outcome], start: float, end: float) -> float | None:
    """Seconds from ``start`` until every later whole 1 s window has >= 99% success."""
    windows = math.floor(end - start)
    rates: list[float] = []
    for k in range(windows):
        w = [o for o in healthy if start + k <= o.t < start + k + 1]
        rates.append(1.0 if not w else sum(o.status == 200 for o in w) / len(w))
    for k in range(windows):
        if all(r >= 0.99 for r in rates[k:]):
            return float(k)
    return None


def timeline(outcomes: Sequence[Outcome], duration: float) -> dict[str, list[Any]]:
    n_bins = math.ceil(duration / BIN)
    t: list[float] = []
    p50: list[float | None] = []
    p99: list[float | None] = []
    err: list[float | None] = []
    refused: list[float | None] = []
    served50: list[float | None] = []
    served99: list[float | None] = []
    n: list[int] = []
    bins: list[list[Outcome]] = [[] for _ in range(n_bins)]
    for o in outcomes:
        if o.kind in HEALTHY:
            bins[min(int(o.t / BIN), n_bins - 1)].append(o)
    for i, b in enumerate(bins):
        lat = [o.latency for o in b]
        t.append(round(i * BIN, 3))
        n.append(len(b))
        p50.append(ms(pct(lat, 50)))
        p99.append(ms(pct(lat, 99)))
        err.append(round(100.0 - (ok_rate(b) or 0.0), 2) if b else None)
        refused.append(round(100.0 * sum(map(is_refused, b)) / len(b), 2) if b else None)
        served = [o.latency for o in b if not is_refused(o)]
        served50.append(ms(pct(served, 50)))
        served99.append(ms(pct(served, 99)))
    return {
        "t": t,
        "n": n,
        "p50_ms": p50,
        "p99_ms": p99,
        "error_pct": err,
        "refused_pct": refused,
        "not_shed_p50_ms": served50,
        "not_shed_p99_ms": served99,
    }


def summarise(
    scenario: Scenario, mode: str, duration: float, result: LoadResult, burst_rps: float
) -> dict[str, Any]:
    start = phase_start(duration)
    healthy = [o for o in result.outcomes if o.kind in HEALTHY]
    rogue = [o for o in result.outcomes if o.kind == ROGUE]
    pre = [o for o in healthy if o.t < start]
    during = [o for o in healthy if o.t >= start]
    out: dict[str, Any] = {
        "scenario": scenario.key,
        "mode": mode,
        "duration_s": duration,
        "phase_start_s": start,
        "healthy": {
            "n": len(healthy),
            "ok_pct": ok_rate(healthy),
            "pre": latency_block(pre),
            "during": latency_block(during),
            "failures": dict(Counter(o.label for o in healthy if o.status != 200)),
        },
        "rogue": {"n": len(rogue), "status": dict(Counter(o.label for o in rogue))},
        "peak_server_connections": max((c for _, c in result.connections), default=None),
        "client": {
            "late_sends_over_10ms": result.late_sends,
            "max_send_lag_ms": ms(result.max_send_lag),
        },
    }
    if scenario.write_share:
        writes = [o for o in during if o.kind == WRITE]
        out["healthy"]["during_writes"] = latency_block(writes)
    if scenario.rogue == "lock":
        out["recovery_s"] = recovery_time(healthy, start, duration)
        q = next((i for i, o in enumerate(rogue) if "quarantined" in o.label), None)
        if q is None:
            out["quarantine"] = None
        else:
            q_at = rogue[q].t + rogue[q].latency
            before = rogue[:q]
            after = [o for o in healthy if o.t >= q_at]
            out["quarantine"] = {
                "observed_at_s": round(q_at - start, 3),
                "rogue_requests_before": q,
                "rogue_statement_timeouts_before": sum(
                    o.label == "504 query-timeout" for o in before
                ),
                "healthy_after": latency_block(after),
            }
    if scenario.burst_factor:
        admitted = [o for o in during if not is_refused(o)]
        refused = [o for o in during if is_refused(o)]
        out["burst"] = {
            "rps": round(burst_rps, 1),
            "admitted": latency_block(admitted),
            "refused": {
                "n": len(refused),
                "p50_ms": ms(pct([o.latency for o in refused], 50)),
                "p99_ms": ms(pct([o.latency for o in refused], 99)),
                "max_ms": ms(max((o.latency for o in refused), default=None)),
                "over_10ms": sum(o.latency > 0.010 for o in refused),
                # The same, measured from when the client actually sent them: what remains
                # once the load process's own scheduling delays are taken out.
                "over_10ms_from_send": sum(o.latency - o.lag > 0.010 for o in refused),
                "max_from_send_ms": ms(max((o.latency - o.lag for o in refused), default=None)),
            },
            "client_timeouts": sum(o.status == 0 for o in during),
        }
    out["goals"] = goals(out)
    out["timeline"] = timeline(result.outcomes, duration)
    out["connections"] = [[t, c] for t, c in result.connections]
    return out


def compact(cell: dict[str, Any]) -> dict[str, Any]:
    """The numbers the goals are judged on, for the tally of repeated runs."""
    h = cell["healthy"]
    out: dict[str, Any] = {
        "ok_pct": h["ok_pct"],
        "during_ok_pct": h["during"]["ok_pct"],
        "pre_p99_ms": h["pre"]["p99_ms"],
        "during_p99_ms": h["during"]["p99_ms"],
        "peak_server_connections": cell["peak_server_connections"],
        "goals": cell["goals"],
    }
    q = cell.get("quarantine")
    if "quarantine" in cell:
        out["rogue_requests_before_quarantine"] = None if q is None else q["rogue_requests_before"]
        out["recovery_s"] = cell["recovery_s"]
    if "burst" in cell:
        b = cell["burst"]
        out["admitted_p99_ms"] = b["admitted"]["p99_ms"]
        out["refused_over_10ms"] = b["refused"]["over_10ms"]
        out["refused_max_ms"] = b["refused"]["max_ms"]
        out["refused_over_10ms_from_send"] = b["refused"].get("over_10ms_from_send")
    return out


def tally(cell: dict[str, Any]) -> str:
    """``"2/3"`` style counts of repeated runs meeting every goal, per goal when they differ."""
    repeats = cell.get("repeats") or []
    if len(repeats) < 2 or not cell.get("goals"):
        return ""
    n = len(repeats)
    every = sum(all(v is True for v in r["goals"].values()) for r in repeats)
    per = {k: sum(r["goals"].get(k) is True for r in repeats) for k in cell["goals"]}
    detail = ", ".join(f"{k} {v}/{n}" for k, v in per.items() if v not in (0, n))
    return f"all goals in {every}/{n} runs" + (f" ({detail})" if detail else "")


def goals(cell: dict[str, Any]) -> dict[str, bool | None] | None:
    """The project's goals for this cell; None for the baseline modes (no goals there)."""
    if not cell["mode"].startswith("poolguard"):
        return None
    h = cell["healthy"]
    pre99 = h["pre"]["p99_ms"]

    def within(v: float | None, base: float | None) -> bool | None:
        return None if v is None or base is None else v <= 1.5 * base

    key = cell["scenario"]
    if key in ("a", "b"):
        return {
            "success_ge_99.9": h["ok_pct"] is not None and h["ok_pct"] >= 99.9,
            "p99_le_1.5x_pre": within(h["during"]["p99_ms"], pre99),
        }
    if key == "c":
        q = cell["quarantine"]
        return {
            "quarantined_within_3": q is not None and q["rogue_requests_before"] <= 3,
            "rogue_phase_success_ge_95": (h["during"]["ok_pct"] or 0.0) >= 95.0,
            "after_quarantine_success_ge_99.9": q is not None
            and (q["healthy_after"]["ok_pct"] or 0.0) >= 99.9,
            "after_quarantine_p99_le_1.5x_pre": None
            if q is None
            else within(q["healthy_after"]["p99_ms"], pre99),
        }
    b = cell["burst"]
    return {
        "admitted_all_succeed": b["admitted"]["ok_pct"] == 100.0,
        "admitted_p99_le_1.5x_unloaded": within(b["admitted"]["p99_ms"], pre99),
        "refused_within_10ms": b["refused"]["over_10ms"] == 0,
        "no_client_timeouts": b["client_timeouts"] == 0,
    }


# -- the table ------------------------------------------------------------------------------------
def _fmt(v: Any, suffix: str = "") -> str:
    return "-" if v is None else f"{v:g}{suffix}"


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def table(cells: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scen. | mode | healthy ok % (all / rogue phase) | p50 / p99 before (ms) "
        "| p50 / p99 during (ms) | rogue got | peak conns | extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cells, key=_cell_order):
        c = cells[key]
        h = c["healthy"]
        extra: list[str] = []
        if "during_writes" in h:
            extra.append(f"writes ok {_fmt(h['during_writes']['ok_pct'], '%')} in rogue phase")
        if "recovery_s" in c:
            extra.append(f"recovery {_fmt(c['recovery_s'], ' s')}")
            q = c.get("quarantine")
            if q is None:
                extra.append("never quarantined")
            else:
                extra.append(
                    f"quarantined after {q['rogue_requests_before']} rogue requests "
                    f"({q['rogue_statement_timeouts_before']} timed out) at "
                    f"+{q['observed_at_s']:g} s; after: ok "
                    f"{_fmt(q['healthy_after']['ok_pct'], '%')}, p99 "
                    f"{_fmt(q['healthy_after']['p99_ms'], ' ms')}"
                )
        if "burst" in c:
            b = c["burst"]
            extra.append(
                f"burst {b['rps']:g} rps; admitted ok {_fmt(b['admitted']['ok_pct'], '%')}, "
                f"p99 {_fmt(b['admitted']['p99_ms'], ' ms')}; refused {b['refused']['n']} "
                f"(max {_fmt(b['refused']['max_ms'], ' ms')}, {b['refused']['over_10ms']} > 10 ms)"
                f"; client time-outs {b['client_timeouts']}"
            )
        if h["failures"]:
            extra.append(f"healthy failures: {_statuses(h['failures'])}")
        g = c.get("goals")
        if g:
            missed = [k for k, v in g.items() if v is not True]
            extra.append("**goals met**" if not missed else f"**missed: {', '.join(missed)}**")
            if tally(c):
                extra.append(tally(c))
        lines.append(
            f"| {c['scenario']} | {c['mode']} | {_fmt(h['ok_pct'])} / "
            f"{_fmt(h['during']['ok_pct'])} | {_fmt(h['pre']['p50_ms'])} / "
            f"{_fmt(h['pre']['p99_ms'])} | {_fmt(h['during']['p50_ms'])} / "
            f"{_fmt(h['during']['p99_ms'])} | {_statuses(c['rogue']['status'])} | "
            f"{_fmt(c['peak_server_connections'])} | {'; '.join(extra)} |"
        )
    return "\n".join(lines)


def goals_table(cells: dict[str, dict[str, Any]]) -> str:
    """One line per poolguard cell: each goal with the number it was judged on."""
    lines = [
        "| scen. | mode | goal: measured (first run) | verdict (first run) | repeated runs |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(cells, key=_cell_order):
        c = cells[key]
        g = c.get("goals")
        if not g:
            continue
        h = c["healthy"]
        pre = h["pre"]["p99_ms"]
        parts: list[str] = []
        if c["scenario"] in ("a", "b"):
            parts.append(f"success {_fmt(h['ok_pct'], '%')} (>= 99.9%)")
            parts.append(
                f"p99 {_fmt(h['during']['p99_ms'])} vs 1.5 x {_fmt(pre)} = "
                f"{_fmt(None if pre is None else round(1.5 * pre, 1))} ms"
            )
        elif c["scenario"] == "c":
            q = c["quarantine"]
            parts.append(
                "quarantined after "
                + ("never" if q is None else f"{q['rogue_requests_before']} rogue requests")
                + " (<= 3)"
            )
            parts.append(f"rogue-phase success {_fmt(h['during']['ok_pct'], '%')} (>= 95%)")
            if q is not None:
                after = q["healthy_after"]
                parts.append(
                    f"after quarantine {_fmt(after['ok_pct'], '%')} (>= 99.9%), p99 "
                    f"{_fmt(after['p99_ms'])} vs 1.5 x {_fmt(pre)} ms"
                )
        else:
            b = c["burst"]
            parts.append(f"admitted ok {_fmt(b['admitted']['ok_pct'], '%')} (100%)")
            parts.append(
                f"admitted p99 {_fmt(b['admitted']['p99_ms'])} vs 1.5 x {_fmt(pre)} ms (unloaded)"
            )
            parts.append(
                f"refused {b['refused']['n']}, {b['refused']['over_10ms']} over 10 ms "
                f"(p99 {_fmt(b['refused']['p99_ms'])}, max {_fmt(b['refused']['max_ms'])} ms; "
                f"from the actual send: {b['refused'].get('over_10ms_from_send', '-')} over "
                f"10 ms, max {_fmt(b['refused'].get('max_from_send_ms'))} ms)"
            )
            parts.append(f"client time-outs {b['client_timeouts']}")
        missed = [k for k, v in g.items() if v is not True]
        verdict = "met" if not missed else "missed: " + ", ".join(missed)
        lines.append(
            f"| {c['scenario']} | {c['mode']} | {'; '.join(parts)} | {verdict} | "
            f"{tally(c) or '-'} |"
        )
    return "\n".join(lines)


def _cell_order(key: str) -> tuple[str, int]:
    scenario, mode = key.split("/", 1)
    return scenario, MODES.index(mode) if mode in MODES else len(MODES)


# -- orchestration --------------------------------------------------------------------------------
def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(RESULTS.read_text())
            if isinstance(data, dict) and isinstance(data.get("cells"), dict):
                return data
    return {"meta": {}, "cells": {}}


def save_results(data: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(RESULTS)


def code_version() -> dict[str, Any]:
    """Which poolguard was measured: HEAD, whether src/ differs from it, a hash of src/."""
    src = ROOT / "src" / "poolguard"
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode())
        digest.update(path.read_bytes())
    out: dict[str, Any] = {"src_sha256": digest.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        out["commit"] = head.stdout.strip()[:12] or None
        out["src_dirty"] = bool(status.stdout.strip())
    return out


def _meta() -> dict[str, Any]:
    import fastapi
    import sqlalchemy
    import uvicorn

    with psycopg.connect(PG_DSN, connect_timeout=5) as conn:
        row = conn.execute("show server_version").fetchone()
    return {
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "httpx": httpx.__version__,
        "postgresql": row[0] if row else None,
        "cpus": os.cpu_count(),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt wherever the driver is, event loop included.

    Not ``signal.default_int_handler``: for that one, ``asyncio.run`` (3.11+) installs its
    own handler, which only cancels the main task, and that cancellation got absorbed on the
    way out (seen here: a SIGINT in the load phase let the run finish as if nothing happened).
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def calibrate_capacity(healthy_cost: float, log_dir: Path) -> float:
    """Requests/s the default pool serves for the healthy query at ``healthy_cost``."""
    tag = f"{TAG_PREFIX}{os.getpid()}_cal"
    reset_table()
    with Server("defaults", tag, healthy_cost, log_dir / "calibration.log") as server:
        return asyncio.run(_calibrate(server.url))


async def _calibrate(url: str) -> float:
    from .load import warm_up

    await warm_up(url)
    return await measure_capacity(url)


def run_cell(
    scenario: Scenario, mode: str, duration: float, burst_rps: float, log_dir: Path
) -> dict[str, Any]:
    tag = f"{TAG_PREFIX}{os.getpid()}_{scenario.key}_{mode.replace('-', '_')}"
    reset_table()
    schedule = plan(scenario, duration, burst_rps)
    with Server(mode, tag, scenario.healthy_cost, log_dir / f"{scenario.key}_{mode}.log") as srv:
        result = run_load(srv.url, schedule, tag, duration)
        stats = srv.stats()
    cell = summarise(scenario, mode, duration, result, burst_rps)
    cell["server_stats"] = stats
    cell["load_wall_s"] = round(result.wall, 2)
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outage_replay.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--all", action="store_true", help="every scenario x every mode")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="8 s runs (a smoke test)")
    parser.add_argument(
        "--burst-rps", type=float, default=None, help="scenario d's burst (default: measured)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per poolguard cell (the first is shown in full; all are tallied)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; keep the JSON")
    parser.add_argument("--plot", action="store_true", help="redraw the PNG afterwards")
    parser.add_argument(
        "--table", action="store_true", help="print the table of the saved results; run nothing"
    )
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/outage_replay_logs"))
    args = parser.parse_args(argv)

    if args.table:
        cells = load_results()["cells"]
        print(table(cells))
        print()
        print(goals_table(cells))
        return 0
    if args.all:
        scenarios = sorted(SCENARIOS)
        modes = list(MODES)
    else:
        if not args.scenario or not args.mode:
            parser.error("give --scenario and --mode (each may repeat), or --all")
        scenarios, modes = args.scenario, args.mode
    if not 1 <= args.repeat <= 5:
        parser.error("--repeat must be within [1, 5]")
    duration = 8.0 if args.quick else args.duration
    if not 3.0 <= duration <= 120.0:
        parser.error("--duration must be within [3, 120] seconds")

    data = load_results()
    with _signals_as_interrupt():
        try:
            data["meta"].update(_meta())
            burst_rps = 0.0
            if "d" in scenarios:
                if args.burst_rps is not None:
                    burst_rps = args.burst_rps
                    capacity = burst_rps / SCENARIOS["d"].burst_factor
                else:
                    capacity = calibrate_capacity(SCENARIOS["d"].healthy_cost, args.log_dir)
                    burst_rps = round(SCENARIOS["d"].burst_factor * capacity)
                data["meta"]["d_capacity_rps"] = round(capacity, 1)
                data["meta"]["d_burst_rps"] = burst_rps
                print(f"scenario d: pool capacity {capacity:.1f} rps, burst {burst_rps} rps")
            done: dict[str, dict[str, Any]] = {}
            for key in scenarios:
                for mode in modes:
                    sc = SCENARIOS[key]
                    t = time.monotonic()
                    runs = args.repeat if mode.startswith("poolguard") else 1
                    cell = run_cell(
                        sc, mode, duration, burst_rps if key == "d" else 0.0, args.log_dir
                    )
                    cell["run_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                    cell["poolguard_version"] = code_version()
                    repeats = [compact(cell)]
                    for _ in range(runs - 1):
                        again = run_cell(
                            sc, mode, duration, burst_rps if key == "d" else 0.0, args.log_dir
                        )
                        repeats.append(compact(again))
                    cell["repeats"] = repeats
                    done[f"{key}/{mode}"] = cell
                    h = cell["healthy"]
                    print(
                        f"{key}/{mode}: healthy ok {h['ok_pct']}%, p99 pre {h['pre']['p99_ms']} "
                        f"during {h['during']['p99_ms']} ms, rogue {cell['rogue']['status']}, "
                        f"peak conns {cell['peak_server_connections']} "
                        f"({time.monotonic() - t:.0f} s)",
                        flush=True,
                    )
                    if not args.no_save:
                        data["cells"][f"{key}/{mode}"] = cell
                        save_results(data)
        except KeyboardInterrupt:
            print("interrupted: servers stopped, connections terminated", file=sys.stderr)
            return 130
    print()
    print(table(done))
    print()
    print(goals_table(done))
    if args.plot and not args.no_save:
        from .plot import plot

        plot(RESULTS, RESULTS.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
