"""Where a checkout began: the first frame of the application, for leak reports.

Found by walking the stack from the pool's ``connect`` outwards and deciding, frame by frame,
whether its code is the application's or a library's **by where its file lives**, not by the
module's name: a list of framework names always misses the next one (SQLModel,
Flask-SQLAlchemy, Litestar, a company's own data layer...), while every installed library
lives in the same few places. Library code is code from:

- ``site-packages`` / ``dist-packages`` (anything pip, uv or the OS installed);
- the standard library (``sysconfig``'s ``stdlib`` and ``platstdlib``);
- poolguard's own package directory (which an editable install puts outside site-packages);
- pseudo files: ``<frozen ...>``, ``<string>`` (code made by ``exec``: dataclasses,
  SQLAlchemy's generated functions), ``<stdin>``.

Everything else is the application: the first such frame is the checkout site. When there is
none (an application installed into site-packages, say), the site is the nearest frame of a
library other than SQLAlchemy and poolguard: the layer that asked for the connection. The
decision is cached per file, so after warm-up a frame costs one set lookup; the result is
kept as a code object and an instruction offset (no frame, so no locals stay alive), and its
line is looked up only when a report needs it.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import CodeType, FrameType

import sqlalchemy

__all__ = ["Origin", "checkout_origin", "describe", "is_application_file"]

#: Tiers of a code object's file: application code ends the walk; a third-party library's
#: is remembered as the fallback; the database and interpreter layers are skipped.
_APPLICATION = 0
_LIBRARY = 1
_INFRASTRUCTURE = 2

_LIBRARY_DIRS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _dir_prefixes(*dirs: str | None) -> tuple[str, ...]:
    """Each directory as a normalised prefix ending in a separator, as given and resolved."""
    out: list[str] = []
    for d in dirs:
        if not d:
            continue
        for p in (os.path.abspath(d), os.path.realpath(d)):
            prefix = os.path.normcase(os.path.join(p, ""))
            if prefix not in out:
                out.append(prefix)
    return tuple(out)


def _package_dir(module_file: str | None) -> str | None:
    return os.path.dirname(os.path.abspath(module_file)) if module_file else None


_paths = sysconfig.get_paths()
#: The standard library: sysconfig's view, and where ``os`` itself was loaded from (the two
#: differ on some distributions' layouts).
_STDLIB = _dir_prefixes(_paths.get("stdlib"), _paths.get("platstdlib"), _package_dir(os.__file__))
#: poolguard's own package (src/poolguard in an editable install) and SQLAlchemy's: the
#: layers between the application and the pool, never a checkout site, not even a fallback.
_INFRASTRUCTURE_DIRS = _dir_prefixes(
    os.path.dirname(_package_dir(__file__) or ""),  # core/ -> poolguard/
    _package_dir(sqlalchemy.__file__),
)
del _paths


def _tier(filename: str) -> int:
    if not filename or filename[0] == "<":  # <frozen ...>, <string>, <stdin>
        return _INFRASTRUCTURE
    path = os.path.normcase(os.path.abspath(filename))  # a relative one: from the cwd
    if path.startswith(_INFRASTRUCTURE_DIRS):
        return _INFRASTRUCTURE
    if any(d in path for d in _LIBRARY_DIRS):
        return _LIBRARY
    if path.startswith(_STDLIB):
        return _INFRASTRUCTURE
    return _APPLICATION


def is_application_file(filename: str) -> bool:
    """True when code from ``filename`` counts as the application's (see the module's doc)."""
    return _tier(filename) == _APPLICATION


#: Files known to be SQLAlchemy's, poolguard's or the interpreter's: the frames a walk skips,
#: and most of the frames it sees (a web request's checkout sits under tens of them). A set of
#: ``co_filename`` strings, which cache their own hash, so skipping a frame is one membership
#: test; every other file's tier is in ``_tier_cache``. Both are cleared when full (files
#: made at run time could otherwise grow them).
_skip_files: set[str] = set()
_tier_cache: dict[str, int] = {}
_TIER_CACHE_MAX = 4096

#: An origin: the code object and the offset of its last instruction (``f_lasti``). The line
#: is looked up only when a report needs it: ``f_lineno`` scans the line table at every read.
Origin = tuple[CodeType, int]


def checkout_origin() -> Origin | None:
    """The first application frame on the stack: where a checkout began.

    Called by the checkout that the pool's patched ``connect`` calls: ``sys._getframe(3)``
    starts the walk at the caller of that ``connect``, skipping this function, the checkout
    and ``connect`` itself (poolguard's own frames; each frame the walk visits costs a frame
    object, the walk's main cost). Kept as code object and instruction offset (no locals,
    unlike a frame); formatted by :func:`describe`. None when the stack holds neither
    application nor library code (nothing but SQLAlchemy and the interpreter).
    """
    f: FrameType | None = sys._getframe(3)
    skip = _skip_files
    fallback: Origin | None = None
    glet: object = None
    hops = 0
    while True:
        while f is not None:
            code = f.f_code
            if code.co_filename in skip:
                f = f.f_back
                continue
            tier = _tier_cache.get(code.co_filename)
            if tier is None:
                tier = _classify(code.co_filename)
            if tier == _APPLICATION:
                return code, f.f_lasti
            if tier == _LIBRARY and fallback is None:
                fallback = (code, f.f_lasti)
            f = f.f_back
        if hops == _MAX_GREENLET_HOPS:
            return fallback
        f, glet = _parent_greenlet_frame(glet)
        if f is None:
            return fallback
        hops += 1


def _classify(filename: str) -> int:
    """The tier of ``filename``, remembered."""
    if len(_tier_cache) >= _TIER_CACHE_MAX or len(_skip_files) >= _TIER_CACHE_MAX:
        _tier_cache.clear()
        _skip_files.clear()
    tier = _tier(filename)
    if tier == _INFRASTRUCTURE:
        _skip_files.add(filename)
    else:
        _tier_cache[filename] = tier
    return tier


def describe(origin: Origin | None) -> str:
    """``file:line in function`` for an origin, ``<unknown>`` for none."""
    if origin is None:
        return "<unknown>"
    code, lasti = origin
    line = next((n for start, end, n in code.co_lines() if start <= lasti < end), None)
    if line is None:
        line = code.co_firstlineno
    return f"{code.co_filename}:{line} in {code.co_name}"


#: Greenlets to climb from the one the checkout runs in (SQLAlchemy's asyncio layer runs one
#: greenlet per awaited call; nested ``run_sync`` adds one more each).
_MAX_GREENLET_HOPS = 4


def _parent_greenlet_frame(glet: object) -> tuple[FrameType | None, object]:
    """Where the parent of the current (or given) greenlet is suspended, if any.

    SQLAlchemy's asyncio extension runs the sync engine inside a greenlet whose stack starts
    in ``greenlet_spawn``: the coroutine that awaited it (the application's) is on the parent
    greenlet's stack, not behind the child's last frame.
    """
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None, None
    current = glet if glet is not None else greenlet.getcurrent()
    parent = getattr(current, "parent", None)
    if parent is None:
        return None, None
    frame: FrameType | None = getattr(parent, "gr_frame", None)
    return frame, parent
