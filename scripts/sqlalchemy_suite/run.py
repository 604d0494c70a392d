#!/usr/bin/env python3
"""Run SQLAlchemy's own test suites bare and with a PoolGuard on every engine; print the difference.

    python scripts/sqlalchemy_suite/run.py --sdist /tmp/sasuite/sqlalchemy-2.1.9 \
        --python /tmp/sasuite/venv/bin/python [--out /tmp/sasuite/out] [FILE_OR_NODEID ...]

Without targets it runs every file of ``test/engine`` and ``test/ext/asyncio``, one pytest process
per file and mode (bounded by ``--timeout``), writes JUnit XML per file and mode under ``--out``,
and prints pass/fail counts per suite and every test that passes bare but fails guarded, with the
first line of its failure. ``--report-only`` re-reads the XML without running anything.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = ("test/engine", "test/ext/asyncio")


def targets_of(sdist: Path, given: list[str]) -> list[str]:
    if given:
        return given
    out = []
    for suite in SUITES:
        out += sorted(str(p.relative_to(sdist)) for p in (sdist / suite).glob("test_*.py"))
    return out


def slug(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", target)


def run_one(args: argparse.Namespace, target: str, mode: str) -> tuple[int, float]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / f"{slug(target)}.{mode}.xml"
    log = out / f"{slug(target)}.{mode}.log"
    env = dict(os.environ)
    env["POOLGUARD_SUITE"] = mode
    env["POOLGUARD_SUITE_LOG"] = str(out / f"{slug(target)}.{mode}.install.log")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        "timeout", "--signal=TERM", "--kill-after=30", str(args.timeout),
        args.python, "-m", "pytest",
        "-p", "poolguard_everywhere",
        "-p", "no:poolguard",        # poolguard's own (inert) plugin: out of the picture
        "-p", "no:cacheprovider",
        "-q", "-rfE", "--tb=short",
        f"--junitxml={xml}",
        *args.pytest_args,
        target,
    ]
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=args.sdist, env=env, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - t0


POOLGUARD_FRAME = re.compile(r"(poolguard/[\w/]+\.py):(\d+): in (\w+)")


def cause_of(text: str) -> str:
    """The deepest poolguard frame of a traceback and its ``E`` line: the grouping key."""
    frames = POOLGUARD_FRAME.findall(text)
    where = f"{frames[-1][0]}:{frames[-1][2]}" if frames else "(no poolguard frame)"
    errors = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    err = re.sub(r"0x[0-9a-f]+", "0x...", errors[0])[:100] if errors else ""
    return f"{where}  {err}"


def parse(xml: Path) -> dict[str, tuple[str, str]]:
    """nodeid-ish name -> (outcome, grouping key: deepest poolguard frame and error)."""
    res: dict[str, tuple[str, str]] = {}
    if not xml.exists():
        return res
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return res
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname')}::{tc.get('name')}"
        outcome, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                # a teardown error after a pass or failure is recorded as an extra element
                outcome = "failed" if child.tag == "failure" else "error"
                msg = cause_of((child.get("message") or "") + "\n" + (child.text or ""))
                break
            if child.tag == "skipped":
                outcome = "skipped"
        prev = res.get(name)
        if prev and prev[0] in ("failed", "error"):
            continue
        res[name] = (outcome, msg)
    return res


def report(args: argparse.Namespace, targets: list[str]) -> int:
    out = Path(args.out)
    per_suite: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"bare": collections.Counter(), "guard": collections.Counter()}
    )
    only_guarded: list[tuple[str, str, str]] = []
    only_bare: list[str] = []
    missing: list[str] = []
    for t in targets:
        suite = next((s for s in SUITES if t.startswith(s)), t.split("::")[0])
        bare = parse(out / f"{slug(t)}.bare.xml")
        guard = parse(out / f"{slug(t)}.guard.xml")
        if not bare or not guard:
            missing.append(t)
        for mode, res in (("bare", bare), ("guard", guard)):
            for outcome, _ in res.values():
                per_suite[suite][mode][outcome] += 1
        for name, (outcome, _msg) in bare.items():
            g = guard.get(name)
            if outcome == "passed" and (g is None or g[0] in ("failed", "error")):
                only_guarded.append((name, g[0] if g else "missing", g[1] if g else ""))
            if outcome in ("failed", "error") and g and g[0] == "passed":
                only_bare.append(name)
    print("== counts (passed / failed / error / skipped) ==")
    for suite, modes in per_suite.items():
        for mode in ("bare", "guard"):
            c = modes[mode]
            print(f"{suite:20} {mode:5} passed={c['passed']} failed={c['failed']} "
                  f"error={c['error']} skipped={c['skipped']}")
    print(f"\n== pass bare, fail guarded: {len(only_guarded)}, by cause ==")
    by_cause: dict[str, list[str]] = collections.defaultdict(list)
    for name, outcome, msg in only_guarded:
        by_cause[msg].append(f"{outcome:7} {name}")
    for msg, names in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        print(f"\n-- {len(names)}: {msg}")
        for n in sorted(names):
            print(f"   {n}")
    if only_bare:
        print(f"\n== fail bare, pass guarded (flaky?): {len(only_bare)} ==")
        for n in only_bare:
            print("  ", n)
    if missing:
        print("\n== no XML for (timed out or crashed; see the .log) ==")
        for m in missing:
            print("  ", m)
    return 1 if only_guarded or missing else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", required=True, help="unpacked SQLAlchemy sdist (has test/ and setup.cfg)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the suite's venv")
    p.add_argument("--out", default="/tmp/sasuite/out")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest process")
    p.add_argument("--modes", default="bare,guard")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[],
                   help="extra pytest argument (repeatable), e.g. --pytest-arg=--dburi=...")
    p.add_argument("targets", nargs="*")
    args = p.parse_args()
    args.sdist = str(Path(args.sdist).resolve())
    targets = targets_of(Path(args.sdist), args.targets)
    if not args.report_only:
        for t in targets:
            for mode in args.modes.split(","):
                rc, dt = run_one(args, t, mode)
                print(f"[{mode:5}] {t}: rc={rc} {dt:.0f}s", flush=True)
    return report(args, targets)


if __name__ == "__main__":
    sys.exit(main())
