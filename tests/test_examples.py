"""Every example runs: its ``--self-test``, in a subprocess, exactly as examples/README.md says.

An example that no longer runs is worse than none (it is copied into applications), so CI
starts each one. The self-tests check the example's own claims, including one refusal each;
here we check that they ran to the end and said so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = ["fastapi_sync", "fastapi_async", "starlette_app", "worker"]


def clean_env() -> dict[str, str]:
    """The environment without DATABASE_URL: the examples' default is SQLite."""
    return {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}


def self_test(name: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--self-test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_passed(result: subprocess.CompletedProcess[str], name: str, dialect: str) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"self-test passed: {name} ("), result.stdout
    assert f" on {dialect}" in last, last
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_self_test_on_sqlite(name: str) -> None:
    assert_passed(self_test(name), name, "sqlite")


@pytest.mark.postgresql
def test_async_example_on_postgresql_with_asyncpg(pg_async_url: str) -> None:
    assert_passed(self_test("fastapi_async", pg_async_url), "fastapi_async", "postgresql+asyncpg")


@pytest.mark.postgresql
def test_sync_example_on_postgresql(pg_url: str) -> None:
    assert_passed(self_test("fastapi_sync", pg_url), "fastapi_sync", "postgresql")


def test_examples_import_as_uvicorn_would() -> None:
    """``uvicorn examples.<name>:app`` imports the module from the repository root."""
    code = (
        "import importlib\n"
        "for name in ('fastapi_sync', 'fastapi_async', 'starlette_app'):\n"
        "    module = importlib.import_module('examples.' + name)\n"
        "    assert callable(module.app), name\n"
        "    module.guard.close()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_readme_names_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}.py`" in readme
        assert f"python examples/{name}.py --self-test" in readme
