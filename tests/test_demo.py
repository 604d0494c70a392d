"""``poolguard demo``: run for real, in a subprocess, through the console script.

The demo is the README's first promise, so these tests check what it claims in its own
output (the table and the JSON), not its internals. Durations are the shortest that still
show the contrast: the rogue needs about six seconds to take the unprotected pool.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from poolguard.tools.cli import main


def console_script() -> list[str]:
    """The installed ``poolguard`` script of the running interpreter's environment."""
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        script = directory / "poolguard"
        if script.exists():
            return [str(script)]
    return [sys.executable, "-m", "poolguard"]


def demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*console_script(), "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table_row(output: str, label: str) -> list[str]:
    """The two cells (WITHOUT, WITH) of one row of the final table."""
    for line in output.splitlines():
        if line.startswith(label + "  "):
            cells = re.split(r"\s{2,}", line[len(label) :].strip())
            assert len(cells) == 2, line
            return cells
    raise AssertionError(f"no {label!r} row in:\n{output}")


def percent(cell: str) -> float:
    match = re.match(r"(\d+(?:\.\d+)?)% \((\d+)/(\d+)\)", cell)
    assert match, cell
    return float(match.group(1))


def test_table_shows_the_outage_and_the_rescue() -> None:
    result = demo("--duration", "8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Traceback" not in out + result.stderr
    assert "note:" not in out  # 8 s is enough for the contrast: no warning about it
    without, with_ = table_row(out, "healthy success (2xx)")
    assert percent(with_) >= 95.0, out
    assert percent(with_) > percent(without), out
    # The unprotected phase fails the way the outage did: the pool full, threads queued on
    # it, healthy clients giving up; the protected one times the rogue out and quarantines it.
    pool_without, pool_with = table_row(out, "max pool checkouts")
    assert pool_without == "15/15", out
    assert int(pool_with.split("/")[0]) < 15, out  # never exhausted with poolguard
    assert int(table_row(out, "max threads waiting for pool")[0]) > 0, out
    assert "gave up" in table_row(out, "healthy failures")[0], out
    rogue_with = table_row(out, "rogue outcomes")[1]
    assert "504" in rogue_with and "503" in rogue_with, out
    assert table_row(out, "quarantine events")[1].startswith("1 "), out
    # Each phase left one line behind; the progress lines are plain text (not a TTY).
    assert "\r" not in out
    assert re.search(r"^WITHOUT poolguard: healthy \d", out, re.M), out
    assert re.search(r"^WITH poolguard: healthy \d", out, re.M), out


def test_help() -> None:
    result = demo("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: poolguard demo")
    for option in ("--duration", "--database-url", "--json"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration: must be between"),
        (["--duration", "soon"], "--duration: not a number of seconds"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--database-url", "not a url"], "--database-url is not a database URL"),
        (["--database-url", "oracle://scott:tiger@db/orcl"], "'oracle' is not supported"),
        (["--database-url", "postgresql+asyncpg://u:pw@h/db"], "is an asyncio driver"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process through the CLI's own entry point (the subprocess path is the next test's).
    assert main(["demo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("poolguard demo: ")
    assert message in lines[0]
    assert "tiger" not in captured.err and "pw@" not in captured.err


def test_unreachable_server_is_one_line_without_credentials() -> None:
    result = demo(
        "--database-url", "postgresql+psycopg://alice:s3cret@127.0.0.1:1/shop", timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("poolguard demo: cannot use postgresql+psycopg://127.0.0.1:1/shop")
    assert "s3cret" not in result.stderr and "alice" not in result.stderr


@pytest.mark.postgresql
def test_json_on_postgresql(pg_url: str) -> None:
    url = sa.make_url(pg_url)
    result = demo("--duration", "1", "--json", "--database-url", pg_url)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    port = f":{url.port}" if url.port else ""
    assert report["database"] == f"{url.drivername}://{url.host}{port}/{url.database}"
    everything = result.stdout + result.stderr
    if url.password:
        assert str(url.password) not in everything
    if url.username:
        assert f"{url.username}@" not in everything
        assert f"{url.username}:" not in everything
    without, with_ = report["phases"]["without"], report["phases"]["with"]
    assert with_["healthy"]["success_rate"] >= 0.95
    assert with_["healthy"]["sent"] == without["healthy"]["sent"] > 0
    # Too short for the pool to fill, long enough for the server to stop the rogue:
    # pg_sleep() is cancelled by statement_timeout and answered 504.
    assert with_["rogue"]["outcomes"].get("504", 0) >= 1, with_
    assert without["rogue"]["outcomes"] == {"gave up": without["rogue"]["sent"]}
    assert with_["endpoint_threads"] == ["AnyIO worker thread"]
    # Progress went to stderr so that stdout stays pure JSON.
    assert "WITH poolguard" in result.stderr
