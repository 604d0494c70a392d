"""SQL fingerprints: one stable, literal-free identity per statement shape.

Quarantine, statistics and telemetry all key on "the same query", so two executions that
differ only in their values (literals, bound parameters, the length of an ``IN`` list, the
number of rows in a ``VALUES`` list, the driver's paramstyle) must get the same identity,
and nothing derived from it may ever carry a value: values are personal data, and a
per-value key would make every bounded table in poolguard overflow.

The work is cut in three: :mod:`poolguard.observe.lexer` knows each dialect's lexical rules
(where strings, identifiers and comments end), :mod:`poolguard.observe.normalize` turns the
tokens into the normal form and the summary, and this module caches the result per
statement string and per dialect. Use :func:`fingerprinter_for` with the engine's
``dialect.name``; :func:`fingerprint` is the conservative generic reading, for statements
whose dialect is unknown.

Why a cache keyed by the statement string: SQLAlchemy hands the same compiled ``str``
objects to the cursor again and again, so the hot path is one ``dict.get`` (no lock; a
plain dict read is atomic under the GIL and per-object locked on free-threaded builds).
Misses take a lock, so eviction (drop the oldest half once the entry or character budget is
reached) never races with another insertion. One cache per lexer, because the same string
can mean different things to two dialects (``"x"`` is a string in MySQL).

The id is ``blake2b(normalized, digest_size=8)`` in hex: unlike ``hash()`` it is the same in
every process, on every machine and in every Python version, so it can be written to logs,
alerts and configuration (``quarantine allow``-lists) and still mean the same statement
tomorrow. Statements that every dialect reads alike get the same id from every fingerprinter.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from poolguard.observe.lexer import GENERIC, Lexer, lexer_for
from poolguard.observe.normalize import analyze

__all__ = [
    "Fingerprint",
    "cache_clear",
    "cache_info",
    "fingerprint",
    "fingerprinter_for",
    "normalize",
]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The identity of one statement shape.

    Frozen and slotted because one instance is shared by every execution of the statement
    (it lives in the cache) and is read on the hot path by the quarantine, the statistics
    and the telemetry.
    """

    #: 16 lowercase hex digits: ``blake2b(normalized.encode(), digest_size=8)``.
    id: str
    #: The statement with every literal and parameter replaced by ``?``, comments removed,
    #: whitespace folded and everything outside quoted identifiers lower-cased.
    normalized: str
    #: Low-cardinality ``db.query.summary``: ``"SELECT users"``, ``"INSERT orders"``,
    #: ``"CALL fn"``, ``"BEGIN"``; empty for an empty statement. Never contains a literal.
    summary: str
    #: Upper-case operation: the first keyword, or the main statement's under ``WITH``.
    operation: str


def normalize(statement: str, dialect_name: str = "") -> str:
    """The literal-free normal form of ``statement`` (not cached; see :func:`fingerprint`).

    >>> normalize("SELECT * FROM t1 WHERE id IN (1, 2, 3) AND name = 'x' -- hi")
    'select * from t1 where id in (...) and name = ?'
    """
    return analyze(statement, lexer_for(dialect_name))[0]


def _make(statement: str, lex: Lexer = GENERIC) -> Fingerprint:
    normalized, op, summary = analyze(statement, lex)
    digest = hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8)
    return Fingerprint(digest.hexdigest(), normalized, summary, op)


# ---------------------------------------------------------------------------------------
# Cache

_MAX_ENTRIES = 4096
#: Budget for the characters held by one cache (statements plus normal forms), so a few
#: huge statements (bulk inserts with inline values) cannot pin hundreds of megabytes.
_MAX_CHARS = 8 * 1024 * 1024


class _Cache:
    """One lexer's statement -> Fingerprint cache, bounded in entries and characters."""

    def __init__(self, lex: Lexer) -> None:
        self.lex = lex
        self.entries: dict[str, Fingerprint] = {}
        self.lock = threading.Lock()
        self.chars = 0
        self.misses = 0
        self.calls = [0]  # lookups; a lost increment under a race is harmless (statistics)

    def miss(self, statement: str) -> Fingerprint:
        fp = _make(statement, self.lex)  # outside the lock: pure, and the slow part
        size = len(statement) + len(fp.normalized)
        entries = self.entries
        with self.lock:
            self.misses += 1
            cached = entries.get(statement)
            if cached is not None:  # another thread got there first: keep one instance
                return cached
            if size > _MAX_CHARS // 8:
                return fp  # too big to be worth pinning
            while entries and (len(entries) >= _MAX_ENTRIES or self.chars + size > _MAX_CHARS):
                self._evict_oldest_half()
            entries[statement] = fp
            self.chars += size
        return fp

    def _evict_oldest_half(self) -> None:
        # Caller holds the lock. Dicts keep insertion order, so the first keys are the
        # oldest; halving (rather than evicting one entry per miss) keeps a miss O(1)
        # amortized.
        entries = self.entries
        for key in list(entries)[: max(1, len(entries) // 2)]:
            fp = entries.pop(key)
            self.chars -= len(key) + len(fp.normalized)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.chars = 0
            self.misses = 0
            self.calls[0] = 0


def _fingerprinter(cache: _Cache) -> Callable[[str], Fingerprint]:
    # Closure cells rather than attribute lookups: the hit path is one increment and one
    # dict.get, as in the generic function below.
    calls = cache.calls
    get = cache.entries.get
    miss = cache.miss

    def fingerprint_statement(statement: str) -> Fingerprint:
        calls[0] += 1
        fp = get(statement)
        if fp is not None:
            return fp
        return miss(statement)

    fingerprint_statement.__doc__ = (
        f"The cached {cache.lex.name} :class:`Fingerprint` of a statement."
    )
    return fingerprint_statement


_GENERIC = _Cache(GENERIC)
_cache = _GENERIC.entries  # the generic cache's entries (tests and debugging read it)
_cache_get = _cache.get
_calls = _GENERIC.calls
_miss = _GENERIC.miss
_caches: dict[str, _Cache] = {GENERIC.name: _GENERIC}
_fingerprinters: dict[str, Callable[[str], Fingerprint]] = {}
_registry_lock = threading.Lock()


def fingerprint(statement: str) -> Fingerprint:
    """The cached :class:`Fingerprint` of ``statement``, read by the generic lexer.

    A hit is one dict lookup (well under a microsecond); a miss tokenizes the statement once
    (tens of microseconds for a few hundred characters) and is then cached.
    """
    _calls[0] += 1
    fp = _cache_get(statement)
    if fp is not None:
        return fp
    return _miss(statement)


def fingerprinter_for(dialect_name: str) -> Callable[[str], Fingerprint]:
    """The cached fingerprint function for a SQLAlchemy dialect name (``engine.dialect.name``):
    ``"postgresql"``, ``"mysql"``, ``"mariadb"`` and ``"sqlite"`` get their own lexical rules,
    anything else the conservative generic ones (:func:`fingerprint` itself).

    Call it once per engine and keep the function: it is the statement hot path.
    """
    lex = lexer_for(dialect_name)
    if lex is GENERIC:
        return fingerprint
    found = _fingerprinters.get(lex.name)
    if found is None:
        with _registry_lock:
            found = _fingerprinters.get(lex.name)
            if found is None:
                cache = _caches[lex.name] = _Cache(lex)
                found = _fingerprinters[lex.name] = _fingerprinter(cache)
    return found


def cache_info() -> tuple[int, int]:
    """``(hits, misses)`` over every dialect's cache since start or :func:`cache_clear`
    (approximate under threads)."""
    caches = list(_caches.values())
    calls = sum(c.calls[0] for c in caches)
    misses = sum(c.misses for c in caches)
    return max(0, calls - misses), misses


def cache_clear() -> None:
    """Empty every cache and zero the counters (tests, or after a schema change)."""
    for c in list(_caches.values()):
        c.clear()
