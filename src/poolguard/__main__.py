"""``python -m poolguard``: the same as the ``poolguard`` command."""

from poolguard.tools.cli import main

raise SystemExit(main())
