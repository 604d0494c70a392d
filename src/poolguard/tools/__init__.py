"""The command line: ``poolguard check``, ``poolguard diff`` and ``poolguard demo``."""
