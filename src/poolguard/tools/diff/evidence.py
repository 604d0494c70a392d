"""The evidence a duration finding needs: enough samples, a typical time, a rank test.

Why not compare totals, as poolguard 0.1 did: database time in CI is noisy in a way counts
are not. One execution that waits 10 ms for the CPU (another job on the runner, a garbage
collection, the first statement on a cold connection) turns a 1 ms statement's total into
11 ms, and with 200 statements per run some statement is unlucky on almost every run: twenty
pairs of identical runs of a real suite failed 7 times with the 0.1 defaults. A real
slowdown is different in kind: it moves *every* execution, not one. So a duration
regression must show all three of:

* **several samples** on both sides (``min_samples`` executions), since one execution cannot
  tell a slowdown from a stall;
* a **typical time** (the weighted median, robust to a few stalls) that grew by more than the
  ratio *and* by at least ``min_change`` seconds per execution, since a 0.2 ms -> 0.5 ms
  change is real but not what a gate is for, and sub-millisecond times move with the CPU;
* a one-sided **Mann-Whitney U test** (ranks, so it needs no model of the distribution and a
  stall counts as one high rank, not as 10 ms) rejecting "the new times are not larger" at
  ``alpha``.

The samples are the recorded per-execution histogram when the report has one; otherwise each
test's mean time weighted by its count (for the sum over tests), or the test's mean for each
of its executions (within one test: the weakest evidence, guarded by the sample count and the
absolute change, since a mean absorbs a stall as ``stall / count``).

Why the normal approximation of U with the tie correction, not the exact distribution: the
samples are bucketed or repeated means, so ties are the rule, and the exact null
distribution with ties costs more than it is worth for a gate whose other two conditions
already bound the effect size. The continuity correction keeps it conservative for the
small samples where it matters (5 against 5 with no overlap gives p = 0.005).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mann_whitney_greater", "sample_size", "weighted_median"]

Sample = tuple[float, int]


def sample_size(samples: Sequence[Sample]) -> int:
    """How many executions the samples stand for."""
    return sum(n for _, n in samples)


def weighted_median(samples: Sequence[Sample]) -> float:
    """The lower median of the values, each counted ``n`` times (0.0 for no samples)."""
    total = sample_size(samples)
    if total <= 0:
        return 0.0
    half = (total + 1) // 2
    seen = 0
    for value, n in sorted(samples):
        seen += n
        if seen >= half:
            return value
    return sorted(samples)[-1][0]  # pragma: no cover - unreachable: seen reaches total


def mann_whitney_greater(base: Sequence[Sample], new: Sequence[Sample]) -> float:
    """One-sided p-value of "``new`` is not stochastically larger than ``base``".

    Mid-ranks for ties, the tie-corrected variance and a continuity correction; 1.0 when
    either side is empty or every value is the same.
    """
    n1, n2 = sample_size(new), sample_size(base)
    if n1 == 0 or n2 == 0:
        return 1.0
    groups: dict[float, list[int]] = {}
    for value, n in new:
        groups.setdefault(value, [0, 0])[0] += n
    for value, n in base:
        groups.setdefault(value, [0, 0])[1] += n
    rank_sum_new = 0.0
    ties = 0.0
    below = 0
    for value in sorted(groups):
        in_new, in_base = groups[value]
        t = in_new + in_base
        mid = below + (t + 1) / 2
        rank_sum_new += in_new * mid
        ties += t**3 - t
        below += t
    total = n1 + n2
    u = rank_sum_new - n1 * (n1 + 1) / 2
    variance = n1 * n2 / 12 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))
