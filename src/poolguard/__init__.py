"""poolguard: keeps one rogue query from taking down a web stack.

Public names only; see docs/ for the concepts and the configuration reference.
"""

from typing import TYPE_CHECKING

from poolguard.core.budget import Budget
from poolguard.errors import (
    BudgetExceeded,
    PoolGuardError,
    PoolSaturated,
    QueryQuarantined,
    QueryTimeout,
)

__all__ = [
    "Budget",
    "BudgetExceeded",
    "PoolGuard",
    "PoolGuardError",
    "PoolGuardMiddleware",
    "PoolSaturated",
    "QueryQuarantined",
    "QueryTimeout",
    "RouteRule",
]

__version__ = "0.1.0"

if TYPE_CHECKING:  # type checkers see the real classes; at run time they load on first use
    from poolguard.guard import PoolGuard
    from poolguard.integrations.asgi.middleware import PoolGuardMiddleware, RouteRule


def __getattr__(name: str) -> object:
    # PoolGuard and the middleware import SQLAlchemy's engine and Starlette; load them on
    # first use so that `import poolguard.observe.fingerprint` (the pytest plugin, the CLI)
    # stays light.
    if name == "PoolGuard":
        from poolguard.guard import PoolGuard

        return PoolGuard
    if name in ("PoolGuardMiddleware", "RouteRule"):
        from poolguard.integrations.asgi import middleware

        return getattr(middleware, name)
    raise AttributeError(f"module 'poolguard' has no attribute {name!r}")
