"""``poolguard diff`` on real reports: quiet on noise, loud on change.

The generated suite of benchmarks/bench_diff_noise.py (about 200 fast statements) is run for
real under ``--poolguard-report`` by pytester, in a subprocess as CI runs it. Identical runs
must diff clean with the defaults; an added N+1 and a 5 ms statement turned 20 ms must fail.
The benchmark runs the full 20 pairs; a few pairs here keep the suite's run time sane.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from poolguard.tools.diff import compare, load_report

pytest_plugins = ["pytester"]


def _bench() -> ModuleType:
    path = Path(__file__).parent.parent / "benchmarks" / "bench_diff_noise.py"
    spec = importlib.util.spec_from_file_location("bench_diff_noise", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUITE: str = _bench().SUITE


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Runs the generated suite once and returns its report's path."""
    pytester.makepyfile(test_noise_suite=SUITE)
    pytester.makeini("[pytest]\naddopts = -p no:asyncio -p no:hypothesispytest\n")

    def run_once(name: str, **env: str) -> Path:
        for key in ("NOISE_NPLUS1", "NOISE_SLOW"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        report = pytester.path / f"{name}.json"
        result = pytester.runpytest_subprocess(f"--poolguard-report={report}", "-q")
        result.assert_outcomes(passed=36)
        return report

    return run_once


def _regressions(base: Path, new: Path) -> list[tuple[str, str]]:
    result = compare(load_report(base), load_report(new))
    return [(f.kind, f.summary) for f in result.regressions]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
)
def test_identical_runs_pass_and_real_changes_fail(
    run: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else "sqlite://"
    monkeypatch.setenv("NOISE_URL", url)
    pairs = 3 if backend == "sqlite" else 2
    base = run("base-0")
    for i in range(pairs):
        a = base if i == 0 else run(f"base-{i}")
        b = run(f"again-{i}")
        assert _regressions(a, b) == [], f"pair {i}: identical runs failed the gate"
    assert load_report(base).tests  # the reports are real, not empty
    statements = sum(t.statements for t in load_report(base).tests.values())
    assert 180 <= statements <= 220

    found = _regressions(base, run("nplus1", NOISE_NPLUS1="1"))
    assert ("count", "SELECT noise_addresses") in found
    assert {kind for kind, _ in found} == {"count"}  # exact counts, nothing else moved

    found = _regressions(base, run("slow", NOISE_SLOW="0.020"))
    assert found == [("duration", "SELECT")]  # pg_sleep(:s): 5 ms -> 20 ms in six tests
