"""``poolguard diff``: compare two query reports, the CI gate before a deploy.

The pytest plugin (``--poolguard-report=PATH``) writes, per test, how many statements ran, how
much database time they took and which statement fingerprints they were. Run it on the main
branch and on the change, then diff the two: a test that suddenly runs a query 51 times instead
of once (an N+1), a query that appeared, or one that got much slower, is found before the deploy
rather than in the postmortem. Reports carry only fingerprints and literal-free normal forms, so
they are safe to keep as CI artifacts.

Quiet on noise, loud on change: counts are exact and compared strictly; durations are noisy and
need evidence (:mod:`~poolguard.tools.diff.evidence`). The package is cut by concern: reading
(``report``), the rules (``compare``, ``evidence``), the output (``render``, ``text``); this
module is the command line.

Exit status: 0 no regression, 1 regressions, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import TypeVar

from poolguard.tools.diff.compare import (
    OVERALL,
    DiffOptions,
    DiffResult,
    Evidence,
    Finding,
    compare,
)
from poolguard.tools.diff.render import render_json, render_text
from poolguard.tools.diff.report import (
    MAX_REPORT_BYTES,
    REPORT_VERSION,
    FingerprintRecord,
    Report,
    ReportError,
    TestRecord,
    load_report,
    parse_report,
)
from poolguard.tools.diff.text import safe

__all__ = [
    "MAX_REPORT_BYTES",
    "OVERALL",
    "REPORT_VERSION",
    "DiffOptions",
    "DiffResult",
    "Evidence",
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

_DEFAULTS = DiffOptions()
_T = TypeVar("_T")


def _converted(convert: Callable[[str], _T], text: str, what: str) -> _T:
    """``convert(text)``, or the usage error that names what was expected."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {safe(repr(text))[:40]}") from None


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _converted(int, text, "a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _number(minimum: float, maximum: float = math.inf) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _converted(float, text, "a number")
        if not math.isfinite(value) or not minimum <= value <= maximum:
            upper = f" and <= {maximum:g}" if maximum < math.inf else ""
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}{upper}")
        return value

    return parse


#: The threshold options, in --help's order: (DiffOptions field, parser, metavar, help). The
#: flag is the field's name with dashes, the default is the field's, and "{}" in a help text
#: shows that default.
_THRESHOLDS: tuple[tuple[str, Callable[[str], object], str, str], ...] = (
    ("max_count_increase", _whole(0), "N",
     "tolerated growth of a fingerprint's count (default 0: any increase fails)"),
    ("max_count_ratio", _number(1.0), "R",
     "tolerated count ratio new/base; with it, a count must exceed both tolerances"),
    ("duration_threshold", _number(1.0), "R",
     "a statement's median time may grow by this ratio (default {:g})"),
    ("min_change", _number(0.0), "SECONDS",
     "smallest growth of the median time that can fail (default {:g})"),
    ("min_samples", _whole(1), "N",
     "executions needed on both sides to judge a duration (default {})"),
    ("alpha", _number(1e-12, 1.0), "P",
     "significance level of the rank test (default {:g})"),
    ("min_duration", _number(0.0), "SECONDS",
     "new totals below this are never a duration regression (default {:g})"),
)  # fmt: skip


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``diff``'s arguments to its sub-parser (the CLI owns the parser tree)."""
    parser.add_argument("base", metavar="BASE.json", help="report from the reference run")
    parser.add_argument("new", metavar="NEW.json", help="report from the run under review")
    add = parser.add_argument
    for name, parse, metavar, text in _THRESHOLDS:
        default = getattr(_DEFAULTS, name)
        add(
            f"--{name.replace('_', '-')}",
            type=parse,
            default=default,
            metavar=metavar,
            help=text.format(default),
        )
    add(
        "--max-report-size",
        type=_number(0.001, 16384.0),
        default=MAX_REPORT_BYTES / 2**20,
        metavar="MIB",
        help=f"refuse larger report files (default {MAX_REPORT_BYTES // 2**20})",
    )
    add("--allow-new", action="store_true", help="report new fingerprints without failing on them")
    add("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``poolguard diff`` from parsed arguments; returns the exit status."""
    limit = int(args.max_report_size * 2**20)
    try:
        base = load_report(args.base, max_bytes=limit)
        new = load_report(args.new, max_bytes=limit)
    except ReportError as e:
        print(f"poolguard diff: {e}", file=sys.stderr)
        return 2
    # Every DiffOptions field is an option of the same name (configure_parser).
    options = DiffOptions(**{f.name: getattr(args, f.name) for f in fields(DiffOptions)})
    result = compare(base, new, options)
    if args.json:
        sys.stdout.write(render_json(result))
    else:
        sys.stdout.write(render_text(result, args.base, args.new))
    return result.exit_code
