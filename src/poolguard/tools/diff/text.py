"""Making report text safe for a terminal and a CI log.

A report is an artifact anybody's branch can produce, and its strings (test ids,
summaries, normal forms, even file names on the command line) end up on the terminal of
whoever reads the gate's output. An ANSI escape there can recolour or erase lines, a
newline can forge a ``result: no regression`` line in the CI log, and a bidirectional
override can make text read differently from what it is. So every such string passes
through :func:`safe` before it is printed: control and format characters (Unicode
categories Cc and Cf, which include ESC, CR, LF, DEL, the C1 controls and the bidi
overrides) and the line and paragraph separators become visible escapes such as ``\\x1b``
or ``\\u202e``. JSON output needs none of this: ``json.dumps`` escapes them itself.
"""

from __future__ import annotations

import unicodedata

__all__ = ["safe"]

_UNSAFE_CATEGORIES = frozenset(["Cc", "Cf", "Zl", "Zp"])


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with every character that could move the cursor, end the line or reorder
    what is shown replaced by a visible escape; other text (accents, CJK) is kept."""
    if text.isprintable():  # the common case, in C: printable implies nothing to escape
        return text
    return "".join(
        _escape(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text
    )
