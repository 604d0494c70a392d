"""The ``poolguard`` command: ``check``, ``diff`` and ``demo``.

Each subcommand lives in its own module (check.py, diff.py, demo.py) and is imported only when it
runs, so ``poolguard --help`` stays fast and a missing optional dependency of one subcommand
cannot break the others; a missing one is named with the package and the extra that bring it
(:mod:`poolguard.extras`). Errors are one line on stderr with a non-zero exit status, never a
traceback: these commands run in CI and deploy pipelines, where a traceback buries the cause
(and could carry a database URL).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from poolguard.extras import describe_import_error, driver_problem

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``poolguard check: error: ... (see
    --help)``, instead of a usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from poolguard import __version__

    return __version__


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from poolguard.tools import check, diff

    parser = _Parser(
        prog="poolguard",
        description="Keeps one rogue query from taking down a web stack. "
        "See https://github.com/poolguard/poolguard/tree/main/docs",
    )
    parser.add_argument("--version", action="version", version=f"poolguard {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_check = commands.add_parser(
        "check",
        help="will the fleet's connection pools fit in the database server?",
        description="Compare the fleet's worst-case connection count with the server's "
        "limits and timeouts. Exit 0 OK, 1 AT RISK, 2 bad input or cannot connect.",
    )
    check.configure_parser(p_check)

    p_diff = commands.add_parser(
        "diff",
        help="compare two pytest query reports (the CI gate before a deploy)",
        description="Compare two --poolguard-report files: new statements, N+1 count "
        "growth, slower statements. Exit 0 no regression, 1 regressions, 2 bad input.",
    )
    diff.configure_parser(p_diff)

    p_demo = commands.add_parser(
        "demo",
        help="run the demonstration (arguments are passed through: poolguard demo --help)",
        add_help=False,  # so that `poolguard demo --help` reaches the demo's own parser
    )
    return parser, {"check": p_check, "diff": p_diff, "demo": p_demo}


def _run_demo(argv: list[str]) -> int:
    # Imported by name at call time (the same as `from .demo import main`): the demo's module
    # loads Starlette and the middleware, which the other commands do not need. It runs on
    # the core installation; should anything it imports be missing, the line names the
    # package and the extra (never "not available in this installation").
    try:
        demo = importlib.import_module(".demo", __package__)
    except ImportError as e:
        print(f"poolguard demo: cannot start: {describe_import_error(e)}", file=sys.stderr)
        return 2
    demo_main: Callable[[list[str]], int] = demo.main
    return int(demo_main(argv))


def _check_driver(args: argparse.Namespace) -> str | None:
    """A missing driver for ``poolguard check``'s URL, named with the extra that brings it
    (the check itself would only say that its module is missing)."""
    url = (
        args.database_url
        or os.environ.get("POOLGUARD_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
    )
    return driver_problem(url) if url else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``poolguard`` console script; returns the exit status.

    argparse's own exits (``--help``, ``--version``, usage errors) become return values too, so
    callers and tests get an ``int`` in every case.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = _build_parser()
    try:
        args, rest = parser.parse_known_args(args_in)
        if args.command == "demo":
            # Pass the demo's arguments through untouched and in order: everything after the
            # first "demo" token (top-level options take no values, so that token is the
            # subcommand).
            return _run_demo(args_in[args_in.index("demo") + 1 :])
        if rest:
            subparsers[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "check":
            from poolguard.tools import check

            problem = check.usage_problem(args)
            if problem is not None:
                subparsers["check"].error(problem)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command == "check":
        from poolguard.tools import check

        problem = _check_driver(args)
        if problem is not None:
            print(f"poolguard check: {problem}", file=sys.stderr)
            return 2
        return check.run(args)
    from poolguard.tools import diff

    return diff.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
