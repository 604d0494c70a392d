"""What a new user meets first: the core import stays core, the README's commands and links
hold, the SQLModel example runs.

The real core-only installs (Python 3.10 + SQLAlchemy 2.0, Python 3.13 + SQLAlchemy 2.1, no
greenlet) and the README's demo command in a bare virtual environment are run by .ci/run;
these are the fast checks that catch a regression inside the test suite already.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Modules a core install does not have: importing any of them from the core paths breaks
#: `pip install poolguard`.
NOT_CORE = (
    "greenlet",
    "sqlalchemy.ext.asyncio",
    "httpx",
    "fastapi",
    "uvicorn",
    "redis",
    "pytest",
    "sqlmodel",
    "psycopg",
    "psycopg2",
    "pymysql",
    "asyncpg",
    "aiomysql",
    "aiosqlite",
    "opentelemetry.sdk",
)


def test_the_core_paths_import_nothing_beyond_the_core() -> None:
    """Import, guard a sync engine, run a statement, build the middleware, load every CLI
    command and the whole demo package: none of it may pull in an optional module."""
    code = f"""
import importlib, pkgutil, sys
import sqlalchemy as sa
import poolguard
from poolguard import PoolGuard, PoolGuardMiddleware, RouteRule
from starlette.applications import Starlette
engine = sa.create_engine("sqlite://")
guard = PoolGuard(engine)
with engine.connect() as c:
    c.exec_driver_sql("SELECT 1")
PoolGuardMiddleware(Starlette(), guard=guard, routes={{}})
guard.close()
import poolguard.tools.cli, poolguard.tools.check, poolguard.tools.diff, poolguard.middleware
import poolguard.tools.demo
for m in pkgutil.iter_modules(poolguard.tools.demo.__path__):
    if m.name != "__main__":
        importlib.import_module("poolguard.tools.demo." + m.name)
not_core = {NOT_CORE!r}
loaded = sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in not_core))
print(" ".join(loaded))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the core paths imported: {result.stdout.strip()}"


def test_every_demo_module_is_under_500_lines() -> None:
    demo = ROOT / "src" / "poolguard" / "tools" / "demo"
    sizes = {p.name: len(p.read_text().splitlines()) for p in demo.glob("*.py")}
    assert sizes, "the demo package is missing"
    assert all(n < 500 for n in sizes.values()), sizes


@pytest.mark.parametrize("marker", ["test-command", "demo-command"])
def test_readme_commands_are_where_ci_reads_them(marker: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n```\n(.+?)\n```\n<!-- /{marker} -->", readme, re.S)
    assert block, f"README.md has no command between <!-- {marker} --> markers"
    command = block.group(1)
    assert "\n" not in command
    if marker == "demo-command":
        # What a new user runs: the core install only, no extras.
        assert "pip install -q -e . " in command + " "
        assert command.endswith("poolguard demo")


def test_relative_links_in_readme_and_docs_resolve() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_sqlmodel_example_self_test() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sqlmodel_app.py"), "--self-test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("self-test passed: sqlmodel_app ("), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
