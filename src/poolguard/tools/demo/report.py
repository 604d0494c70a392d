"""The demo's results: the side-by-side table, the one-line summaries, the JSON report."""

from __future__ import annotations

import math
from typing import Any

from poolguard.tools.demo.results import PhaseResult
from poolguard.tools.demo.scenario import HEALTHY, HEALTHY_RATE, PATIENCE, ROGUE, ROGUE_RATE
from poolguard.tools.demo.workload import Workload

__all__ = ["fmt_latency", "render_table", "report_json", "summary_line"]


def fmt_latency(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _fmt_outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def render_table(without: PhaseResult, with_: PhaseResult) -> str:
    """The side-by-side comparison."""

    def success(r: PhaseResult) -> str:
        return f"{r.healthy_success() * 100:.1f}% ({r.healthy_ok()}/{len(r.of(HEALTHY))})"

    def quarantine(r: PhaseResult) -> str:
        if not r.protected:
            return "- (no quarantine)"
        if r.quarantined_at is None:
            return "0"
        return f"{r.quarantine_events} (rogue refused from {r.quarantined_at:.1f} s)"

    rows = [
        ("", without.name, with_.name),
        ("healthy success (2xx)", success(without), success(with_)),
        (
            "healthy p50",
            fmt_latency(without.healthy_latency(0.5)),
            fmt_latency(with_.healthy_latency(0.5)),
        ),
        (
            "healthy p99",
            fmt_latency(without.healthy_latency(0.99)),
            fmt_latency(with_.healthy_latency(0.99)),
        ),
        (
            "healthy failures",
            _fmt_outcomes({k: v for k, v in without.outcomes(HEALTHY).items() if k[0] != "2"}),
            _fmt_outcomes({k: v for k, v in with_.outcomes(HEALTHY).items() if k[0] != "2"}),
        ),
        (
            "rogue outcomes",
            _fmt_outcomes(without.outcomes(ROGUE)),
            _fmt_outcomes(with_.outcomes(ROGUE)),
        ),
        (
            "max pool checkouts",
            f"{without.max_checked_out}/{without.capacity}",
            f"{with_.max_checked_out}/{with_.capacity}",
        ),
        ("max threads waiting for pool", str(without.max_waiting), str(with_.max_waiting)),
        ("max requests in flight", str(without.max_in_flight), str(with_.max_in_flight)),
        ("quarantine events", quarantine(without), quarantine(with_)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = []
    for i, (a, b, c) in enumerate(rows):
        lines.append(f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}".rstrip())
        if i == 0:
            lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * w2}")
    return "\n".join(lines)


def report_json(
    workload: Workload, duration: float, without: PhaseResult, with_: PhaseResult
) -> dict[str, Any]:
    return {
        "database": workload.label,
        "duration_s": duration,
        "healthy_rate": HEALTHY_RATE,
        "rogue_rate": ROGUE_RATE,
        "patience_s": PATIENCE,
        "phases": {"without": without.to_json(), "with": with_.to_json()},
    }


def summary_line(r: PhaseResult) -> str:
    return (
        f"{r.name}: healthy {r.healthy_success() * 100:.1f}% ok, p99 "
        f"{fmt_latency(r.healthy_latency(0.99))}; rogue {_fmt_outcomes(r.outcomes(ROGUE))}"
    )
