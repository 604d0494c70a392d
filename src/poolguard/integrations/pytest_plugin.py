"""pytest plugin: query budgets in tests, and query reports for ``poolguard diff``.

The postmortem lesson was that the bad query was visible before the deploy, to anyone who had
counted: a page that ran one ``SELECT`` per row (an N+1), or a query that suddenly took ten times
longer. This plugin counts, in the test suite, so the regression fails a test or the CI gate
instead of the site.

* ``@pytest.mark.query_budget(max_statements=..., max_db_time=..., max_repeats=...)`` fails a test
  that runs too many statements, spends too long in the database, or runs one statement shape
  more than ``max_repeats`` times (the N+1 signature).
* The ``query_budget`` fixture exposes the numbers and checks any block:
  ``with query_budget(max_repeats=1): ...``.
* ``--poolguard-report=PATH`` records every test and writes one JSON report for
  ``poolguard diff``.

Why it is inert unless asked for: it is registered for every pytest run in an environment where
poolguard is installed (the ``pytest11`` entry point), and nobody should pay for, or be surprised
by, listeners on their engines because a dependency is installed. So listeners exist only while a
marked test, a test using the fixture, or a ``with`` block runs, or for each test under
``--poolguard-report``.

Why class-level listeners on ``sqlalchemy.engine.Engine``: they see every engine, including ones
created before the test, engines inside the application under test, and an ``AsyncEngine``'s
``sync_engine``, without the test having to hand them over. They are removed (``event.remove``)
as soon as nothing records.

What is counted: the call phase of a test (the test body), not fixture setup or teardown, so that
seeding data in a fixture does not eat the budget. A statement counts when it is sent
(``before_cursor_execute``), so failing statements count too; its time is measured until
``after_cursor_execute``. Only fingerprints are kept (an id, a literal-free normal form and a
summary): never a literal, never a parameter, so reports are safe to publish as CI artifacts.

pytest-xdist: ``--poolguard-report`` refuses to run with ``-n`` (each worker would overwrite the
same file with its share of the tests, and the diff would then report tests as missing). Markers
and the fixture work under xdist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from poolguard.integrations.query_budget import (
    LIMIT_NAMES,
    MARKER,
    FingerprintStats,
    Limits,
    QueryBudgetBlock,
    QueryBudgetExceeded,
    QueryRecorder,
    failure_message,
    listeners_installed,
)
from poolguard.tools.diff import REPORT_VERSION

__all__ = [
    "FingerprintStats",
    "QueryBudgetBlock",
    "QueryBudgetExceeded",
    "QueryRecorder",
    "listeners_installed",
]

# --------------------------------------------------------------------------- pytest hooks

_LIMITS_KEY = pytest.StashKey[Limits]()
_FIXTURE_KEY = pytest.StashKey[QueryRecorder]()
_REPORT_KEY = pytest.StashKey["_Report"]()


class _Report:
    """The ``--poolguard-report`` file being built: node id -> what the test ran."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}

    def write(self) -> None:
        doc = {"version": REPORT_VERSION, "tests": dict(sorted(self.tests.items()))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash or a concurrent reader never sees half a report.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("poolguard", "poolguard query budgets")
    group.addoption(
        "--poolguard-report",
        dest="poolguard_report",
        metavar="PATH",
        default=None,
        help="record the statements of every test and write a JSON report to PATH, for "
        "`poolguard diff BASE.json NEW.json` (not with pytest-xdist)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(max_statements=None, max_db_time=None, max_repeats=None): fail the test "
        "when its body runs more statements, more seconds of database time, or one statement "
        "shape more times (N+1) than allowed (poolguard)",
    )
    path = config.getoption("poolguard_report")
    if path:
        if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
            raise pytest.UsageError(
                "--poolguard-report does not work with pytest-xdist (each worker would "
                "overwrite the report); run it with -n 0 or -p no:xdist"
            )
        config.stash[_REPORT_KEY] = _Report(Path(config.invocation_params.dir, path))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Validate at collection, before anything runs: a misspelt limit would otherwise be
    # silently ignored and the test would pass without any budget at all.
    errors = []
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            continue
        where = f"{item.nodeid}: @pytest.mark.{MARKER}"
        if marker.args:
            errors.append(f"{where} takes keyword arguments only ({', '.join(LIMIT_NAMES)})")
            continue
        try:
            limits = Limits.parse(marker.kwargs)
        except (TypeError, ValueError) as e:
            errors.append(f"{where}: {e}")
            continue
        if limits.empty:
            errors.append(f"{where} needs at least one of {', '.join(LIMIT_NAMES)}")
            continue
        item.stash[_LIMITS_KEY] = limits
    if errors:
        raise pytest.UsageError(*errors)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    limits = item.stash.get(_LIMITS_KEY, None)
    report = item.config.stash.get(_REPORT_KEY, None)
    fixture_rec = item.stash.get(_FIXTURE_KEY, None)
    call_rec = QueryRecorder() if limits is not None or report is not None else None
    recorders = [r for r in (call_rec, fixture_rec) if r is not None]
    for r in recorders:
        r.start()
    try:
        result = yield
    finally:
        for r in recorders:
            r.stop()
        if report is not None and call_rec is not None:
            report.tests[item.nodeid] = call_rec._as_report()
    if limits is not None and call_rec is not None:
        violations = limits.violations(call_rec)
        if violations:
            message = failure_message("", violations)
            pytest.fail(message, pytrace=False)
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    report = session.config.stash.get(_REPORT_KEY, None)
    if report is not None:
        report.write()


@pytest.fixture
def query_budget(request: pytest.FixtureRequest) -> Iterator[QueryRecorder]:
    """Statements, database time and fingerprints of this test's body; call it for a checked
    block: ``with query_budget(max_statements=3, max_repeats=1): ...``."""
    rec = QueryRecorder()
    request.node.stash[_FIXTURE_KEY] = rec
    try:
        yield rec
    finally:
        rec.stop()  # normally stopped already, after the call phase
        del request.node.stash[_FIXTURE_KEY]
