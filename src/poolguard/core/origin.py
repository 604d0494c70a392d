"""Where a checkout began: the first frame of the application, for leak reports.

Found by walking the stack from the pool's ``connect`` outwards, past SQLAlchemy, poolguard
and the framework layers in between; the result is kept as a code object and a line (no
frame, so no locals stay alive) and formatted only when a report needs it.
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType

__all__ = ["checkout_origin"]

_SKIP_MODULES = (
    "sqlalchemy",
    "poolguard",
    "contextlib",
    "asyncio",
    "greenlet",
    "anyio",
    "starlette",
    "fastapi",
    "concurrent",
    "threading",
)


#: Per code object, whether it belongs to the layers ``checkout_origin`` skips: a web request's
#: checkout sits under tens of framework frames, and a dict lookup per frame is cheaper than
#: reading the module name and matching prefixes. Keyed by id (hashing a code object hashes
#: its bytecode); the entry keeps its code object alive, so the id cannot be reused while it
#: is cached. Cleared when full (code made at run time could otherwise grow it).
_skip_cache: dict[int, tuple[CodeType, bool]] = {}
_SKIP_CACHE_MAX = 4096


def checkout_origin() -> tuple[CodeType, int] | None:
    """The first frame outside the database and framework layers: where a checkout began.
    Kept as code object and line (no locals, unlike a frame); formatted on demand."""
    f: FrameType | None = sys._getframe(2)
    cache = _skip_cache
    while f is not None:
        code = f.f_code
        entry = cache.get(id(code))
        if entry is not None and entry[0] is code:
            skip = entry[1]
        else:
            if len(cache) >= _SKIP_CACHE_MAX:
                cache.clear()
            skip = f.f_globals.get("__name__", "").startswith(_SKIP_MODULES)
            cache[id(code)] = (code, skip)
        if not skip:
            return code, f.f_lineno
        f = f.f_back
    return None
