"""The test suite's own promises: a skip never hides a failure. Under CI set to any true
value a missing server fails its tests, and no test skips itself because one of poolguard's
own modules fails to import (that is a bug to see, not a dependency to miss)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

_PROBE_CONFTEST = f"""
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location(
    "poolguard_suite_conftest", {str(TESTS / "conftest.py")!r}
)
_m = sys.modules["poolguard_suite_conftest"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_m)
pg_url = _m.pg_url
"""

_PROBE_TEST = """
def test_needs_postgresql(pg_url):
    pass
"""


def _run_probe(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "conftest.py").write_text(_PROBE_CONFTEST)
    (tmp_path / "test_probe.py").write_text(_PROBE_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    # Port 1 on the loopback: refused at once, nothing listens there.
    env["POOLGUARD_TEST_PG"] = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


@pytest.mark.parametrize("value", ["1", "Yes", "on"])  # "true": CI itself runs with it
def test_ci_fails_a_missing_server(tmp_path: Path, value: str) -> None:
    out = _run_probe(tmp_path, value)
    assert re.search(r"\b1 failed\b", out), out
    assert "unreachable" in out


@pytest.mark.parametrize("value", [None, "0"])
def test_outside_ci_a_missing_server_skips(tmp_path: Path, value: str | None) -> None:
    out = _run_probe(tmp_path, value)
    assert re.search(r"\b1 skipped\b", out), out


def test_no_test_skips_on_poolguard_s_own_modules() -> None:
    """pytest's importorskip on a poolguard module would turn a broken module into a green
    run."""
    offenders = []
    pattern = re.compile(r"importorskip\(\s*['\"]poolguard")
    for path in sorted(TESTS.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{n}")
    assert offenders == []
