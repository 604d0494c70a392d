"""The rules of ``poolguard diff``: pure functions from two reports to findings.

* **new**: a fingerprint that a test (present in both reports) did not run before. A
  regression unless ``allow_new``: a new query is exactly what deserves a look before a deploy.
* **count**: a fingerprint ran more often. A regression when it grew by more than
  ``max_count_increase`` (default 0: any increase) and, if ``max_count_ratio`` is given, by
  more than that ratio too. Counts are exact in every run, so this rule stays strict.
* **duration**: a fingerprint's typical execution time grew, with evidence (see
  :mod:`poolguard.tools.diff.evidence`): ``min_samples`` executions on both sides, the median
  grew by more than ``duration_threshold`` and by at least ``min_change`` seconds, a rank test
  significant at ``alpha``, and a new total of at least ``min_duration``.
* **removed**: a fingerprint no longer runs. Informational.

Each rule applies per test, and again to every fingerprint summed over all the tests that
both reports have (``(all tests)``): a statement that runs once in each of twenty tests has
no evidence in any one of them, and twenty samples in the sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from poolguard.tools.diff.evidence import mann_whitney_greater, sample_size, weighted_median
from poolguard.tools.diff.report import FingerprintRecord, Report, Sample, TestRecord

__all__ = ["OVERALL", "DiffOptions", "DiffResult", "Evidence", "Finding", "compare"]

#: The scope name of findings about a fingerprint summed over every compared test.
OVERALL = "(all tests)"

Kind = Literal["new", "count", "duration", "removed"]
# Display order inside one scope: the most actionable first.
_KIND_ORDER: dict[str, int] = {"count": 0, "duration": 1, "new": 2, "removed": 3}


@dataclass(frozen=True)
class DiffOptions:
    """The thresholds. Counts are strict (exact numbers); durations need evidence, with
    defaults measured to give no false alarm in 20 pairs of identical runs (docs/testing.md)
    while a 5 ms -> 20 ms statement still fails."""

    max_count_increase: int = 0
    max_count_ratio: float | None = None
    duration_threshold: float = 2.0
    min_duration: float = 0.005
    min_change: float = 0.005
    min_samples: int = 5
    alpha: float = 0.01
    allow_new: bool = False

    def __post_init__(self) -> None:
        if self.max_count_increase < 0:
            raise ValueError("max_count_increase must be >= 0")
        if self.max_count_ratio is not None and not 1 <= self.max_count_ratio < math.inf:
            raise ValueError("max_count_ratio must be a finite number >= 1")
        if not 1 <= self.duration_threshold < math.inf:
            raise ValueError("duration_threshold must be a finite number >= 1")
        if not 0 <= self.min_duration < math.inf:
            raise ValueError("min_duration must be a finite number >= 0")
        if not 0 <= self.min_change < math.inf:
            raise ValueError("min_change must be a finite number >= 0")
        if self.min_samples < 1:
            raise ValueError("min_samples must be >= 1")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")


@dataclass(frozen=True)
class Evidence:
    """Why a duration finding was made: typical (median) times, samples and the p-value."""

    base_typical: float
    new_typical: float
    base_samples: int
    new_samples: int
    p_value: float


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
    evidence: Evidence | None = None

    def change(self) -> str:
        """A short human description of the change, for the table's last column."""
        b, n = self.base, self.new
        if self.kind in ("new", "removed"):
            return self.kind
        assert b is not None
        assert n is not None
        if self.kind == "count":
            ratio = n.count / b.count if b.count else math.inf
            return f"+{n.count - b.count} (x{ratio:.1f})"
        e = self.evidence
        assert e is not None
        ratio = e.new_typical / e.base_typical if e.base_typical > 0 else math.inf
        return (
            f"x{ratio:.2f} (median {e.base_typical * 1e3:.1f} -> {e.new_typical * 1e3:.1f} ms, "
            f"p={e.p_value:.2g})"
        )


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


def _slower(b: FingerprintRecord, n: FingerprintRecord, opts: DiffOptions) -> Evidence | None:
    """The evidence that ``n`` runs slower than ``b``, or None when there is not enough."""
    if n.total_time < opts.min_duration:
        return None
    bs, ns = b.samples, n.samples
    nb, nn = sample_size(bs), sample_size(ns)
    if nb < opts.min_samples or nn < opts.min_samples:
        return None
    mb, mn = weighted_median(bs), weighted_median(ns)
    if mn - mb < opts.min_change or mn <= mb * opts.duration_threshold:
        return None
    p = mann_whitney_greater(bs, ns)
    if p >= opts.alpha:
        return None
    return Evidence(mb, mn, nb, nn, p)


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
            opts.max_count_ratio is None or _count_ratio(n.count, b.count) > opts.max_count_ratio
        ):
            out.append(Finding("count", scope, fid, n.summary, n.normalized, b, n, True))
        evidence = _slower(b, n, opts)
        if evidence is not None:
            out.append(
                Finding("duration", scope, fid, n.summary, n.normalized, b, n, True, evidence)
            )
    if presence:
        for fid, b in base.items():
            if fid not in new:
                out.append(Finding("removed", scope, fid, b.summary, b.normalized, b, None, False))
    return out


def _count_ratio(new: int, base: int) -> float:
    return new / base if base else math.inf


def _sum(tests: Sequence[TestRecord]) -> dict[str, FingerprintRecord]:
    """Each fingerprint summed over ``tests``: counts and totals added, histograms merged,
    and without histograms each test's mean kept as a weighted sample."""
    parts: dict[str, list[FingerprintRecord]] = {}
    for t in tests:
        for fid, r in t.fingerprints.items():
            parts.setdefault(fid, []).append(r)
    total: dict[str, FingerprintRecord] = {}
    for fid, recs in parts.items():
        if len(recs) == 1:
            total[fid] = recs[0]
            continue
        samples: list[Sample] = []
        hist = all(r.histogram is not None for r in recs)
        for r in recs:
            samples += r.samples
        merged = tuple(sorted(samples))
        total[fid] = FingerprintRecord(
            recs[0].summary,
            recs[0].normalized,
            sum(r.count for r in recs),
            sum(r.total_time for r in recs),
            histogram=merged if hist else None,
            means=None if hist else merged,
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

    def order(f: Finding) -> tuple[bool, str, int, str]:
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
