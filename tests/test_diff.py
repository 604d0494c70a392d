"""``poolguard diff``: the rules, the output and the refusal of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from poolguard.tools import diff
from poolguard.tools.cli import main
from poolguard.tools.diff import OVERALL, DiffOptions, compare, parse_report

ADDR = "a" * 16
USERS = "b" * 16
ORDERS = "c" * 16
NORMAL = {
    ADDR: ("SELECT addresses", "select * from addresses where addresses.user_id = ?"),
    USERS: ("SELECT users", "select * from users"),
    ORDERS: ("SELECT orders", "select * from orders where orders.user_id = ?"),
}


def fp(fid: str, count: int, total_time: float = 0.001) -> tuple[str, dict[str, Any]]:
    summary, normalized = NORMAL[fid]
    return fid, {
        "summary": summary,
        "normalized": normalized,
        "count": count,
        "total_time": total_time,
    }


def report(tests: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
    return {
        "version": 1,
        "tests": {
            nodeid: {
                "statements": sum(f["count"] for _, f in fps),
                "db_time": sum(f["total_time"] for _, f in fps),
                "fingerprints": dict(fps),
            }
            for nodeid, fps in tests.items()
        },
    }


def write(tmp_path: Path, name: str, doc: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


def kinds(base: dict[str, Any], new: dict[str, Any], **options: Any) -> list[tuple[str, str, bool]]:
    result = compare(parse_report(base), parse_report(new), DiffOptions(**options))
    return [(f.kind, f.scope, f.regression) for f in result.findings]


T = "tests/test_api.py::test_list"


def test_identical_reports_have_no_finding() -> None:
    doc = report({T: [fp(USERS, 1), fp(ADDR, 1)]})
    assert kinds(doc, doc) == []


def test_n_plus_one_is_a_count_regression() -> None:
    base = report({T: [fp(USERS, 1), fp(ADDR, 1)]})
    new = report({T: [fp(USERS, 1), fp(ADDR, 51)]})
    # Only one test runs it: the sum over all tests would repeat the row, so it is left out.
    assert kinds(base, new) == [("count", T, True)]


@pytest.mark.parametrize(
    ("base_count", "new_count", "options", "regression"),
    [
        (5, 5, {}, False),
        (5, 4, {}, False),
        (5, 6, {}, True),  # default: any increase
        (1, 3, {"max_count_increase": 2}, False),
        (1, 4, {"max_count_increase": 2}, True),
        (10, 15, {"max_count_ratio": 2.0}, False),  # +5 but only x1.5
        (10, 25, {"max_count_ratio": 2.0}, True),
        (1, 3, {"max_count_increase": 5, "max_count_ratio": 2.0}, False),  # x3 but only +2
        (10, 30, {"max_count_increase": 5, "max_count_ratio": 2.0}, True),
    ],
)
def test_count_tolerances(
    base_count: int, new_count: int, options: dict[str, Any], regression: bool
) -> None:
    found = kinds(
        report({T: [fp(ADDR, base_count)]}), report({T: [fp(ADDR, new_count)]}), **options
    )
    assert (("count", T, True) in found) is regression


@pytest.mark.parametrize(
    ("base", "new", "options", "regression"),
    [
        # (count, total seconds) in one test, no histogram: each execution at the mean
        ((10, 0.050), (10, 0.200), {}, True),  # 5 ms -> 20 ms, ten executions
        ((5, 0.025), (5, 0.100), {}, True),  # five: just enough evidence
        ((4, 0.020), (4, 0.080), {}, False),  # four executions: not enough
        ((4, 0.020), (4, 0.080), {"min_samples": 4}, True),
        ((1, 0.005), (1, 0.500), {}, False),  # one execution is a stall, not a trend
        ((10, 0.100), (10, 0.180), {}, False),  # x1.8: under the ratio
        ((10, 0.100), (10, 0.180), {"duration_threshold": 1.5}, True),
        ((10, 0.010), (10, 0.040), {}, False),  # x4, but +3 ms per execution < 5 ms
        ((10, 0.010), (10, 0.040), {"min_change": 0.002}, True),
        ((10, 0.200), (10, 0.050), {}, False),  # faster is never a regression
    ],
)
def test_duration_needs_evidence(
    base: tuple[int, float], new: tuple[int, float], options: dict[str, Any], regression: bool
) -> None:
    found = kinds(report({T: [fp(USERS, *base)]}), report({T: [fp(USERS, *new)]}), **options)
    assert (("duration", T, True) in found) is regression


def test_duration_p_value_gate() -> None:
    # ten tied executions per side: the one-sided p-value is about 3e-5, so only an absurd
    # alpha refuses it; this pins the test's direction (larger is slower) and its scale.
    base, new = report({T: [fp(USERS, 10, 0.05)]}), report({T: [fp(USERS, 10, 0.2)]})
    result = compare(parse_report(base), parse_report(new))
    (finding,) = result.regressions
    assert finding.evidence is not None
    assert finding.evidence.p_value < 1e-3
    assert finding.evidence.base_typical == pytest.approx(0.005)
    assert finding.evidence.new_typical == pytest.approx(0.020)
    assert kinds(new, base) == []


def hist_fp(fid: str, times_ms: list[float]) -> tuple[str, dict[str, Any]]:
    """A fingerprint with a recorded histogram of its execution times."""
    fid, doc = fp(fid, len(times_ms), sum(times_ms) / 1000)
    buckets: dict[float, int] = {}
    for t in times_ms:
        buckets[t / 1000] = buckets.get(t / 1000, 0) + 1
    doc["histogram"] = [[k, v] for k, v in sorted(buckets.items())]
    return fid, doc


def test_histograms_make_one_stall_harmless() -> None:
    # The noise that failed CI in 0.1: a 1 ms statement that took 41 ms once. Its mean
    # grows x5 by 8 ms, which the mean-based fallback would flag; the median does not move.
    base = report({T: [hist_fp(USERS, [1.0] * 5)]})
    stalled = report({T: [hist_fp(USERS, [1.0] * 4 + [41.0])]})
    assert kinds(base, stalled) == []
    without = report({T: [fp(USERS, 5, 0.045)]})
    assert kinds(report({T: [fp(USERS, 5, 0.005)]}), without) == [("duration", T, True)]
    slower = report({T: [hist_fp(USERS, [20.0, 21.0, 19.5, 20.2, 22.0])]})
    five = report({T: [hist_fp(USERS, [5.0, 5.1, 4.9, 5.2, 5.0])]})
    assert kinds(five, slower) == [("duration", T, True)]


def test_histogram_validation() -> None:
    doc = report({T: [hist_fp(USERS, [1.0, 2.0])]})
    doc["tests"][T]["fingerprints"][USERS]["histogram"] = [[0.001, 5]]
    with pytest.raises(diff.ReportError, match="more than the count 2"):
        parse_report(doc)
    doc["tests"][T]["fingerprints"][USERS]["histogram"] = [[0.001]]
    with pytest.raises(diff.ReportError, match=r"histogram\[0\]: expected a \[seconds, n\]"):
        parse_report(doc)


def test_new_fingerprint_fails_unless_allowed_and_removed_is_informational() -> None:
    base = report({T: [fp(USERS, 1), fp(ADDR, 1)]})
    new = report({T: [fp(USERS, 1), fp(ORDERS, 1)]})
    assert kinds(base, new) == [("new", T, True), ("removed", T, False)]
    assert kinds(base, new, allow_new=True) == [("new", T, False), ("removed", T, False)]


def test_tests_in_one_report_only_are_listed_not_compared() -> None:
    base = report({T: [fp(USERS, 1)], "t::gone": [fp(ADDR, 1)]})
    new = report({T: [fp(USERS, 1)], "t::added": [fp(ORDERS, 99)]})
    result = compare(parse_report(base), parse_report(new))
    assert result.findings == ()
    assert result.new_tests == ("t::added",)
    assert result.removed_tests == ("t::gone",)
    assert result.tests_compared == 1
    assert result.exit_code == 0


def test_overall_gathers_the_evidence_no_single_test_has() -> None:
    # A 5 ms statement that became 20 ms, run once in each of six tests: one sample per test
    # is no evidence, six in the sum over all tests are.
    names = [f"t::test_{i}" for i in range(6)]
    base = report({n: [fp(USERS, 1, 0.005 + i * 1e-4)] for i, n in enumerate(names)})
    new = report({n: [fp(USERS, 1, 0.020 + i * 1e-4)] for i, n in enumerate(names)})
    assert kinds(base, new) == [("duration", OVERALL, True)]
    assert kinds(base, base) == []


def test_text_output_is_an_aligned_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write(tmp_path, "base.json", report({T: [fp(USERS, 10, 0.01), fp(ADDR, 1)]}))
    new = write(
        tmp_path, "new.json", report({T: [fp(USERS, 10, 0.5), fp(ADDR, 51), fp(ORDERS, 2)]})
    )
    assert main(["diff", base, new]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("KIND"))
    column = lines[header].index("FINGERPRINT")
    rows = lines[header + 1 : header + 4]
    assert [r.split()[0] for r in rows] == ["count", "duration", "new"]
    for row in rows:
        assert row[column : column + 16] in {ADDR, USERS, ORDERS}
    assert f"count     {T}" in out
    assert "+50 (x51.0)" in out
    assert "x50.00 (median 1.0 -> 50.0 ms, p=" in out
    assert OVERALL not in out  # each fingerprint is in one test only: no repeated rows
    assert f"  {ADDR}  select * from addresses where addresses.user_id = ?" in out
    assert out.rstrip().endswith("result: 3 regressions")


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t2 = "tests/test_api.py::test_zdetail"
    base = write(tmp_path, "base.json", report({T: [fp(USERS, 1), fp(ADDR, 1)], t2: [fp(ADDR, 1)]}))
    new = write(tmp_path, "new.json", report({T: [fp(ADDR, 3)], t2: [fp(ADDR, 3)]}))
    assert main(["diff", "--json", base, new]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "regression"
    assert doc["summary"]["regressions"] == 3
    first = doc["regressions"][0]
    assert first == {
        "kind": "count",
        "test": T,
        "scope": "test",
        "fingerprint": ADDR,
        "summary": "SELECT addresses",
        "normalized": "select * from addresses where addresses.user_id = ?",
        "base": {"count": 1, "total_time": 0.001},
        "new": {"count": 3, "total_time": 0.001},
        "regression": True,
    }
    assert [(f["test"], f["scope"]) for f in doc["regressions"][1:]] == [
        (t2, "test"),
        (None, "overall"),
    ]
    assert doc["regressions"][2]["new"] == {"count": 6, "total_time": 0.002}
    assert [f["kind"] for f in doc["informational"]] == ["removed"]


def test_no_regression_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "r.json", report({T: [fp(USERS, 1)]}))
    assert main(["diff", path, path]) == 0
    assert "result: no regression" in capsys.readouterr().out
    assert main(["diff", "--json", path, path]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


GOOD = report({T: [fp(USERS, 1)]})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"\xff\xfegarbage", "not UTF-8"),
        (b'{"version": 1\x00}', "holds NUL bytes"),
        (b"{not json", "not valid JSON (line 1, column 2"),
        (b"[]", "expected an object, got list"),
        (b'{"tests": {}}', "not a poolguard report"),
        (b'{"version": 2, "tests": {}}', "unsupported report version 2"),
        (b'{"version": true, "tests": {}}', "unsupported report version True"),
        (b'{"version": 1}', "tests: expected an object, got NoneType"),
        (
            json.dumps({"version": 1, "tests": {"t": {"statements": -1}}}).encode(),
            'tests["t"].statements: expected a non-negative integer',
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "tests": {
                        "t": {
                            "statements": 1,
                            "db_time": 0.1,
                            "fingerprints": {"x": {"summary": "S", "normalized": "s"}},
                        }
                    },
                }
            ).encode(),
            'tests["t"].fingerprints["x"].count: expected a non-negative integer',
        ),
        (b'{"version": 1, "tests": {"t": {"statements": 1, "db_time": NaN}}}', "db_time"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_bytes(content)
    good = write(tmp_path, "good.json", GOOD)
    for argv in (["diff", str(bad), good], ["diff", good, str(bad)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"poolguard diff: {bad}: ")
        assert message in captured.err
        assert "Traceback" not in captured.err


def test_a_directory_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.json", GOOD)
    assert main(["diff", str(tmp_path), good]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--duration-threshold", "0.5"],
        ["--max-count-increase", "-1"],
        ["--min-duration", "nan"],
        ["--max-count-ratio", "x"],
    ],
)
def test_bad_thresholds_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    good = write(tmp_path, "good.json", GOOD)
    assert main(["diff", *argv, good, good]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert argv[0] in err


def test_options_are_validated_in_the_api_too() -> None:
    with pytest.raises(ValueError, match="duration_threshold"):
        DiffOptions(duration_threshold=0.9)
    assert diff.REPORT_VERSION == 1


# --------------------------------------------------------------------------- hostile input


def test_dev_zero_and_oversized_files_are_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0.1 read without a bound: `diff /dev/zero /dev/zero` ran until killed. Now the read
    # stops at the first NUL byte (never in JSON text), and at the size limit in any case.
    assert main(["diff", "/dev/zero", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert err == "poolguard diff: /dev/zero: holds NUL bytes, not a poolguard report\n"
    big = tmp_path / "big.json"
    big.write_text(json.dumps(GOOD) + " " * (2 * 2**20), encoding="utf-8")
    good = write(tmp_path, "good.json", GOOD)
    assert main(["diff", "--max-report-size", "1", str(big), good]) == 2
    assert capsys.readouterr().err == (
        f"poolguard diff: {big}: larger than 1 MiB, not a report (see --max-report-size)\n"
    )
    assert main(["diff", "--max-report-size", "3", str(big), good]) == 0


def test_an_endless_stream_ends_at_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    # a FIFO-like source of valid-looking text that never ends
    import os
    import threading

    r, w = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as out:
                while True:
                    out.write(b" " * 65536)
        except OSError:  # the reader closed its end
            pass

    threading.Thread(target=feed, daemon=True).start()
    try:
        assert main(["diff", "--max-report-size", "2", f"/dev/fd/{r}", f"/dev/fd/{r}"]) == 2
    finally:
        os.close(r)
    assert "larger than 2 MiB" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", "1" + "0" * 309),  # 10**309: 0.1 crashed with OverflowError (exit 1)
        ("count", str(2**53 + 1)),
        ("total_time", "1" + "0" * 309),
        ("total_time", "1e309"),  # parses as inf
        ("total_time", "-0.5"),
        ("count", "1" + "0" * 5000),  # past Python's int-parsing digit limit
    ],
)
def test_huge_numbers_are_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    doc = json.dumps(report({T: [fp(USERS, 1)]})).replace(
        f'"{field}": {1 if field == "count" else 0.001}', f'"{field}": {value}'
    )
    assert value in doc
    bad = tmp_path / "bad.json"
    bad.write_text(doc, encoding="utf-8")
    good = write(tmp_path, "good.json", GOOD)
    assert main(["diff", good, str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    assert len(captured.err) < 300


def test_control_characters_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A branch can write anything into its report: a forged "result:" line, colours, a
    # cursor that erases the real verdict, a bidi override.
    evil = "t::x\x1b[2K\rresult: no regression\n\u202etest"
    summary = "SELECT \x1b[32mok\x1b[0m\u2028"
    fid, rec = fp(ADDR, 3)
    rec["summary"] = summary
    rec["normalized"] = "select 1\r\nresult: no regression"
    base = write(tmp_path, "base.json", report({evil: [fp(ADDR, 1)]}))
    new = write(tmp_path, "new\x1b[31m.json", report({evil: [(fid, rec)]}))
    assert main(["diff", base, new]) == 1
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\r\u202e\u2028")
    assert [line for line in out.splitlines() if line.startswith("result:")] == [
        "result: 1 regression"
    ]
    assert "\\x1b[2K\\x0dresult: no regression\\x0a\\u202etest" in out
    assert main(["diff", "--json", base, new]) == 1
    doc = json.loads(capsys.readouterr().out)  # JSON escapes them itself, and keeps them
    assert doc["regressions"][0]["test"] == evil
    missing = str(tmp_path / "gone\x1b[2J\n.json")
    assert main(["diff", missing, base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
