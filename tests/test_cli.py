"""The ``poolguard`` console script: help, usage errors and the ``demo`` pass-through."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from poolguard.tools.cli import main


def console_script() -> str:
    """The installed ``poolguard`` script of the running interpreter's environment."""
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        script = directory / "poolguard"
        if script.exists():
            return str(script)
    pytest.fail("the poolguard console script is not installed: pip install -e .")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("check", "diff", "demo"):
        assert f"    {command} " in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("command", "expected"),
    [("check", "--max-overflow"), ("diff", "--duration-threshold")],
)
def test_subcommand_help(command: str, expected: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: poolguard {command} ")
    assert expected in result.stdout


def test_a_bad_argument_is_one_line_and_exit_2() -> None:
    result = run("check", "--workers", "many", "--replicas", "1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "poolguard check: error: argument --workers: expected a whole number, got 'many' "
        "(see 'poolguard check --help')\n"
    )


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poolguard", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("poolguard ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["deploy"], "invalid choice: 'deploy'"),
        (["diff", "a.json"], "the following arguments are required: NEW.json"),
        (["diff", "a.json", "b.json", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "--replicas", "1"], "the following arguments are required: --workers"),
        (["check", "--workers", "1", "--replicas", "1", "--pool-size", "-1"], "must be >= 0"),
    ],
)
def test_usage_errors_in_process(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert "--help" in captured.err


def test_help_returns_zero_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: poolguard" in capsys.readouterr().out


def test_demo_passes_its_arguments_through_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake = types.ModuleType("poolguard.tools.demo")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "poolguard.tools.demo", fake)
    assert main(["demo", "--rate", "5", "slow", "--help"]) == 7
    assert main(["demo"]) == 7
    assert seen == [["--rate", "5", "slow", "--help"], []]


def test_demo_unavailable_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "poolguard.tools.demo", None)  # import fails
    assert main(["demo", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("poolguard demo: cannot start: poolguard.tools.demo ")
    assert "not available in this installation" not in captured.err
    assert "pip install" in captured.err


@pytest.mark.parametrize(
    ("missing", "error", "expected"),
    [
        # SQLAlchemy's own error for a missing greenlet names no module: recognised by its text.
        (
            None,
            ImportError(
                "The SQLAlchemy asyncio module requires that the Python 'greenlet' "
                "library is installed."
            ),
            "greenlet is not installed: pip install 'poolguard[asyncio]'",
        ),
        ("redis", None, "redis is not installed: pip install 'poolguard[redis]'"),
        ("psycopg", None, "psycopg is not installed: pip install 'poolguard[postgresql]'"),
    ],
)
def test_a_missing_dependency_of_the_demo_names_package_and_extra(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str | None,
    error: ImportError | None,
    expected: str,
) -> None:
    import importlib

    real = importlib.import_module

    def failing(name: str, package: str | None = None) -> types.ModuleType:
        if name == ".demo":
            raise (
                error
                if error is not None
                else ModuleNotFoundError(f"No module named {missing!r}", name=missing)
            )
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", failing)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == f"poolguard demo: cannot start: {expected}\n"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://u:pw@127.0.0.1:1/db",
            "the postgresql+asyncpg driver needs asyncpg and greenlet, which are not installed: "
            "pip install 'poolguard[asyncpg]'",
        ),
        (
            "mysql+pymysql://u:pw@127.0.0.1:1/db",
            "the mysql+pymysql driver needs pymysql, which is not installed: "
            "pip install 'poolguard[mysql]'",
        ),
    ],
)
def test_check_names_the_missing_driver_and_its_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    """On a core install the drivers are missing: `poolguard check` says which extra brings
    them (simulated here by hiding the modules)."""
    for module in ("asyncpg", "greenlet", "pymysql"):
        monkeypatch.setitem(sys.modules, module, None)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "greenlet" else real_find_spec(name, *a),
    )
    args = ["check", "--database-url", url, "--workers", "1", "--replicas", "1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"poolguard check: {expected}\n"
    assert "pw" not in captured.err
