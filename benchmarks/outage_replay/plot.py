"""Draw the outage replay's timeline: one row per scenario, healthy latency and errors per mode.

python -m benchmarks.outage_replay.plot [results.json] [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .app import MODES
from .load import SCENARIOS

COLORS = {
    "defaults": "#d62728",
    "hand-tuned": "#ff7f0e",
    "poolguard": "#1f77b4",
    "poolguard-tuned": "#2ca02c",
}


def _series(cell: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    tl = cell["timeline"]
    half = (tl["t"][1] - tl["t"][0]) / 2 if len(tl["t"]) > 1 else 0.0
    xs: list[float] = []
    ys: list[float] = []
    for t, v in zip(tl["t"], tl[key], strict=True):
        if v is not None:
            xs.append(t + half)
            ys.append(v)
    return xs, ys


def plot(results: Path, out: Path) -> None:
    data = json.loads(results.read_text())
    cells: dict[str, dict[str, Any]] = data["cells"]
    keys = [k for k in sorted(SCENARIOS) if any(c.startswith(f"{k}/") for c in cells)]
    if not keys:
        raise SystemExit(f"no results in {results}")
    fig, axes = plt.subplots(
        len(keys),
        2,
        figsize=(15, 3.6 * len(keys)),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    for row, key in enumerate(keys):
        lat_ax, err_ax = axes[row]
        title = SCENARIOS[key].title
        for mode in MODES:
            cell = cells.get(f"{key}/{mode}")
            if cell is None:
                continue
            color = COLORS[mode]
            # Latency of the requests that were not shed: a 503 shed answer takes a few ms
            # and would otherwise read as "fast"; shedding shows in the right-hand panel.
            p99_key = "not_shed_p99_ms" if "not_shed_p99_ms" in cell["timeline"] else "p99_ms"
            p50_key = "not_shed_p50_ms" if "not_shed_p50_ms" in cell["timeline"] else "p50_ms"
            xs, p99 = _series(cell, p99_key)
            lat_ax.plot(xs, p99, color=color, lw=1.8, label=f"{mode} p99")
            xs, p50 = _series(cell, p50_key)
            lat_ax.plot(xs, p50, color=color, lw=1.0, ls="--", label=f"{mode} p50")
            xs, err = _series(cell, "error_pct")
            err_ax.plot(xs, err, color=color, lw=1.6, label=mode)
            if any(cell["timeline"].get("refused_pct") or ()):
                xs, refused = _series(cell, "refused_pct")
                err_ax.plot(xs, refused, color=color, lw=1.0, ls=":")
            start = cell["phase_start_s"]
            end = cell["duration_s"]
        for ax in (lat_ax, err_ax):
            ax.axvspan(start, end, color="0.92", zorder=0)
            ax.set_xlim(0, end)
            ax.grid(True, alpha=0.3)
        phase = "burst" if SCENARIOS[key].burst_factor else "rogue"
        lat_ax.text(
            start + 0.2,
            0.97,
            f"{phase} phase",
            transform=lat_ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="0.4",
        )
        lat_ax.set_yscale("log")
        lat_ax.set_ylim(0.5, 15000)
        lat_ax.axhline(10000, color="0.5", lw=0.8, ls=":")
        lat_ax.set_ylabel("ms from intended send\n(shed 503s excluded)")
        lat_ax.set_title(
            f"{title}: healthy p50 / p99 per 0.5 s",
            fontsize=10,
            loc="left",
        )
        err_ax.set_ylim(-3, 103)
        err_ax.set_ylabel("healthy failed (%)")
        err_ax.set_title(
            "healthy failed per 0.5 s (time-outs, 5xx); dotted: of which shed",
            fontsize=10,
            loc="left",
        )
        if row == len(keys) - 1:
            lat_ax.set_xlabel("seconds into the run")
            err_ax.set_xlabel("seconds into the run")
        if row == 0:
            lat_ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0.0, 0.9))
            err_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    meta = data.get("meta", {})
    fig.suptitle(
        "Outage replay: FastAPI (def endpoints, 40 threads) + SQLAlchemy default pool (5+10) + "
        f"PostgreSQL {meta.get('postgresql', '')}\nopen loop, 50 healthy req/s (d: 25/s, then "
        f"{meta.get('d_burst_rps', '?')}/s), 10 s client timeout; grey: rogue or burst phase",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    results = Path(args[0]) if args else root / "outage_replay.json"
    out = Path(args[1]) if len(args) > 1 else results.with_suffix(".png")
    plot(results, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
