"""Counts of everything poolguard refused, by kind and partition, for ``stats()``.

Partitions can be named by callers (``guard.budget(partition=...)``), so the table is
bounded: past :data:`MAX_PARTITIONS` names, new ones are counted under ``"_OTHER"`` (the
convention OpenTelemetry uses for unbounded values).
"""

from __future__ import annotations

import threading

from poolguard.policy.gate import DEFAULT_PARTITION

__all__ = ["MAX_PARTITIONS", "OTHER", "RefusalCounts"]

MAX_PARTITIONS = 200
OTHER = "_OTHER"


class RefusalCounts:
    """``{kind: {partition: n}}``; kinds are poolguard's own (a handful), never input."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        self._partitions: set[str] = set()
        self._lock = threading.Lock()

    def count(self, kind: str, partition: str | None) -> None:
        p = partition or DEFAULT_PARTITION
        with self._lock:
            if p not in self._partitions:
                if len(self._partitions) >= MAX_PARTITIONS:
                    p = OTHER
                self._partitions.add(p)
            by = self._counts.setdefault(kind, {})
            by[p] = by.get(p, 0) + 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: dict(v) for k, v in self._counts.items()}

    def total(self, kind: str) -> int:
        with self._lock:
            return sum(self._counts.get(kind, {}).values())
