"""``poolguard diff``: compare two query reports, the CI gate before a deploy.

The pytest plugin (``--poolguard-report=PATH``) writes, per test, how many statements ran, how
much database time they took and which statement fingerprints they were. Run it on the main
branch and on the change, then diff the two: a test that suddenly runs a query 51 times instead
of once (an N+1), a query that appeared, or one that got much slower, is found before the deploy
rather than in the postmortem. Reports carry only fingerprints and literal-free normal forms, so
they are safe to keep as CI artifacts.

The rules, all tunable from the command line:

* **new**: a fingerprint that a test (present in both reports) did not run before. A regression
  unless ``--allow-new``: a new query is exactly what deserves a look before a deploy.
* **count**: a fingerprint ran more often. A regression when it grew by more than
  ``--max-count-increase`` (default 0: any increase) and, if ``--max-count-ratio`` is given, by
  more than that ratio too; the two are tolerances, both must be exceeded.
* **duration**: a fingerprint's total time grew by more than ``--duration-threshold`` (a ratio,
  default 1.5). Totals below ``--min-duration`` (default 5 ms) are noise and never compared, and a
  base below it counts as ``--min-duration``, so 1 ms -> 500 ms is still caught.
* **removed**: a fingerprint no longer runs. Informational.

Each rule applies per test, and again to every fingerprint summed over all the tests that both
reports have (``(all tests)``): many small slowdowns, each under the noise floor, add up there.
Tests that only one report has are listed but not compared.

Exit status: 0 no regression, 1 regressions, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "OVERALL",
    "REPORT_VERSION",
    "DiffOptions",
    "DiffResult",
    "Finding",
    "FingerprintRecord",
    "Report",
    "ReportError",
    "TestRecord",
    "compare",
    "configure_parser",
    "load_report",
    "parse_report",
    "render_json",
    "render_text",
    "run",
]

#: The report format version the plugin writes and this module reads.
REPORT_VERSION = 1
#: The scope name of findings about a fingerprint summed over every compared test.
OVERALL = "(all tests)"

Kind = Literal["new", "count", "duration", "removed"]
# Display order inside one scope: the most actionable first.
_KIND_ORDER: dict[str, int] = {"count": 0, "duration": 1, "new": 2, "removed": 3}


class ReportError(Exception):
    """A report that cannot be used; the message is one line, fit for stderr as is."""


@dataclass(frozen=True)
class FingerprintRecord:
    """One fingerprint's numbers in one test (or summed over tests)."""

    summary: str
    normalized: str
    count: int
    total_time: float


@dataclass(frozen=True)
class TestRecord:
    """What one test ran."""

    __test__ = False  # not a pytest test class, despite the name

    statements: int
    db_time: float
    fingerprints: Mapping[str, FingerprintRecord]


@dataclass(frozen=True)
class Report:
    """A parsed, validated report: test node id -> what it ran."""

    tests: Mapping[str, TestRecord]
    source: str = ""


# --------------------------------------------------------------------------- loading


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where}: expected a non-negative integer, got {value!r:.40}")
    return value


def _seconds(value: object, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ReportError(f"{where}: expected a non-negative number, got {value!r:.40}")
    return float(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ReportError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def parse_report(data: object, source: str = "report") -> Report:
    """Validate decoded JSON as a version-1 report.

    Strict on purpose: a gate that silently reads a truncated or foreign file as "no queries"
    would pass every change, so anything unexpected is a :class:`ReportError` naming the field
    (``tests["t.py::test_x"].fingerprints["3f2a..."].count``).
    """
    try:
        top = _obj(data, "report")
        if "version" not in top:
            raise ReportError("not a poolguard report (no 'version' field)")
        version = top["version"]
        if version != REPORT_VERSION or isinstance(version, bool):
            raise ReportError(
                f"unsupported report version {version!r:.20} (this poolguard reads version "
                f"{REPORT_VERSION})"
            )
        tests: dict[str, TestRecord] = {}
        for nodeid, raw in _obj(top.get("tests"), "tests").items():
            tw = f"tests[{json.dumps(nodeid)}]"
            t = _obj(raw, tw)
            statements = _int(t.get("statements"), f"{tw}.statements")
            db_time = _seconds(t.get("db_time"), f"{tw}.db_time")
            fps: dict[str, FingerprintRecord] = {}
            for fid, fraw in _obj(t.get("fingerprints"), f"{tw}.fingerprints").items():
                fw = f"{tw}.fingerprints[{json.dumps(fid)}]"
                f = _obj(fraw, fw)
                fps[fid] = FingerprintRecord(
                    summary=_str(f.get("summary"), f"{fw}.summary"),
                    normalized=_str(f.get("normalized"), f"{fw}.normalized"),
                    count=_int(f.get("count"), f"{fw}.count"),
                    total_time=_seconds(f.get("total_time"), f"{fw}.total_time"),
                )
            tests[nodeid] = TestRecord(statements=statements, db_time=db_time, fingerprints=fps)
    except ReportError as e:
        raise ReportError(f"{source}: {e}") from None
    return Report(tests=tests, source=source)


def load_report(path: str | Path) -> Report:
    """Read and validate a report file; every failure is a one-line :class:`ReportError`."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{name}: is a directory, not a report file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{name}: not UTF-8 text, not a poolguard report") from None
    except OSError as e:
        raise ReportError(f"{name}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(
            f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except (ValueError, RecursionError) as e:  # e.g. absurdly deep nesting
        raise ReportError(f"{name}: not valid JSON ({type(e).__name__})") from None
    return parse_report(data, name)


# --------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class DiffOptions:
    """The thresholds; the defaults are strict because a gate is cheaper than a postmortem."""

    max_count_increase: int = 0
    max_count_ratio: float | None = None
    duration_threshold: float = 1.5
    min_duration: float = 0.005
    allow_new: bool = False

    def __post_init__(self) -> None:
        if self.max_count_increase < 0:
            raise ValueError("max_count_increase must be >= 0")
        if self.max_count_ratio is not None and self.max_count_ratio < 1:
            raise ValueError("max_count_ratio must be >= 1")
        if self.duration_threshold < 1:
            raise ValueError("duration_threshold must be >= 1")
        if self.min_duration < 0:
            raise ValueError("min_duration must be >= 0")


@dataclass(frozen=True)
class Finding:
    """One difference: a fingerprint in a scope (a test node id, or :data:`OVERALL`)."""

    kind: Kind
    scope: str
    fingerprint: str
    summary: str
    normalized: str
    base: FingerprintRecord | None
    new: FingerprintRecord | None
    regression: bool

    def change(self) -> str:
        """A short human description of the change, for the table's last column."""
        b, n = self.base, self.new
        if self.kind == "new":
            return "new"
        if self.kind == "removed":
            return "removed"
        assert b is not None
        assert n is not None
        if self.kind == "count":
            ratio = n.count / b.count if b.count else math.inf
            return f"+{n.count - b.count} (x{ratio:.1f})"
        return f"x{_ratio(n.total_time, b.total_time, 0.0):.2f}"


@dataclass(frozen=True)
class DiffResult:
    """Everything :func:`compare` found, plus totals for the summary line."""

    findings: tuple[Finding, ...]
    tests_compared: int
    new_tests: tuple[str, ...]
    removed_tests: tuple[str, ...]
    base_statements: int
    new_statements: int
    base_db_time: float
    new_db_time: float
    options: DiffOptions = field(default_factory=DiffOptions)

    @property
    def regressions(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.regression)

    @property
    def informational(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.regression)

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0


def _ratio(new: float, base: float, floor: float) -> float:
    denominator = max(base, floor)
    if denominator <= 0:
        return math.inf if new > 0 else 1.0
    return new / denominator


def _compare_scope(
    scope: str,
    base: Mapping[str, FingerprintRecord],
    new: Mapping[str, FingerprintRecord],
    opts: DiffOptions,
    *,
    presence: bool,
) -> list[Finding]:
    """Apply the rules to one scope. ``presence`` adds new/removed findings (per test only:
    summed over tests they would repeat the per-test rows)."""
    out: list[Finding] = []
    for fid, n in new.items():
        b = base.get(fid)
        if b is None:
            if presence:
                out.append(
                    Finding("new", scope, fid, n.summary, n.normalized, None, n, not opts.allow_new)
                )
            continue
        grew = n.count - b.count
        if grew > opts.max_count_increase and (
            opts.max_count_ratio is None or _ratio(n.count, b.count, 0) > opts.max_count_ratio
        ):
            out.append(Finding("count", scope, fid, n.summary, n.normalized, b, n, True))
        if (
            n.total_time >= opts.min_duration
            and n.total_time > b.total_time
            and _ratio(n.total_time, b.total_time, opts.min_duration) > opts.duration_threshold
        ):
            out.append(Finding("duration", scope, fid, n.summary, n.normalized, b, n, True))
    if presence:
        for fid, b in base.items():
            if fid not in new:
                out.append(Finding("removed", scope, fid, b.summary, b.normalized, b, None, False))
    return out


def _sum(tests: Sequence[TestRecord]) -> dict[str, FingerprintRecord]:
    total: dict[str, FingerprintRecord] = {}
    for t in tests:
        for fid, r in t.fingerprints.items():
            prev = total.get(fid)
            if prev is None:
                total[fid] = r
            else:
                total[fid] = FingerprintRecord(
                    prev.summary,
                    prev.normalized,
                    prev.count + r.count,
                    prev.total_time + r.total_time,
                )
    return total


def compare(base: Report, new: Report, options: DiffOptions | None = None) -> DiffResult:
    """Compare ``new`` against ``base``: pure, no I/O, deterministic order."""
    opts = options or DiffOptions()
    common = sorted(set(base.tests) & set(new.tests))
    findings: list[Finding] = []
    for nodeid in common:
        findings += _compare_scope(
            nodeid,
            base.tests[nodeid].fingerprints,
            new.tests[nodeid].fingerprints,
            opts,
            presence=True,
        )
    base_common = [base.tests[t] for t in common]
    new_common = [new.tests[t] for t in common]
    # A fingerprint that only one test runs would repeat that test's row word for word: the
    # sums add information only where a fingerprint is spread over several tests.
    seen = {(f.kind, f.fingerprint, f.base, f.new) for f in findings}
    findings += [
        f
        for f in _compare_scope(OVERALL, _sum(base_common), _sum(new_common), opts, presence=False)
        if (f.kind, f.fingerprint, f.base, f.new) not in seen
    ]

    def order(f: Finding) -> tuple[int, str, int, str]:
        return (f.scope == OVERALL, f.scope, _KIND_ORDER[f.kind], f.fingerprint)

    findings.sort(key=order)
    return DiffResult(
        findings=tuple(findings),
        tests_compared=len(common),
        new_tests=tuple(sorted(set(new.tests) - set(base.tests))),
        removed_tests=tuple(sorted(set(base.tests) - set(new.tests))),
        base_statements=sum(t.statements for t in base_common),
        new_statements=sum(t.statements for t in new_common),
        base_db_time=sum(t.db_time for t in base_common),
        new_db_time=sum(t.db_time for t in new_common),
        options=opts,
    )


# --------------------------------------------------------------------------- rendering


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
    out = [f"poolguard diff: {base_name} -> {new_name}"]
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
                f.scope,
                f.fingerprint,
                _shorten(f.summary, 40),
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
            out += ["", f"{title} ({len(tests)})", *(f"  {t}" for t in tests)]
    normal: dict[str, str] = {}
    for f in r.findings:
        normal.setdefault(f.fingerprint, f.normalized)
    if normal:
        out += ["", "NORMAL FORMS"]
        out += [f"  {fid}  {text}" for fid, text in sorted(normal.items())]
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
        return {
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

    doc = {
        "version": REPORT_VERSION,
        "status": "regression" if r.regressions else "ok",
        "options": {
            "max_count_increase": r.options.max_count_increase,
            "max_count_ratio": r.options.max_count_ratio,
            "duration_threshold": r.options.duration_threshold,
            "min_duration": r.options.min_duration,
            "allow_new": r.options.allow_new,
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


# --------------------------------------------------------------------------- command line


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _number(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}")
        return value

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``diff``'s arguments to its sub-parser (the CLI owns the parser tree)."""
    parser.add_argument("base", metavar="BASE.json", help="report from the reference run")
    parser.add_argument("new", metavar="NEW.json", help="report from the run under review")
    parser.add_argument(
        "--max-count-increase",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="tolerated growth of a fingerprint's count (default 0: any increase fails)",
    )
    parser.add_argument(
        "--max-count-ratio",
        type=_number(1.0),
        default=None,
        metavar="R",
        help="tolerated count ratio new/base; with it, a count must exceed both tolerances",
    )
    parser.add_argument(
        "--duration-threshold",
        type=_number(1.0),
        default=1.5,
        metavar="R",
        help="a fingerprint's total time may grow by this ratio (default 1.5)",
    )
    parser.add_argument(
        "--min-duration",
        type=_number(0.0),
        default=0.005,
        metavar="SECONDS",
        help="totals below this are noise, never a duration regression (default 0.005)",
    )
    parser.add_argument(
        "--allow-new",
        action="store_true",
        help="report new fingerprints without failing on them",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``poolguard diff`` from parsed arguments; returns the exit status."""
    try:
        base = load_report(args.base)
        new = load_report(args.new)
    except ReportError as e:
        print(f"poolguard diff: {e}", file=sys.stderr)
        return 2
    options = DiffOptions(
        max_count_increase=args.max_count_increase,
        max_count_ratio=args.max_count_ratio,
        duration_threshold=args.duration_threshold,
        min_duration=args.min_duration,
        allow_new=args.allow_new,
    )
    result = compare(base, new, options)
    if args.json:
        sys.stdout.write(render_json(result))
    else:
        sys.stdout.write(render_text(result, args.base, args.new))
    return result.exit_code
