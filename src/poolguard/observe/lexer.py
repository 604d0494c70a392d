"""SQL lexers, one per dialect family: where a string, a comment or an identifier ends.

A fingerprint must never carry a value, and only the dialect knows what a value looks like:
``"x"`` is a string in MySQL and MariaDB (``ANSI_QUOTES`` is off by default) and an identifier
everywhere else; ``'it\\'s'`` is one string in MySQL (backslash escapes are on by default) and
a string followed by SQL in PostgreSQL (``standard_conforming_strings`` is on since 9.1), where
only ``E'...'`` takes backslash escapes; PostgreSQL's block comments nest
(``/* a /* b */ secret */`` is one comment) and MySQL's and SQLite's do not; ``$tag$...$tag$``
quotes a string in PostgreSQL and ``$name`` is a parameter in SQLite; ``#`` starts a comment in
MySQL and is the XOR operator in PostgreSQL; ``[x]`` is an identifier in SQLite. Reading a
statement by the wrong rules either leaks a value into the normal form (and from there into
spans, ``stats()``, reports and failure messages) or swallows structure.

Why hand-written regular expressions and not a parser library: the core depends only on
SQLAlchemy, Starlette and the OpenTelemetry API, and SQLAlchemy has no lexer for SQL it did
not compile. The lexing that matters for literals is small (strings, quoted identifiers,
comments, numbers, parameters), so each dialect gets one compiled alternation matched at each
position. Every alternative is linear (unrolled loops, no nested ambiguous quantifiers), so
a 1 MiB statement costs time proportional to its length; unterminated strings, comments and
identifiers run to the end of the statement. Nested comments are the one thing a regular
expression cannot match: the tokenizer skips them with :func:`nested_comment_end`.

The generic lexer (any other dialect, and :func:`poolguard.observe.fingerprint.fingerprint`)
is conservative where dialects disagree, so that no reading of the statement leaks: block
comments nest (a non-nesting server would only see more SQL redacted than needed), ``E''`` and
dollar quotes are strings, and a ``'...'`` string whose end depends on whether backslashes
escape (an odd run of backslashes before a quote) redacts the rest of the statement. ``"..."``
stays an identifier there, as the SQL standard says: use the MySQL lexer for MySQL.

Known limits, all on the side of redacting too much: MySQL's ``NO_BACKSLASH_ESCAPES`` and
``ANSI_QUOTES`` modes are not followed (the default rules are), and SQLite's acceptance of a
``"string"`` where no such column exists is not (it is an identifier, as SQLAlchemy renders
one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DIALECTS", "Lexer", "lexer_for", "nested_comment_end"]

# --------------------------------------------------------------------------- pieces

_WS = r"\s"
_DASH_COMMENT = r"--[^\n]*"
# MySQL: "--" starts a comment only when a space or a control character follows it.
_MYSQL_DASH_COMMENT = r"--(?:[\s\x00-\x1f][^\n]*|\Z)"
_FLAT_BLOCK_COMMENT = r"/\*.*?(?:\*/|\Z)"
# Generic: MySQL comments, except PostgreSQL's #>, #>>, #- and ## operators.
_HASH_COMMENT_SAFE = r"\#(?![>#-])[^\n]*"
_HASH_COMMENT = r"\#[^\n]*"

_STD_STRING = r"'[^']*(?:''[^']*)*'?"
_BACKSLASH_STRING = r"'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'?"
_BACKSLASH_DQ_STRING = r'"[^"\\]*(?:(?:\\.|"")[^"\\]*)*"?'
# A standard string whose end every reading agrees on: no quote preceded by an odd run of
# backslashes (runs are consumed in pairs; a lone backslash may not precede a quote).
_AGREED_STRING = r"'[^'\\]*(?:(?:\\\\|\\(?![\\'])|'')[^'\\]*)*'"
_TO_THE_END = r"'.*"

_DQ_IDENT = r'"[^"]*(?:""[^"]*)*"?'
_BQ_IDENT = r"`[^`]*(?:``[^`]*)*`?"
_BRACKET_IDENT = r"\[[^\]]*\]?"
_U_IDENT = r'[uU]&"[^"]*(?:""[^"]*)*"?'

_DOLLAR = r"\$\$.*?(?:\$\$|\Z)|\$(?P<tag>[^\W\d]\w*)\$.*?(?:\$(?P=tag)\$|\Z)"

_PARAMS = r"%\([^)\n]*\)s|%s|\?\d*|:(?:[^\W\d]\w*|\d+)"
_PG_PARAMS = _PARAMS + r"|\$\d+"
_SQLITE_PARAMS = _PARAMS + r"|[$@][^\W\d][\w$]*"

_OPS = r"::|:=|->>|->|<>|!=|<=|>=|\|\||"
_PG_OPS = r"::|:=|->>|->|\#>>|\#>|\#-|\#\#|<>|!=|<=|>=|\|\||"


def nested_comment_end(statement: str, pos: int) -> int:
    """The index just past the nested block comment whose ``/*`` ends at ``pos``.

    Linear: each marker position is searched for once (a cached ``find`` per kind), so
    ``"/*" * 50000 + "*/" * 50000`` costs one pass, not 50,000.
    """
    depth = 1
    n = len(statement)
    next_open = statement.find("/*", pos)
    next_close = statement.find("*/", pos)
    while True:
        if next_close < 0:
            return n
        if 0 <= next_open < next_close:
            depth += 1
            pos = next_open + 2
            next_open = statement.find("/*", pos)
            continue
        depth -= 1
        pos = next_close + 2
        if depth == 0:
            return pos
        next_close = statement.find("*/", pos)
        if 0 <= next_open < pos:
            next_open = statement.find("/*", pos)


@dataclass(frozen=True)
class Lexer:
    """One dialect's compiled token pattern and the indices of its alternatives.

    ``match(statement, pos)`` always succeeds (``op`` takes any character, ``end`` the end);
    ``lastindex`` is the alternative that matched.
    """

    name: str
    pattern: re.Pattern[str]
    word: int
    op: int
    qident: int
    num: int
    hex: int
    digitword: int
    percent: int
    end: int
    comment: int  # a nested block comment's opening; -1 when comments do not nest


def _build(
    name: str,
    *,
    skip: list[str],
    prefixes: str,
    strings: list[str],
    qidents: list[str],
    params: str,
    ops: str,
    nested: bool,
    dollar: bool,
) -> Lexer:
    # Order matters: WORD refuses the prefixes of prefixed strings and of SQLAlchemy's
    # post-compile marker; NUM refuses to be followed by a word character, so that
    # DIGITWORD keeps MySQL identifiers such as ``2fa_codes`` whole. A dotted name
    # (``t1.col``) is one WORD: fewer matches, and the regex engine is where a miss spends
    # its time.
    alts = [
        rf"(?P<word>(?!{prefixes}|__\[POSTCOMPILE_)[^\W\d][\w$]*(?:\.[^\W\d][\w$]*)*)",
        rf"(?P<param>{params})",
        "(?P<qident>" + "|".join(qidents) + ")",
        "(?P<str>" + "|".join(strings) + ")",
        r"(?P<num>(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?(?![\w$]))",
        r"(?P<hex>(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+)(?![\w$]))",
    ]
    if dollar:
        alts.append(f"(?P<dollar>{_DOLLAR})")
    if nested:
        alts.append(r"(?P<comment>/\*)")
    alts += [
        r"(?P<postcompile>__\[POSTCOMPILE_[^\]~\s]+(?:~~.*?~~)?\])",
        r"(?P<percent>%%)",
        r"(?P<digitword>\d[\w$]*)",
        rf"(?P<op>{ops}.)",
        r"(?P<end>\Z)",
    ]
    if not nested:
        skip = [*skip, _FLAT_BLOCK_COMMENT]
    pattern = re.compile("(?:" + "|".join(skip) + ")*(?:" + "|".join(alts) + ")", re.DOTALL)
    idx = pattern.groupindex
    return Lexer(
        name,
        pattern,
        word=idx["word"],
        op=idx["op"],
        qident=idx["qident"],
        num=idx["num"],
        hex=idx["hex"],
        digitword=idx["digitword"],
        percent=idx["percent"],
        end=idx["end"],
        comment=idx.get("comment", -1),
    )


GENERIC = _build(
    "generic",
    skip=[_WS, _DASH_COMMENT, _HASH_COMMENT_SAFE],
    prefixes=r"[eEnNxXbB]'|[uU]&['\"]",
    strings=[
        r"[eE]" + _BACKSLASH_STRING,
        r"(?:[nNxXbB]|[uU]&)?" + _AGREED_STRING,
        r"(?:[nNxXbB]|[uU]&)?" + _TO_THE_END,
    ],
    qidents=[_U_IDENT, _DQ_IDENT, _BQ_IDENT],
    params=_PG_PARAMS,
    ops=_PG_OPS,
    nested=True,
    dollar=True,
)
POSTGRESQL = _build(
    "postgresql",
    skip=[_WS, _DASH_COMMENT],
    prefixes=r"[eEnNxXbB]'|[uU]&['\"]",
    strings=[r"[eE]" + _BACKSLASH_STRING, r"(?:[nNxXbB]|[uU]&)?" + _STD_STRING],
    qidents=[_U_IDENT, _DQ_IDENT],
    params=_PG_PARAMS,
    ops=_PG_OPS,
    nested=True,
    dollar=True,
)
MYSQL = _build(
    "mysql",
    skip=[_WS, _MYSQL_DASH_COMMENT, _HASH_COMMENT],
    prefixes=r"[nNxXbB]'",
    strings=[r"[nNxXbB]?" + _BACKSLASH_STRING, _BACKSLASH_DQ_STRING],
    qidents=[_BQ_IDENT],
    params=_PARAMS,
    ops=_OPS,
    nested=False,
    dollar=False,
)
SQLITE = _build(
    "sqlite",
    skip=[_WS, _DASH_COMMENT],
    prefixes=r"[xX]'",
    strings=[r"[xX]?" + _STD_STRING],
    qidents=[_DQ_IDENT, _BQ_IDENT, _BRACKET_IDENT],
    params=_SQLITE_PARAMS,
    ops=_OPS,
    nested=False,
    dollar=False,
)

#: SQLAlchemy dialect name -> lexer; any other name gets :data:`GENERIC`.
DIALECTS: dict[str, Lexer] = {
    "postgresql": POSTGRESQL,
    "mysql": MYSQL,
    "mariadb": MYSQL,
    "sqlite": SQLITE,
}


def lexer_for(dialect_name: str) -> Lexer:
    """The lexer for a SQLAlchemy dialect name (``engine.dialect.name``)."""
    return DIALECTS.get(dialect_name, GENERIC)
