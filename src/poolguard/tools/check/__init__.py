"""``poolguard check``: will the whole fleet's pools fit in the database server?

Every process sizes its own pool, so nobody sees the sum until a deploy or an autoscaler adds
replicas and the server answers "too many clients" to the healthy ones. This check does the
arithmetic against the live server's real limits (:mod:`~poolguard.tools.check.arithmetic`)
and says OK or AT RISK, with the headroom, a per-process pool that fits, and the server-side
timeouts worth setting as a backstop (a server with ``statement_timeout = 0`` lets any client
that is not guarded hold a connection forever).

The package is cut by concern: ``facts`` (the data), ``server`` (reading it, bounded in time),
``arithmetic`` (the verdict), ``report`` (text and JSON); this module is the command line.
Credentials never reach the output: URLs are shown and driver errors scrubbed by
:mod:`poolguard.tools.urls`.

Exit status: 0 OK, 1 AT RISK, 2 bad input or cannot connect (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from poolguard.tools.check.arithmetic import Assessment, Status, assess
from poolguard.tools.check.facts import Backend, CheckError, Fleet, ServerFacts
from poolguard.tools.check.report import render_json, render_text
from poolguard.tools.check.server import APPLICATION_NAME, gather
from poolguard.tools.urls import UrlError, display_url, sanitize

__all__ = [
    "APPLICATION_NAME",
    "Assessment",
    "Backend",
    "CheckError",
    "Fleet",
    "ServerFacts",
    "Status",
    "assess",
    "configure_parser",
    "gather",
    "render_json",
    "render_text",
    "run",
    "safe_url",
    "sanitize",
]


def safe_url(url: str) -> str:
    """``driver://host:port/database``: what may be shown of a URL (see
    :func:`poolguard.tools.urls.display_url`); a malformed URL is a :class:`CheckError`."""
    try:
        return display_url(url)
    except UrlError as e:
        raise CheckError(f"--database-url {e}") from None


def _int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{note}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``check``'s arguments to its sub-parser (the CLI owns the parser tree)."""
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of the server; defaults to $POOLGUARD_DATABASE_URL or "
        "$DATABASE_URL (prefer those: a password on the command line shows in ps)",
    )
    parser.add_argument(
        "--pool-size",
        type=_int_at_least(0, " (0 means no limit)"),
        default=5,
        help="each process's pool_size (default 5, SQLAlchemy's)",
    )
    parser.add_argument(
        "--max-overflow",
        type=_int_at_least(-1, " (-1 means no limit)"),
        default=10,
        help="each process's max_overflow (default 10, SQLAlchemy's)",
    )
    parser.add_argument(
        "--workers", type=_int_at_least(1), help="processes per replica (not with --fleet)"
    )
    parser.add_argument(
        "--replicas", type=_int_at_least(1), help="replicas (pods, hosts) (not with --fleet)"
    )
    parser.add_argument(
        "--fleet",
        metavar="REDIS_URL",
        help="read the live fleet (its members and shared cap) from Redis instead of "
        "--workers/--replicas; needs poolguard[redis]",
    )
    parser.add_argument("--fleet-name", metavar="NAME", help="the RedisFleet name (with --fleet)")
    parser.add_argument(
        "--other-clients",
        type=_int_at_least(0),
        default=0,
        help="connections used by everything else: jobs, cron, admin, replication (default 0)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting after this long (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Run ``poolguard check`` from parsed arguments; returns the exit status."""
    url = (
        args.database_url
        or os.environ.get("POOLGUARD_DATABASE_URL")
        or (os.environ.get("DATABASE_URL"))
    )
    if not url:
        print(
            "poolguard check: give --database-url (or set POOLGUARD_DATABASE_URL)",
            file=sys.stderr,
        )
        return 2
    try:
        fleet = _deployment(args)
        database = safe_url(url)
        facts = gather(url, args.connect_timeout)
    except CheckError as e:
        print(f"poolguard check: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a one-shot command: a traceback could carry the URL
        print(
            f"poolguard check: unexpected {type(e).__name__}: {sanitize(str(e), url)}",
            file=sys.stderr,
        )
        return 2
    verdict = assess(facts, fleet)
    render = render_json if args.json else render_text
    sys.stdout.write(render(database, facts, fleet, verdict))
    return 0 if verdict.status == "OK" else 1


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with how the deployment was described (argparse cannot say "these two,
    or that one"), for the CLI to report as a usage error; None when it is fine."""
    if args.fleet is None:
        if args.fleet_name is not None:
            return "--fleet-name goes with --fleet"
        missing = [f for f in ("--workers", "--replicas") if getattr(args, f[2:]) is None]
        if missing:
            return (
                f"the following arguments are required: {', '.join(missing)} "
                "(or --fleet to read a live fleet)"
            )
        return None
    if args.workers is not None or args.replicas is not None:
        return "--fleet reads the members from Redis: leave out --workers and --replicas"
    if not args.fleet_name:
        return "--fleet needs --fleet-name (the RedisFleet's name)"
    return None


def _deployment(args: argparse.Namespace) -> Fleet:
    """The deployment to check: the one described by the arguments, or the live fleet."""
    problem = usage_problem(args)
    if problem is not None:
        raise CheckError(problem)
    if args.fleet is None:
        return Fleet(**_as_given(args), workers=args.workers, replicas=args.replicas)
    from poolguard.fleet import read_fleet

    try:
        live = read_fleet(args.fleet, args.fleet_name, timeout=args.connect_timeout)
    except ImportError as e:
        raise CheckError(str(e)) from None
    except Exception as e:  # redis-py's errors name the address, never a password we add
        raise CheckError(
            f"cannot read fleet {args.fleet_name!r} from Redis: {type(e).__name__}"
        ) from None
    if not live["exists"] or live["max_connections"] is None:
        raise CheckError(f"no fleet named {args.fleet_name!r} in that Redis")
    return Fleet(
        **_as_given(args),
        workers=max(1, len(live["members"])),
        replicas=1,
        cap=live["max_connections"],
        name=args.fleet_name,
    )


def _as_given(args: argparse.Namespace) -> dict[str, Any]:
    """The Fleet fields that both kinds of deployment take from the arguments as they are."""
    return {name: getattr(args, name) for name in ("pool_size", "max_overflow", "other_clients")}
