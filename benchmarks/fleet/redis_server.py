"""A private redis-server for a benchmark run (free port, no persistence), never 6379.

The tests' own launcher (``tests/fleet_support.py``) starts it: one way to start, wait for
and stop a private server, with what only a benchmark asks for on top.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from fleet_support import RedisServer


class PrivateRedis(RedisServer):
    def evalsha_calls(self) -> int:
        """How many scripts Redis ran so far: the fleet's round trips."""
        c = self.client()
        try:
            stats = c.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if "evalsha" in k)
        finally:
            c.close()
