"""Rendering a :class:`DiffResult`: an aligned table for people, JSON for machines.

Every string that came from a report or the command line goes through
:func:`~poolguard.tools.diff.text.safe` before it reaches the terminal (see that module for
why); JSON output relies on ``json.dumps``, which escapes control characters itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from poolguard.tools.diff.compare import OVERALL, DiffResult, Finding
from poolguard.tools.diff.report import REPORT_VERSION, FingerprintRecord
from poolguard.tools.diff.text import safe

__all__ = ["render_json", "render_text"]


def _cell(f: Finding, rec: FingerprintRecord | None) -> str:
    if rec is None:
        return "-"
    if f.kind == "duration":
        return f"{rec.total_time:.3f}s"
    return str(rec.count)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_text(result: DiffResult, base_name: str = "BASE", new_name: str = "NEW") -> str:
    """The human report: a summary line, aligned tables, then each fingerprint's normal form
    (kept out of the table so that the columns stay readable)."""
    r = result
    out = [f"poolguard diff: {safe(base_name)} -> {safe(new_name)}"]
    plural = "s" if r.tests_compared != 1 else ""
    out.append(
        f"{r.tests_compared} test{plural} compared; statements {r.base_statements} -> "
        f"{r.new_statements}, db time {r.base_db_time:.3f}s -> {r.new_db_time:.3f}s"
    )
    header = ("KIND", "TEST", "FINGERPRINT", "SUMMARY", "BASE", "NEW", "CHANGE")
    for title, group in (("REGRESSIONS", r.regressions), ("INFORMATIONAL", r.informational)):
        if not group:
            continue
        out += ["", f"{title} ({len(group)})"]
        rows = [header] + [
            (
                f.kind if f.regression or f.kind == "removed" else f"{f.kind} (allowed)",
                safe(f.scope),
                safe(f.fingerprint),
                _shorten(safe(f.summary), 40),
                _cell(f, f.base),
                _cell(f, f.new),
                f.change(),
            )
            for f in group
        ]
        out += _table(rows, right=frozenset({4, 5}))
    for title, tests in (
        ("NEW TESTS, not compared", r.new_tests),
        ("REMOVED TESTS, not compared", r.removed_tests),
    ):
        if tests:
            out += ["", f"{title} ({len(tests)})", *(f"  {safe(t)}" for t in tests)]
    normal: dict[str, str] = {}
    for f in r.findings:
        normal.setdefault(f.fingerprint, f.normalized)
    if normal:
        out += ["", "NORMAL FORMS"]
        out += [f"  {safe(fid)}  {safe(text)}" for fid, text in sorted(normal.items())]
    n = len(r.regressions)
    out += [
        "",
        f"result: {n} regression{'s' if n != 1 else ''}" if n else "result: no regression",
    ]
    return "\n".join(out) + "\n"


def _record_json(rec: FingerprintRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"count": rec.count, "total_time": rec.total_time}


def render_json(result: DiffResult) -> str:
    """The machine report; stable keys, one finding per object."""
    r = result

    def finding(f: Finding) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": f.kind,
            "test": None if f.scope == OVERALL else f.scope,
            "scope": "overall" if f.scope == OVERALL else "test",
            "fingerprint": f.fingerprint,
            "summary": f.summary,
            "normalized": f.normalized,
            "base": _record_json(f.base),
            "new": _record_json(f.new),
            "regression": f.regression,
        }
        if f.evidence is not None:
            e = f.evidence
            doc["evidence"] = {
                "base_median": e.base_typical,
                "new_median": e.new_typical,
                "base_samples": e.base_samples,
                "new_samples": e.new_samples,
                "p_value": e.p_value,
            }
        return doc

    o = r.options
    doc = {
        "version": REPORT_VERSION,
        "status": "regression" if r.regressions else "ok",
        "options": {
            "max_count_increase": o.max_count_increase,
            "max_count_ratio": o.max_count_ratio,
            "duration_threshold": o.duration_threshold,
            "min_duration": o.min_duration,
            "min_change": o.min_change,
            "min_samples": o.min_samples,
            "alpha": o.alpha,
            "allow_new": o.allow_new,
        },
        "summary": {
            "tests_compared": r.tests_compared,
            "new_tests": list(r.new_tests),
            "removed_tests": list(r.removed_tests),
            "statements": {"base": r.base_statements, "new": r.new_statements},
            "db_time": {"base": r.base_db_time, "new": r.new_db_time},
            "regressions": len(r.regressions),
            "informational": len(r.informational),
        },
        "regressions": [finding(f) for f in r.regressions],
        "informational": [finding(f) for f in r.informational],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
