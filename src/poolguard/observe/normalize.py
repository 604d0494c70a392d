"""From a lexer's tokens to a literal-free normal form and a low-cardinality summary.

What counts as a value, beyond the obvious (strings of every prefix and quoting, dollar
quotes, numbers, TRUE/FALSE and every DBAPI paramstyle's markers, all become ``?``): the
sign of a number (``x = -5`` is ``x = ?``), a ``::type`` cast on a placeholder (SQLAlchemy
adds them for psycopg 3, asyncpg and pg8000 but not for psycopg2, and a driver migration
must not change ids), the length of ``IN``, ``ARRAY[...]`` and ``VALUES`` lists (all become
``(...)``; identical ``VALUES`` rows that are not plain lists are kept once), and the
generated name in ``SAVEPOINT sa_savepoint_7``. ``NULL`` and typed-literal keywords
(``DATE ?``) stay: they are structure.

Why a single pass over tokens rather than a chain of ``re.sub`` calls: only a tokenizer knows
whether a ``--``, a ``'`` or a digit is inside a string, a quoted identifier, a comment or
the SQL itself (:mod:`poolguard.observe.lexer` says so per dialect), and each extra pattern
would be another chance of catastrophic backtracking.
"""

from __future__ import annotations

from poolguard.observe.lexer import Lexer, nested_comment_end

__all__ = ["analyze"]


# fmt: off
#: After one of these a ``-`` or ``+`` in front of a number is a sign, not an operator, so
#: ``x = -5`` and ``x = 5`` normalize alike. (After any operator or punctuation too.)
_SIGN_AFTER_KEYWORDS = frozenset([
    "select", "where", "and", "or", "not", "when", "then", "else", "return", "returning",
    "limit", "offset", "between", "having", "case", "distinct", "all", "like", "by",
    "interval", "do",
])
#: Tokens that end an operand: a sign after one of them is a binary operator.
_OPERAND_END = frozenset(")]?")
_SIGNS = frozenset("-+")
#: What a plain collapsible list may contain besides ``?``, and what no list item may.
_LIST_PUNCT = frozenset(",()[]")
_NOT_A_VALUE = frozenset(["select", "values", "with", "table", "from"])
#: States of dropping a ``::type`` cast after a placeholder, and the words that continue a
#: type name (``timestamp without time zone``, ``double precision``, ``character varying``).
_NO_CAST, _CAST_TYPE, _CAST_MORE, _CAST_ARGS, _CAST_DIMS = 0, 1, 2, 3, 4
_TYPE_WORDS = frozenset(["with", "without", "time", "zone", "precision", "varying"])
_LIST, _VALUES, _ROW, _PLAIN = 0, 1, 2, 3
#: Modifiers between the operation keyword and its table, per operation.
_TABLE_SKIP = {
    "INSERT": frozenset([
        "or", "replace", "ignore", "abort", "fail", "rollback", "into", "low_priority",
        "delayed", "high_priority",
    ]),
    "REPLACE": frozenset(["into", "low_priority", "delayed"]),
    "UPDATE": frozenset([
        "only", "or", "replace", "ignore", "abort", "fail", "rollback", "low_priority",
    ]),
    "DELETE": frozenset(["from", "only", "low_priority", "quick", "ignore"]),
    "MERGE": frozenset(["into"]),
    "TRUNCATE": frozenset(["table", "only"]),
    "CALL": frozenset(),
}
_WITH_MAIN = frozenset(["select", "insert", "update", "delete", "merge", "values", "table"])
# fmt: on
_FROM_SKIP = frozenset(["only", "lateral"])
_MAX_NAME = 128


def _is_name(tok: str) -> bool:
    c = tok[0]
    return c == '"' or c == "`" or c == "[" or c == "_" or c.isalnum()


def _tokens(statement: str, lex: Lexer) -> list[str]:
    """Literal-free tokens; a token that followed whitespace or a comment starts with " "."""
    match = lex.pattern.match
    _WORD, _OP, _QIDENT, _NUM, _HEX = lex.word, lex.op, lex.qident, lex.num, lex.hex
    _DIGITWORD, _PERCENT, _END, _COMMENT = lex.digitword, lex.percent, lex.end, lex.comment
    pos = 0
    after_comment = False
    out: list[str] = []
    # Open brackets: (index of the bracket in out, kind, index of the comma before a row).
    stack: list[tuple[int, int, int]] = []
    values_row: list[str] | None = None  # the first row of the current VALUES list
    values_end = -1  # len(out) right after the last row of that list
    cast = _NO_CAST
    while True:
        m = match(statement, pos)
        assert m is not None  # every position matches: OP takes any character, END the end
        g = m.lastindex or _END  # never None: every alternative is a group
        pos = m.end()
        spaced = after_comment or m.start(g) != m.start()
        after_comment = False
        if g == _COMMENT:
            pos = nested_comment_end(statement, pos)
            after_comment = True
            continue
        if cast:
            # Drop ``::type`` after a placeholder: psycopg 3, asyncpg and pg8000 get
            # ``%(x)s::VARCHAR`` from SQLAlchemy where psycopg2 gets ``%(x)s``.
            tok = m.group(g)
            if cast == _CAST_TYPE and g in (_WORD, _QIDENT):
                cast = _CAST_MORE
                continue
            if cast == _CAST_MORE:
                if g == _WORD and tok.lower() in _TYPE_WORDS:
                    continue
                if tok == "(" or tok == "[":
                    cast = _CAST_ARGS if tok == "(" else _CAST_DIMS
                    continue
            elif cast in (_CAST_ARGS, _CAST_DIMS):
                if tok == (")" if cast == _CAST_ARGS else "]"):
                    cast = _CAST_MORE
                continue
            cast = _NO_CAST
        if g == _WORD:
            tok = m.group(g).lower()
            if tok == "true" or tok == "false":
                tok = "?"
        elif g == _OP:
            tok = m.group(g)
            if tok == "::" and out and out[-1][-1] == "?":
                cast = _CAST_TYPE
                continue
            if tok == "(" or tok == "[":
                prev = out[-1].lstrip() if out else ""
                kind = _PLAIN
                comma = -1
                if tok == "(":
                    if prev == "in":
                        kind = _LIST
                    elif prev == "values":
                        kind = _VALUES
                    elif prev == "," and len(out) - 1 == values_end:
                        kind = _ROW
                        comma = values_end
                elif prev == "array":
                    kind = _LIST
                stack.append((len(out), kind, comma))
            elif (tok == ")" or tok == "]") and stack:
                start, kind, comma = stack[-1]
                if out[start][-1] == ("(" if tok == ")" else "["):
                    stack.pop()
                    if kind != _PLAIN and _is_value_list(out, start + 1):
                        del out[start + 1 :]
                        out.append("...")
                        out.append(tok)
                    else:
                        out.append(" " + tok if spaced else tok)
                    if kind == _VALUES:
                        values_row = [t.lstrip() for t in out[start:]]
                        values_end = len(out)
                    elif kind == _ROW:
                        if values_row == [t.lstrip() for t in out[start:]]:
                            del out[comma:]
                        values_end = len(out)
                    continue
        elif g == _QIDENT:
            tok = m.group(g)
        elif g in (_NUM, _HEX):
            tok = "?"
            if out and out[-1].lstrip() in _SIGNS:
                before = out[-2].lstrip() if len(out) > 1 else "("
                if before in _SIGN_AFTER_KEYWORDS or not (
                    _is_name(before) or before in _OPERAND_END
                ):
                    out[-1] = " ?" if out[-1][0] == " " else "?"
                    continue
        elif g == _DIGITWORD:
            tok = m.group(g).lower()
        elif g == _PERCENT:
            tok = "%"
        elif g == _END:
            break
        else:  # strings, dollar quotes, parameters, post-compile markers
            tok = "?"
        out.append(" " + tok if spaced and out else tok)
    return out


def _is_value_list(out: list[str], start: int) -> bool:
    """Whether out[start:] is a list of values: ``?, ?, ...``, a list of tuples of them, or
    identical items around placeholders (``lower(?), lower(?)``, from a bind expression)."""
    seen = False
    for i in range(start, len(out)):
        t = out[i].lstrip()
        if t == "?":
            seen = True
        elif t not in _LIST_PUNCT:
            break
    else:
        return seen
    items: list[list[str]] = [[]]
    depth = 0
    for i in range(start, len(out)):
        t = out[i].lstrip()
        if t in _NOT_A_VALUE:
            return False  # a subquery
        if t == "," and depth == 0:
            items.append([])
            continue
        if t == "(" or t == "[":
            depth += 1
        elif t == ")" or t == "]":
            depth -= 1
        items[-1].append(t)
    first = items[0]
    return "?" in first and all(item == first for item in items)


def _strip_savepoint_name(toks: list[str]) -> None:
    # SQLAlchemy names savepoints sa_savepoint_1, _2, ... per connection: a generated name
    # is a value in all but syntax, and would split one statement into many fingerprints.
    first = toks[0]
    if first == "savepoint":
        i = 1
    elif first == "release":
        i = 2 if len(toks) > 2 and toks[1].lstrip() == "savepoint" else 1
    elif first == "rollback":
        words = [t.lstrip() for t in toks]
        if "to" not in words:
            return
        i = words.index("to") + 1
        if i < len(toks) and words[i] == "savepoint":
            i += 1
    else:
        return
    if i == len(toks) - 1 and _is_name(toks[i].lstrip()):
        toks[i] = " ?" if toks[i][0] == " " else "?"


def _name_at(words: list[str], i: int) -> tuple[str, int] | None:
    """The possibly dotted name starting at words[i], and the index after it."""
    n = len(words)
    if i >= n or not _is_name(words[i]):
        return None
    parts = [_unquote(words[i])]
    i += 1
    while i + 1 < n and words[i] == "." and _is_name(words[i + 1]):
        parts.append(_unquote(words[i + 1]))
        i += 2
    return ".".join(parts)[:_MAX_NAME], i


def _unquote(tok: str) -> str:
    q = tok[0]
    if q == '"' or q == "`":
        body = tok[1:-1] if len(tok) > 1 and tok[-1] == q else tok[1:]
        return body.replace(q + q, q)
    if q == "[":
        return tok[1:-1] if tok[-1] == "]" else tok[1:]
    return tok


def _summarize(words: list[str]) -> tuple[str, str]:
    """(operation, summary) from the normalized tokens (spaces stripped)."""
    n = len(words)
    i = 0
    while i < n and words[i] == "(":
        i += 1
    if i == n or not _is_name(words[i]) or words[i][0] in '"`[':
        return "", ""
    op = words[i][:_MAX_NAME].upper()
    if op == "WITH":
        depth = 0
        for j in range(i + 1, n):
            w = words[j]
            if w == "(":
                depth += 1
            elif w == ")":
                depth -= 1
            elif depth <= 0 and w in _WITH_MAIN and words[j - 1] == ")":
                op, i = w.upper(), j
                break
        else:
            return "WITH", "WITH"
    if op == "SELECT":
        best: tuple[int, str] | None = None
        depth = 0
        for j in range(i + 1, n - 1):
            w = words[j]
            if w == "(":
                depth += 1
            elif w == ")":
                depth -= 1
            elif w == "from" and (best is None or depth < best[0]):
                k = j + 1
                while k < n and words[k] in _FROM_SKIP:
                    k += 1
                found = _name_at(words, k)
                if found is not None and (found[1] >= n or words[found[1]] != "("):
                    best = (depth, found[0])
        return op, f"SELECT {best[1]}" if best is not None else op
    skip = _TABLE_SKIP.get(op)
    if skip is None:
        return op, op
    k = i + 1
    while k < n and words[k] in skip:
        k += 1
    found = _name_at(words, k)
    return op, f"{op} {found[0]}" if found is not None else op


def analyze(statement: str, lex: Lexer) -> tuple[str, str, str]:
    """``(normalized, operation, summary)`` of ``statement`` read by ``lex``'s rules."""
    toks = _tokens(statement, lex)
    if toks:
        _strip_savepoint_name(toks)
    words = [t.lstrip() for t in toks]
    op, summary = _summarize(words)
    return "".join(toks), op, summary
