"""``python -m poolguard.tools.demo``: the same as ``poolguard demo``."""

import sys

from poolguard.tools.demo.command import main

raise SystemExit(main(sys.argv[1:]))
