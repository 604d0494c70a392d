"""Reading a ``--poolguard-report`` file: bounded, strict, and one line per failure.

Why so strict: a gate that silently reads a truncated or foreign file as "no queries" would
pass every change, and one that crashes on hostile input (a 1 GiB file, ``/dev/zero``, a
count of ``10**309``) would fail every change with a traceback that CI shows as a regression
(exit 1). So every way a file can be unusable is a :class:`ReportError` naming the file and
the field, which the command turns into exit status 2.

Why a size limit: a report is a few hundred bytes per test (a 10,000-test suite with 20
statement shapes per test is about 30 MiB), so anything far above that is not a report, and
reading it whole could exhaust the CI runner's memory or never end (a FIFO, ``/dev/zero``).
The file is read with a bound of ``max_bytes + 1``, whatever kind of file it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from poolguard.tools.diff.text import safe

__all__ = [
    "MAX_REPORT_BYTES",
    "REPORT_VERSION",
    "FingerprintRecord",
    "Report",
    "ReportError",
    "TestRecord",
    "load_report",
    "parse_report",
]

#: The report format version the plugin writes and this module reads.
REPORT_VERSION = 1
#: Default bound on a report file's size (``--max-report-size`` changes it).
MAX_REPORT_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 20
#: Counts above this are not exact as floats (2**53) and no test runs that many statements.
_MAX_COUNT = 2**53
#: Seconds above this (about 31 years) are not a measurement.
_MAX_SECONDS = 1e9


class ReportError(Exception):
    """A report that cannot be used; the message is one line, fit for stderr as is."""


#: One recorded execution time and how many executions had it: ``(seconds, n)``.
Sample = tuple[float, int]


@dataclass(frozen=True)
class FingerprintRecord:
    """One fingerprint's numbers in one test (or summed over tests).

    ``histogram`` holds the per-execution times, as ``(bucket upper bound in seconds, n)``
    pairs, when the report recorded them; :attr:`samples` is what the duration rule tests.
    """

    summary: str
    normalized: str
    count: int
    total_time: float
    histogram: tuple[Sample, ...] | None = None
    #: Per-test mean times standing in for samples when there is no histogram (set when
    #: records of several tests are summed: each test's mean, weighted by its count).
    means: tuple[Sample, ...] | None = field(default=None, compare=False)

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The execution times as weighted values, best evidence first: the histogram,
        else each test's mean time, else this record's mean time for each execution."""
        if self.histogram is not None:
            return self.histogram
        if self.means is not None:
            return self.means
        if self.count <= 0:
            return ()
        return ((self.total_time / self.count, self.count),)


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


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where}: expected a non-negative integer, got {_short(value)}")
    if value > _MAX_COUNT:
        raise ReportError(f"{where}: {_short(value)} is too large for a count")
    return value


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: expected a non-negative number, got {_short(value)}")
    # Compare before converting: float(10**309) raises OverflowError.
    if not 0 <= value <= _MAX_SECONDS:  # also NaN
        raise ReportError(
            f"{where}: expected a number of seconds in [0, {_MAX_SECONDS:g}], got {_short(value)}"
        )
    return float(value)


def _short(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        return f"an integer of {len(str(abs(value)))} digits"  # str() of a huge int is slow
    return safe(f"{value!r:.40}")


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ReportError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _histogram(value: object, count: int, where: str) -> tuple[Sample, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ReportError(f"{where}: expected a list of [seconds, n] pairs")
    out: list[Sample] = []
    total = 0
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ReportError(f"{where}[{i}]: expected a [seconds, n] pair")
        n = _int(pair[1], f"{where}[{i}][1]")
        total += n
        if n:
            out.append((_seconds(pair[0], f"{where}[{i}][0]"), n))
    if total > count:
        raise ReportError(f"{where}: holds {total} executions, more than the count {count}")
    return tuple(out)


def parse_report(data: object, source: str = "report") -> Report:
    """Validate decoded JSON as a version-1 report.

    Anything unexpected is a :class:`ReportError` naming the field
    (``tests["t.py::test_x"].fingerprints["3f2a..."].count``).
    """
    name = safe(source)
    try:
        top = _obj(data, "report")
        if "version" not in top:
            raise ReportError("not a poolguard report (no 'version' field)")
        version = top["version"]
        if version != REPORT_VERSION or isinstance(version, bool):
            raise ReportError(
                f"unsupported report version {_short(version)} (this poolguard reads version "
                f"{REPORT_VERSION})"
            )
        tests: dict[str, TestRecord] = {}
        for nodeid, raw in _obj(top.get("tests"), "tests").items():
            tw = f"tests[{json.dumps(nodeid)[:200]}]"
            t = _obj(raw, tw)
            statements = _int(t.get("statements"), f"{tw}.statements")
            db_time = _seconds(t.get("db_time"), f"{tw}.db_time")
            fps: dict[str, FingerprintRecord] = {}
            for fid, fraw in _obj(t.get("fingerprints"), f"{tw}.fingerprints").items():
                fw = f"{tw}.fingerprints[{json.dumps(fid)[:60]}]"
                f = _obj(fraw, fw)
                count = _int(f.get("count"), f"{fw}.count")
                fps[fid] = FingerprintRecord(
                    summary=_str(f.get("summary"), f"{fw}.summary"),
                    normalized=_str(f.get("normalized"), f"{fw}.normalized"),
                    count=count,
                    total_time=_seconds(f.get("total_time"), f"{fw}.total_time"),
                    histogram=_histogram(f.get("histogram"), count, f"{fw}.histogram"),
                )
            tests[nodeid] = TestRecord(statements=statements, db_time=db_time, fingerprints=fps)
    except ReportError as e:
        raise ReportError(f"{name}: {e}") from None
    return Report(tests=tests, source=source)


def _read_bounded(fh: BinaryIO, limit: int, name: str) -> bytes:
    # In 1 MiB chunks (read(limit) would allocate the whole limit up front), refusing at
    # the first NUL byte: JSON text never holds one, and /dev/zero is all of them.
    data = bytearray()
    while len(data) < limit:
        chunk = fh.read(min(_CHUNK, limit - len(data)))
        if not chunk:
            break
        if b"\x00" in chunk:
            raise ReportError(f"{name}: holds NUL bytes, not a poolguard report")
        data += chunk
    return bytes(data)


def _read(path: str | Path, max_bytes: int) -> bytes:
    name = safe(str(path))
    try:
        with open(path, "rb") as fh:  # bounded reads, whatever kind of file it is
            data = _read_bounded(fh, max_bytes + 1, name)
    except FileNotFoundError:
        raise ReportError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{name}: is a directory, not a report file") from None
    except OSError as e:
        raise ReportError(f"{name}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > max_bytes:
        raise ReportError(
            f"{name}: larger than {max_bytes / 2**20:g} MiB, not a report (see --max-report-size)"
        )
    return data


def load_report(path: str | Path, *, max_bytes: int = MAX_REPORT_BYTES) -> Report:
    """Read and validate a report file; every failure is a one-line :class:`ReportError`."""
    name = safe(str(path))
    data = _read(path, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{name}: not UTF-8 text, not a poolguard report") from None
    try:
        doc = json.loads(text)  # NaN and 1e309 (inf) parse, and are refused by field
    except json.JSONDecodeError as e:
        raise ReportError(
            f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except (ValueError, RecursionError) as e:  # absurd nesting, a 5000-digit integer
        raise ReportError(f"{name}: not valid JSON ({type(e).__name__})") from None
    return parse_report(doc, str(path))
