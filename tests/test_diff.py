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
    ("base_time", "new_time", "options", "regression"),
    [
        (0.010, 0.020, {}, True),  # x2 > 1.5
        (0.010, 0.014, {}, False),  # x1.4
        (0.001, 0.004, {}, False),  # x4, but under the 5 ms noise floor
        (0.0001, 0.5, {}, True),  # a tiny base is floored, not ignored
        (0.0001, 0.006, {}, False),  # 6 ms against the 5 ms floor: x1.2
        (0.010, 0.020, {"duration_threshold": 3.0}, False),
        (0.001, 0.004, {"min_duration": 0.0}, True),
        (0.020, 0.010, {}, False),  # faster is never a regression
    ],
)
def test_duration_threshold_and_noise_floor(
    base_time: float, new_time: float, options: dict[str, Any], regression: bool
) -> None:
    found = kinds(
        report({T: [fp(USERS, 1, base_time)]}), report({T: [fp(USERS, 1, new_time)]}), **options
    )
    assert (("duration", T, True) in found) is regression


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


def test_overall_catches_many_small_slowdowns() -> None:
    # Each test: 3 ms -> 6 ms, i.e. x1.2 against the 5 ms floor: not a regression on its own.
    # Summed over four tests: 12 ms -> 24 ms, x2.
    names = [f"t::test_{i}" for i in range(4)]
    base = report({n: [fp(USERS, 1, 0.003)] for n in names})
    new = report({n: [fp(USERS, 1, 0.006)] for n in names})
    assert kinds(base, new) == [("duration", OVERALL, True)]


def test_text_output_is_an_aligned_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write(tmp_path, "base.json", report({T: [fp(USERS, 1), fp(ADDR, 1)]}))
    new = write(
        tmp_path, "new.json", report({T: [fp(USERS, 1, 0.05), fp(ADDR, 51), fp(ORDERS, 2)]})
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
    assert "x50.00" in out
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
        (b"\xff\xfe\x00garbage", "not UTF-8"),
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
