"""The live progress line: one updating line on a terminal, a plain line every few seconds
otherwise (CI logs, pipes)."""

from __future__ import annotations

import math
import shutil
import time
from typing import IO

from poolguard.tools.demo.results import PhaseResult
from poolguard.tools.demo.scenario import HEALTHY

__all__ = ["Progress", "progress_line"]

#: Seconds between two progress lines when the output is not a terminal.
PLAIN_PROGRESS_EVERY = 2.0


class Progress:
    """A single updating line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self._last_plain = -math.inf
        self._width = shutil.get_terminal_size((100, 20)).columns - 1

    def update(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + text[: self._width].ljust(self._width))
            self.stream.flush()
        else:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY:
                self._last_plain = now
                self.stream.write(text + "\n")
                self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (ends the updating line first)."""
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_plain = -math.inf


def progress_line(
    result: PhaseResult, elapsed: float, checked_out: int, waiting: int, in_flight: int
) -> str:
    """One short line (most telling first, as a narrow terminal clips the end)."""
    healthy = [e for e in result.of(HEALTHY) if e.outcome]
    ok = sum(1 for e in healthy if e.outcome.startswith("2"))
    pending = sum(1 for e in result.of(HEALTHY) if not e.outcome and e.task is not None)
    clock = f"{min(elapsed, result.duration):4.1f}/{result.duration:g}s"
    if elapsed > result.duration:
        clock += f" +{elapsed - result.duration:.0f}s"  # settling: the last answers or give-ups
    quarantine = " | rogue quarantined" if result.quarantined_at is not None else ""
    return (
        f"{result.name:<17} {clock} | healthy {ok} ok {len(healthy) - ok} failed "
        f"{pending} pending | pool {checked_out}/{result.capacity}, {waiting} waiting, "
        f"{in_flight} in flight{quarantine}"
    )
