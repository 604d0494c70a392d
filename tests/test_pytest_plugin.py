"""The pytest plugin, exercised the way users meet it: small test files run by pytester.

The inner suites use SQLite in memory (each test builds and disposes its own engine). They run
in this process, so after every test the class-level listeners must be gone again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from poolguard.integrations.pytest_plugin import listeners_installed
from poolguard.tools import cli
from poolguard.tools.diff import load_report

pytest_plugins = ["pytester"]

# Shared by every inner suite: an engine with 20 users and no addresses, seeded in setup so
# that the tests can check that setup statements are not counted.
CONFTEST = """
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import event


@pytest.fixture
def engine():
    e = sa.create_engine("sqlite://", poolclass=sa.StaticPool,
                         connect_args={"check_same_thread": False})

    out = [0]

    @event.listens_for(e, "connect")
    def _slow(dbapi_conn, record):
        dbapi_conn.create_function("slow", 1, lambda s: time.sleep(s) or 1)

    @event.listens_for(e, "checkout")
    def _out(*args):
        out[0] += 1

    @event.listens_for(e, "checkin")
    def _in(*args):
        out[0] -= 1

    with e.begin() as c:
        c.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        c.exec_driver_sql(
            "CREATE TABLE addresses (id INTEGER PRIMARY KEY, user_id INT, email TEXT)"
        )
        for i in range(20):
            c.execute(sa.text("INSERT INTO users (id, name) VALUES (:i, :n)"),
                      {"i": i, "n": f"user{i}"})
    yield e
    assert out[0] == 0, "a connection is still checked out"
    e.dispose()


def n_plus_one(engine):
    with engine.connect() as c:
        ids = [r[0] for r in c.execute(sa.text("SELECT id FROM users ORDER BY id"))]
        for i in ids:
            c.execute(sa.text("SELECT email FROM addresses WHERE addresses.user_id = :u"),
                      {"u": i})
"""

# Hypothesis's plugin costs about a second per in-process run and is not needed inside.
INI = """
[pytest]
addopts = -p no:hypothesispytest
asyncio_default_fixture_loop_scope = function
"""


def _plugin_listeners() -> list[object]:
    """Listeners a brand-new engine would run that come from the plugin module."""
    engine = sa.create_engine("sqlite://")
    try:
        found = [
            fn
            for name in ("before_cursor_execute", "after_cursor_execute")
            for fn in getattr(engine.dispatch, name)
            if getattr(fn, "__module__", "") == "poolguard.integrations.query_budget"
        ]
    finally:
        engine.dispose()
    return found


@pytest.fixture(autouse=True)
def _no_listener_left() -> Iterator[None]:
    assert not listeners_installed()
    yield
    assert not listeners_installed(), "the plugin left its listeners on Engine"
    assert _plugin_listeners() == []


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return pytester


def test_marker_within_budget_passes_and_listeners_live_only_during_the_test(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from poolguard.integrations.pytest_plugin import listeners_installed

        @pytest.mark.query_budget(max_statements=3, max_repeats=1, max_db_time=5.0)
        def test_ok(engine):
            assert listeners_installed()
            with engine.connect() as c:
                c.execute(sa.text("SELECT count(*) FROM users"))
                c.execute(sa.text("SELECT count(*) FROM addresses"))

        def test_after(engine):
            assert not listeners_installed()
        """
    )
    result = suite.runpytest("--strict-markers")
    result.assert_outcomes(passed=2)


def test_marker_fails_on_too_many_statements(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(max_statements=2)
        def test_chatty(engine):
            with engine.connect() as c:
                for i in range(3):
                    c.execute(sa.text("SELECT name FROM users WHERE id = :i"), {"i": i})
        """
    )
    result = suite.runpytest("-ra")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "query budget exceeded: 3 statements > max_statements=2" in out
    assert re.search(
        r"3 x SELECT users \[[0-9a-f]{16}\]: select name from users where id = \?", out
    ), out


def test_marker_detects_n_plus_one_with_fingerprint_summary_and_normal_form(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest
        from conftest import n_plus_one

        @pytest.mark.query_budget(max_repeats=5)
        def test_listing(engine):
            n_plus_one(engine)
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert re.search(
        r"N\+1: SELECT addresses \[[0-9a-f]{16}\] ran 20 times \(max_repeats=5\): "
        r"select email from addresses where addresses\.user_id = \?",
        out,
    ), out
    # The statement that ran once is not an offender and is not named.
    assert "N+1: SELECT users" not in out


def test_marker_fails_on_database_time(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(max_db_time=0.02)
        def test_slow(engine):
            with engine.connect() as c:
                c.execute(sa.text("SELECT slow(0.05)"))
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    found = re.search(r"db time (\d+\.\d+)s > max_db_time=0\.02", out)
    assert found, out
    assert float(found.group(1)) >= 0.05  # the sleep is measured, whatever the machine's load
    assert re.search(r"s in 1 x SELECT \[[0-9a-f]{16}\]: select slow\(\?\)", out), out


def test_marker_counts_the_body_only_and_does_not_mask_a_real_failure(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest
        from conftest import n_plus_one

        # The engine fixture runs 22 statements in setup: none of them count.
        @pytest.mark.query_budget(max_statements=0)
        def test_setup_not_counted(engine):
            pass

        @pytest.mark.query_budget(max_repeats=1)
        def test_real_failure(engine):
            n_plus_one(engine)
            assert 1 == 2, "the real problem"
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "the real problem" in out
    assert "query budget exceeded" not in out


def test_marker_applies_to_async_engines_and_other_threads(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import asyncio
        import threading

        import pytest
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import create_async_engine

        @pytest.mark.query_budget(max_statements=2)
        def test_async_engine():
            async def go():
                e = create_async_engine("sqlite+aiosqlite://")
                async with e.connect() as c:
                    for _ in range(3):
                        await c.execute(sa.text("SELECT 1"))
                await e.dispose()
            asyncio.run(go())

        @pytest.mark.query_budget(max_statements=2)
        def test_thread(engine):
            def work():
                with engine.connect() as c:
                    for _ in range(3):
                        c.execute(sa.text("SELECT 1"))
            t = threading.Thread(target=work)
            t.start()
            t.join()
        """
    )
    # -rN: no short summary, which repeats failure messages in full when CI is set.
    result = suite.runpytest("-rN")
    result.assert_outcomes(failed=2)
    assert result.stdout.str().count("3 statements > max_statements=2") == 2


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("max_statement=3", "unknown argument 'max_statement'"),
        ("max_repeats='5'", "max_repeats must be an int, got str"),
        ("max_statements=True", "max_statements must be an int, got bool"),
        ("max_db_time='1s'", "max_db_time must be a number of seconds, got str"),
        ("max_repeats=0", "max_repeats must be >= 1"),
        ("3", "takes keyword arguments only"),
        ("", "needs at least one of max_statements, max_db_time, max_repeats"),
    ],
)
def test_marker_arguments_are_validated_before_anything_runs(
    suite: pytest.Pytester, marker: str, message: str
) -> None:
    suite.makepyfile(
        f"""
        import pytest

        @pytest.mark.query_budget({marker})
        def test_it():
            raise AssertionError("must not run")
        """
    )
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert message in err
    assert "test_marker_arguments_are_validated_before_anything_runs.py::test_it" in err
    assert "must not run" not in result.stdout.str()


def test_fixture_records_the_body_and_checks_blocks(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import re

        import pytest
        import sqlalchemy as sa
        from conftest import n_plus_one
        from poolguard.integrations.pytest_plugin import QueryBudgetExceeded

        def test_numbers(engine, query_budget):
            assert query_budget.statements == 0  # the seeding in setup is not counted
            with engine.connect() as c:
                c.execute(sa.text("SELECT name FROM users WHERE id = 1"))
                c.execute(sa.text("SELECT name FROM users WHERE id = 2"))
            assert query_budget.statements == 2
            assert query_budget.db_time > 0
            [(fid, stats)] = query_budget.fingerprints.items()
            summary, normalized, count, total_time = stats
            assert re.fullmatch("[0-9a-f]{16}", fid)
            assert (summary, normalized, count) == (
                "SELECT users", "select name from users where id = ?", 2)
            assert 0 < total_time <= query_budget.db_time

        def test_block_passes(engine, query_budget):
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
                with query_budget(max_statements=1, max_repeats=1) as block:
                    c.execute(sa.text("SELECT count(*) FROM users"))
            assert block.statements == 1
            assert query_budget.statements == 2

        def test_block_fails(engine, query_budget):
            with pytest.raises(QueryBudgetExceeded, match=r"N\\+1: SELECT addresses .* ran 20"):
                with query_budget(max_repeats=3):
                    n_plus_one(engine)

        def test_block_keeps_the_real_exception(engine, query_budget):
            with pytest.raises(ZeroDivisionError):
                with query_budget(max_statements=0):
                    with engine.connect() as c:
                        c.execute(sa.text("SELECT 1"))
                    1 / 0

        def test_block_arguments(query_budget):
            with pytest.raises(TypeError, match="max_repeats must be an int"):
                query_budget(max_repeats="3")
            with pytest.raises(TypeError, match="max_statement"):
                query_budget(max_statement=3)

        def test_uncaught_block_failure(engine, query_budget):
            with query_budget(max_statements=1):
                n_plus_one(engine)
        """,
    )
    result = suite.runpytest("-ra")
    result.assert_outcomes(passed=5, failed=1)
    out = result.stdout.str()
    assert "test_uncaught_block_failure" in out
    assert "query budget exceeded in block: 21 statements > max_statements=1" in out


def test_report_is_written_well_formed_and_without_literals(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from conftest import n_plus_one

        def test_queries(engine):
            n_plus_one(engine)
            with engine.connect() as c:
                c.execute(sa.text("SELECT id FROM users WHERE name = 'hunter2-literal'"))
                c.execute(sa.text("SELECT id FROM users WHERE name = :n"),
                          {"n": "param-secret-42"})

        def test_nothing():
            pass

        @pytest.mark.query_budget(max_repeats=2)
        def test_failing(engine):
            n_plus_one(engine)
        """
    )
    result = suite.runpytest("--poolguard-report=reports/run.json")
    result.assert_outcomes(passed=2, failed=1)
    path = Path(suite.path, "reports", "run.json")
    text = path.read_text(encoding="utf-8")
    assert "hunter2" not in text
    assert "param-secret-42" not in text
    assert "user1" not in text  # seeded parameter values never appear either

    raw = json.loads(text)
    assert raw["version"] == 1
    assert set(raw) == {"version", "tests"}
    report = load_report(path)  # the diff's strict validation accepts it
    mod = "test_report_is_written_well_formed_and_without_literals.py"
    assert set(report.tests) == {
        f"{mod}::test_queries",
        f"{mod}::test_nothing",
        f"{mod}::test_failing",
    }
    queries = report.tests[f"{mod}::test_queries"]
    assert queries.statements == 1 + 20 + 2
    by_summary = {(r.summary, r.normalized): r.count for r in queries.fingerprints.values()}
    assert by_summary == {
        ("SELECT users", "select id from users order by id"): 1,
        ("SELECT addresses", "select email from addresses where addresses.user_id = ?"): 20,
        ("SELECT users", "select id from users where name = ?"): 2,
    }
    assert queries.db_time == pytest.approx(
        sum(r.total_time for r in queries.fingerprints.values()), abs=1e-5
    )
    assert report.tests[f"{mod}::test_nothing"].statements == 0
    assert report.tests[f"{mod}::test_failing"].statements == 21
    for test in raw["tests"].values():
        for fid, fp in test["fingerprints"].items():
            assert re.fullmatch("[0-9a-f]{16}", fid)
            assert set(fp) == {"summary", "normalized", "count", "total_time", "histogram"}
            # one bucket per execution-time range, every execution counted once
            assert sum(n for _, n in fp["histogram"]) == fp["count"]
            assert all(isinstance(upper, float) and upper > 0 for upper, _ in fp["histogram"])


def test_report_feeds_poolguard_diff(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    suite.makepyfile(
        """
        import os
        import sqlalchemy as sa

        def test_listing(engine):
            with engine.connect() as c:
                ids = [r[0] for r in c.execute(sa.text("SELECT id FROM users"))]
                if os.environ.get("BAD_DEPLOY"):
                    for i in ids:
                        c.execute(sa.text("SELECT name FROM users WHERE id = :i"), {"i": i})
                else:
                    c.execute(sa.text("SELECT name FROM users WHERE id IN (1, 2, 3)"))
        """
    )
    suite.runpytest("--poolguard-report=base.json").assert_outcomes(passed=1)
    monkeypatch.setenv("BAD_DEPLOY", "1")
    suite.runpytest("--poolguard-report=new.json").assert_outcomes(passed=1)
    base, new = str(suite.path / "base.json"), str(suite.path / "new.json")
    capsys.readouterr()
    assert cli.main(["diff", base, base]) == 0
    assert cli.main(["diff", base, new]) == 1
    out = capsys.readouterr().out
    assert "select name from users where id = ?" in out
    assert "removed" in out  # the IN-list query is gone


def test_plugin_is_inert_unless_asked_for(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import sqlalchemy as sa
        from poolguard.integrations.pytest_plugin import listeners_installed

        def test_plain(engine, request):
            assert request.config.pluginmanager.hasplugin("poolguard")
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
                assert not listeners_installed()
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1)
    assert not list(suite.path.glob("*.json"))


def test_report_refuses_xdist(pytester: pytest.Pytester) -> None:
    # pytest-xdist is not installed here: a conftest declares its option (-n/--numprocesses,
    # dest "numprocesses") the same way; only the long form, as short ones are pytest's.
    pytester.makeconftest(
        """
        def pytest_addoption(parser):
            parser.addoption("--numprocesses", dest="numprocesses", default=None, type=int)
        """
    )
    pytester.makeini(INI)
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--numprocesses=2", "--poolguard-report=r.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--poolguard-report does not work with pytest-xdist" in result.stderr.str()
    assert not (pytester.path / "r.json").exists()
    assert pytester.runpytest("--numprocesses=0", "--poolguard-report=r.json").ret == 0
    assert (pytester.path / "r.json").exists()
