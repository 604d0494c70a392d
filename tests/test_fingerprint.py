"""Fingerprints: literal-free, stable, and the same wherever the values differ."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql import asyncpg, pg8000, psycopg, psycopg2

from poolguard.observe import fingerprint as fpmod
from poolguard.observe.fingerprint import (
    Fingerprint,
    cache_clear,
    cache_info,
    fingerprint,
    normalize,
)


def fid(sql: str) -> str:
    return fingerprint(sql).id


# --------------------------------------------------------------------------- identity


def test_id_is_stable_across_releases() -> None:
    # A changed algorithm silently splits every stored id (allow-lists, dashboards, alerts):
    # if this fails on purpose, say so in the changelog.
    fp = fingerprint("SELECT * FROM users WHERE id = 42")
    assert fp.normalized == "select * from users where id = ?"
    assert fp.id == "ac4d26294fb379a3"
    assert fp.id == hashlib.blake2b(fp.normalized.encode(), digest_size=8).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{16}", fp.id)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT * FROM users WHERE id = 1", "SELECT * FROM users WHERE id = 987654"),
        ("SELECT * FROM users WHERE name = 'alice'", "SELECT * FROM users WHERE name = 'bob'"),
        ("SELECT * FROM users WHERE name = 'it''s'", "SELECT * FROM users WHERE name = ''"),
        ("SELECT * FROM t WHERE x = 1.5", "SELECT * FROM t WHERE x = -2.5e-10"),
        ("SELECT * FROM t WHERE x = 0xDEADBEEF", "SELECT * FROM t WHERE x = 7"),
        ("SELECT * FROM t WHERE x = -5", "SELECT * FROM t WHERE x = 5"),
        ("SELECT * FROM t WHERE x = - 5", "SELECT * FROM t WHERE x = 5"),
        ("SELECT * FROM t WHERE flag = TRUE", "SELECT * FROM t WHERE flag = false"),
        ("SELECT * FROM t LIMIT 10 OFFSET 20", "SELECT * FROM t LIMIT 1 OFFSET 0"),
        ("UPDATE t SET n = n + -1 WHERE id = 3", "UPDATE t SET n = n + 100 WHERE id = 4"),
        ("SELECT * FROM t WHERE d > DATE '2024-01-01'", "SELECT * FROM t WHERE d > DATE '1999'"),
        ("SELECT now() - INTERVAL '1 day'", "SELECT now() - INTERVAL '30 minutes'"),
        ("SELECT * FROM t WHERE x = N'ünï'", "SELECT * FROM t WHERE x = 'plain'"),
        ("SELECT * FROM t WHERE b = X'0A0B'", "SELECT * FROM t WHERE b = B'0101'"),
        ("SELECT * FROM t WHERE s = U&'d\\0061t'", "SELECT * FROM t WHERE s = 'x'"),
        ("SELECT * FROM t WHERE s = E'a\\'b'", "SELECT * FROM t WHERE s = 'c'"),
        ("SELECT * FROM t WHERE s = $$x$$", "SELECT * FROM t WHERE s = $q$y$q$"),
        ("SELECT 'a' || 'b'", "SELECT 'ccc' || 'dddd'"),
        ("SELECT * FROM t WHERE x = 1_000_000", "SELECT * FROM t WHERE x = 2"),
        ("SELECT CASE WHEN a > 0 THEN -1 ELSE 2 END", "SELECT CASE WHEN a > 9 THEN 8 ELSE -7 END"),
    ],
)
def test_literals_do_not_change_the_id(a: str, b: str) -> None:
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT * FROM users WHERE id = 1", "SELECT * FROM orders WHERE id = 1"),
        ("SELECT * FROM users WHERE id = 1", "SELECT * FROM users WHERE uid = 1"),
        ("SELECT * FROM users WHERE id = 1", "SELECT * FROM users WHERE id < 1"),
        ("SELECT * FROM users WHERE id IN (1)", "SELECT * FROM users WHERE id NOT IN (1)"),
        ("SELECT * FROM users", "SELECT * FROM users LIMIT 1"),
        ("SELECT id FROM users", "SELECT id, name FROM users"),
        ('SELECT * FROM "User"', 'SELECT * FROM "user"'),
        ("SELECT * FROM table1", "SELECT * FROM table2"),
        ("SELECT a - 5 FROM t", "SELECT a + 5 FROM t"),
        ("SELECT a - 5 FROM t", "SELECT a, 5 FROM t"),
        ("SELECT * FROM t WHERE x IS NULL", "SELECT * FROM t WHERE x = 1"),
        ("DELETE FROM sessions", "SELECT * FROM sessions"),
        ("SELECT * FROM t WHERE a = 1 AND b = 2", "SELECT * FROM t WHERE a = 1 OR b = 2"),
    ],
)
def test_structure_changes_the_id(a: str, b: str) -> None:
    assert fid(a) != fid(b)


def test_case_and_whitespace_are_folded() -> None:
    assert normalize("  SELECT  *\n\tFROM   Users\r\nWHERE Id=1  ;  ") == (
        "select * from users where id=? ;"
    )
    assert fid("select * from USERS") == fid("SELECT *\n  FROM users")


# --------------------------------------------------------------------------- lists


def _in_list(n: int, style: str) -> str:
    items = {
        "int": [str(i * 37) for i in range(n)],
        "str": [f"'v{i}'" for i in range(n)],
        "qmark": ["?"] * n,
        "pyformat": [f"%(id_1_{i})s" for i in range(n)],
        "psycopg3": [f"%(id_1_{i})s::INTEGER" for i in range(n)],
        "dollar": [f"${i + 1}::VARCHAR(30)" for i in range(n)],
        "named": [f":id_1_{i}" for i in range(n)],
        "negative": [str(-i - 1) for i in range(n)],
    }[style]
    return f"SELECT users.id FROM users WHERE users.id IN ({', '.join(items)}) AND x = 1"


@pytest.mark.parametrize(
    "style", ["int", "str", "qmark", "pyformat", "psycopg3", "dollar", "named", "negative"]
)
def test_in_lists_of_any_length_and_style_collapse(style: str) -> None:
    expected = "select users.id from users where users.id in (...) and x = ?"
    ids = {fid(_in_list(n, style)) for n in range(1, 51)}
    assert ids == {fid(expected)}
    assert normalize(_in_list(7, style)) == expected


def test_sqlalchemy_expanding_in_markers_collapse() -> None:
    base = "SELECT t.id FROM t WHERE t.id IN (?, ?, ?)"
    assert fid("SELECT t.id FROM t WHERE t.id IN (__[POSTCOMPILE_id_1])") == fid(base)
    wrapped = "SELECT t.id FROM t WHERE t.id IN (__[POSTCOMPILE_id_1~~lower(~~REPL~~)~~])"
    assert fid(wrapped) == fid(base)


def test_tuple_in_and_array_lists_collapse() -> None:
    assert normalize("SELECT 1 FROM t WHERE (a, b) IN ((1, 'x'), (2, 'y'), (3, 'z'))") == (
        "select ? from t where (a, b) in (...)"
    )
    assert fid("SELECT * FROM t WHERE x = ANY(ARRAY[1, 2, 3])") == fid(
        "SELECT * FROM t WHERE x = ANY(ARRAY[4])"
    )
    # SQLite renders a tuple IN as a VALUES list
    assert fid("SELECT * FROM t WHERE (a, b) IN (VALUES (?, ?), (?, ?))") == fid(
        "SELECT * FROM t WHERE (a, b) IN (VALUES (?, ?))"
    )


def test_in_lists_of_identical_expressions_collapse() -> None:
    # what a bind expression (a TypeDecorator's bind_expression) renders per element
    expected = "select x from t where x in (...)"
    for n in (1, 2, 9):
        assert normalize(f"SELECT x FROM t WHERE x IN ({', '.join(['lower(?)'] * n)})") == expected
        casts = ", ".join(["CAST(%s AS INTEGER)"] * n)
        assert normalize(f"SELECT x FROM t WHERE x IN ({casts})") == expected
    assert normalize("SELECT x FROM t WHERE x IN (lower(?), upper(?))") == (
        "select x from t where x in (lower(?), upper(?))"
    )
    assert normalize("SELECT x FROM t WHERE x IN (a, a)") == "select x from t where x in (a, a)"


def test_in_subquery_and_null_lists_are_structure() -> None:
    assert normalize("SELECT * FROM t WHERE a IN (SELECT b FROM u WHERE c = 3)") == (
        "select * from t where a in (select b from u where c = ?)"
    )
    assert normalize("SELECT * FROM t WHERE a IN (NULL) AND (1 != 1)") == (
        "select * from t where a in (null) and (? != ?)"
    )


@pytest.mark.parametrize("rows", [1, 2, 3, 10, 57])
def test_multi_row_values_collapse(rows: int) -> None:
    values = ", ".join(f"({i}, 'n{i}', %(x_{i})s::INTEGER)" for i in range(rows))
    sql = f"INSERT INTO items (a, b, c) VALUES {values} RETURNING items.id"
    assert normalize(sql) == "insert into items (a, b, c) values (...) returning items.id"


def test_identical_non_plain_rows_are_kept_once() -> None:
    many = "INSERT INTO t (a, b) VALUES (1, now()), (2, now()), (3, now())"
    assert normalize(many) == "insert into t (a, b) values (?, now())"
    assert fid(many) == fid("INSERT INTO t (a, b) VALUES (9, now())")
    mixed = "INSERT INTO t (a, b) VALUES (1, now()), (2, DEFAULT)"
    assert normalize(mixed) == "insert into t (a, b) values (?, now()), (?, default)"


# --------------------------------------------------------------------------- paramstyles


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM users WHERE id = %s AND name = %s",  # format
        "SELECT * FROM users WHERE id = %(id_1)s AND name = %(name_1)s",  # pyformat
        "SELECT * FROM users WHERE id = :id_1 AND name = :name_1",  # named
        "SELECT * FROM users WHERE id = :1 AND name = :2",  # numeric
        "SELECT * FROM users WHERE id = ? AND name = ?",  # qmark
        "SELECT * FROM users WHERE id = ?1 AND name = ?2",  # SQLite numbered qmark
        "SELECT * FROM users WHERE id = $1 AND name = $2",  # numeric_dollar (asyncpg)
        "SELECT * FROM users WHERE id = $1::INTEGER AND name = $2::VARCHAR",
        "SELECT * FROM users WHERE id = %(id_1)s::INTEGER AND name = %(n)s::VARCHAR(30)",
        "SELECT * FROM users WHERE id = 12 AND name = 'literal'",
    ],
)
def test_all_paramstyles_fingerprint_alike(sql: str) -> None:
    assert normalize(sql) == "select * from users where id = ? and name = ?"


def test_casts_that_are_not_on_placeholders_are_kept() -> None:
    assert normalize("SELECT a::text, CAST(b AS int) FROM t") == (
        "select a::text, cast(b as int) from t"
    )
    assert normalize("SELECT ?::timestamp without time zone, ?::numeric(10, 2)[] FROM t") == (
        "select ?, ? from t"
    )


def test_percent_escapes_match_plain_operators() -> None:
    assert fid("SELECT a %% b FROM t WHERE c LIKE %s") == fid("SELECT a % b FROM t WHERE c LIKE ?")


def test_sqlalchemy_renders_alike_across_postgresql_drivers() -> None:
    meta = sa.MetaData()
    user = sa.Table(
        "user",  # a reserved word: rendered quoted
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(30)),
        sa.Column("seen", sa.DateTime(timezone=True)),
    )
    stmts = [
        sa.select(user).where(user.c.id.in_([1, 2, 3]), user.c.name == "x").limit(5),
        sa.insert(user).values([{"id": i, "name": "n", "seen": None} for i in range(3)]),
        sa.update(user).where(user.c.id == 5).values(name="y"),
    ]
    dialects = [m.dialect() for m in (psycopg2, psycopg, asyncpg, pg8000)]
    for stmt in stmts:
        ids = {
            fid(str(stmt.compile(dialect=d, compile_kwargs={"render_postcompile": True})))
            for d in dialects
        }
        assert len(ids) == 1, stmt


# --------------------------------------------------------------------------- lexing


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a -- trailing 123 'x'\nFROM t", "select a from t"),
        ("SELECT a /* block 456\n 'x' */ FROM t", "select a from t"),
        ("SELECT /*+ INDEX(t idx_7) MAX_EXECUTION_TIME(1000) */ a FROM t", "select a from t"),
        ("SELECT a FROM t # mysql 789\nWHERE b = 1", "select a from t where b = ?"),
        ("SELECT a/*x*/FROM t", "select a from t"),
        ("SELECT a FROM t /* never closed 123", "select a from t"),
        ("SELECT '-- not a comment', b FROM t", "select ?, b from t"),
        ("SELECT '/* not a comment', b FROM t -- */", "select ?, b from t"),
        ("SELECT data #> '{a}', data #>> '{b}', data #- '{c}' FROM t", None),
    ],
)
def test_comments_and_hints_are_removed(sql: str, expected: str | None) -> None:
    got = normalize(sql)
    if expected is not None:
        assert got == expected
    else:  # PostgreSQL's #-operators are not MySQL comments
        assert got == "select data #> ?, data #>> ?, data #- ? from t"


def test_quoted_identifiers_are_kept_verbatim() -> None:
    sql = 'SELECT "User Table"."Id 42", `Order`.`x``y` FROM "User Table" WHERE "a""b" = 1'
    assert normalize(sql) == (
        'select "User Table"."Id 42", `Order`.`x``y` from "User Table" where "a""b" = ?'
    )
    # a quote inside an identifier does not open a string
    assert normalize("SELECT \"it's\", col FROM t WHERE x = 'v'") == (
        'select "it\'s", col from t where x = ?'
    )


def test_digits_in_identifiers_are_kept() -> None:
    sql = "SELECT t1.col_2, table1.x3, 2fa_codes.c FROM table1 t1, 2fa_codes WHERE col_2 = 42"
    assert normalize(sql) == (
        "select t1.col_2, table1.x3, 2fa_codes.c from table1 t1, 2fa_codes where col_2 = ?"
    )
    assert normalize("SELECT a$1, b FROM t") == "select a$1, b from t"


def test_dollar_quoted_strings() -> None:
    assert normalize("SELECT $$it's -- 123 /* $$, x FROM t") == "select ?, x from t"
    assert normalize("SELECT $fn$ body $$ inner $$ 'q' $fn$, x FROM t") == "select ?, x from t"
    assert normalize("SELECT $a$ x $b$ y $a$, $1 FROM t") == "select ?, ? from t"
    # unterminated: swallowed to the end, never leaked
    assert normalize("SELECT $q$ secret text") == "select ?"


def test_backslash_escapes_only_in_e_strings() -> None:
    assert normalize("SELECT E'it\\'s secret', x FROM t") == "select ?, x from t"
    assert normalize("SELECT e'\\\\', x FROM t") == "select ?, x from t"
    assert normalize("SELECT E'a''b\\n', x FROM t") == "select ?, x from t"
    # PostgreSQL's standard strings: a backslash is just a character
    sql = "SELECT 'C:\\', x FROM t WHERE y = 'z'"
    assert normalize(sql, "postgresql") == "select ?, x from t where y = ?"
    # MySQL: "\\'" escapes the quote, so the string runs to "= '"; then z, then a string
    assert normalize(sql, "mysql") == "select ?z?"
    # generic: the readings disagree on where the string ends, so the rest is redacted
    assert normalize(sql) == "select ?"
    assert normalize("SELECT 'a\\\\b', x FROM t") == "select ?, x from t"  # both agree


def test_unterminated_string_never_leaks() -> None:
    assert normalize("SELECT x FROM t WHERE y = 'secret value") == "select x from t where y = ?"


def test_typed_literals_keep_their_keyword() -> None:
    assert normalize("SELECT DATE '2024-01-01', TIMESTAMP '2024-01-01 10:00:00'") == (
        "select date ?, timestamp ?"
    )
    assert normalize("SELECT now() - INTERVAL '1 day', NULL") == "select now() - interval ?, null"


def test_savepoint_names_are_values() -> None:
    for n in (1, 2, 117):
        assert normalize(f"SAVEPOINT sa_savepoint_{n}") == "savepoint ?"
        assert normalize(f"RELEASE SAVEPOINT sa_savepoint_{n}") == "release savepoint ?"
        assert normalize(f"ROLLBACK TO SAVEPOINT sa_savepoint_{n}") == "rollback to savepoint ?"
    assert normalize("ROLLBACK") == "rollback"


@pytest.mark.parametrize(
    "sql",
    [
        "'" * 100_001,
        "SELECT '" + "''" * 50_000,
        "/*" * 50_000,
        "--" * 50_000,
        "$a$" * 30_001,
        "SELECT $$" + "$" * 99_999,
        "E'\\" * 30_000,
        "SELECT " + "1" * 100_000 + "a",
        "SELECT " + "1_" * 60_000,
        "(" * 40_000 + ")" * 40_000,
        "SELECT " + "a." * 40_000,
        "SELECT x FROM t WHERE y IN (" + ", ".join(["1"] * 20_000) + ")",
        " " * 100_000,
        '"' + "x" * 100_000,
    ],
)
def test_huge_and_pathological_statements_are_linear(sql: str) -> None:
    # would hang for minutes under catastrophic backtracking; no timing is asserted
    fp = fingerprint(sql)
    assert re.fullmatch(r"[0-9a-f]{16}", fp.id)


def test_long_statement_over_64_kib() -> None:
    cols = ", ".join(f"c{i}" for i in range(8000))
    rows = ", ".join(f"({i}, 'name {i}', {i}.5)" for i in range(3000))
    sql = f"INSERT INTO wide ({cols}) VALUES {rows}"
    assert len(sql) > 64 * 1024
    fp = fingerprint(sql)
    assert fp.normalized.endswith(") values (...)")
    assert fp.summary == "INSERT wide"


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_never_raises_on_arbitrary_text(text: str) -> None:
    fp = fpmod._make(text)
    assert len(fp.id) == 16
    assert len(fp.summary) <= 300


# --------------------------------------------------------------------------- summaries


@pytest.mark.parametrize(
    ("sql", "summary", "operation"),
    [
        ("SELECT * FROM users WHERE id = 1", "SELECT users", "SELECT"),
        (
            "SELECT u.id, o.total FROM users u JOIN orders o ON o.user_id = u.id "
            "LEFT JOIN items i ON i.order_id = o.id WHERE o.total > 10",
            "SELECT users",
            "SELECT",
        ),
        (
            'SELECT "user".id, "user".name \nFROM "user" \nWHERE "user".id = %(id_1)s',
            "SELECT user",
            "SELECT",
        ),
        ("SELECT `t`.`a` FROM `my_db`.`t`", "SELECT my_db.t", "SELECT"),
        ("SELECT * FROM public.accounts", "SELECT public.accounts", "SELECT"),
        ("SELECT count(*) FROM (SELECT * FROM events) AS sub", "SELECT events", "SELECT"),
        ("SELECT extract(year FROM created) FROM invoices", "SELECT invoices", "SELECT"),
        ("SELECT * FROM generate_series(1, 10)", "SELECT", "SELECT"),
        ("SELECT 1", "SELECT", "SELECT"),
        ("(SELECT a FROM x) UNION ALL (SELECT b FROM y)", "SELECT x", "SELECT"),
        ("INSERT INTO orders (a, b) VALUES (1, 2) RETURNING orders.id", "INSERT orders", "INSERT"),
        ('INSERT INTO "Order Lines" VALUES (1)', "INSERT Order Lines", "INSERT"),
        ("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", "INSERT kv", "INSERT"),
        ("INSERT IGNORE INTO kv VALUES (1)", "INSERT kv", "INSERT"),
        ("REPLACE INTO kv VALUES (1)", "REPLACE kv", "REPLACE"),
        ("UPDATE accounts SET balance = balance - 10 WHERE id = 3", "UPDATE accounts", "UPDATE"),
        ("UPDATE ONLY accounts a SET x = 1", "UPDATE accounts", "UPDATE"),
        ("DELETE FROM sessions WHERE expires_at < now()", "DELETE sessions", "DELETE"),
        ("DELETE LOW_PRIORITY QUICK FROM sessions", "DELETE sessions", "DELETE"),
        (
            "WITH recent AS (SELECT * FROM events WHERE ts > now() - INTERVAL '1 day') "
            "SELECT kind, count(*) FROM recent GROUP BY kind",
            "SELECT recent",
            "SELECT",
        ),
        (
            "WITH RECURSIVE n(i) AS (VALUES (1) UNION ALL SELECT i + 1 FROM n WHERE i < 5), "
            "doomed AS (SELECT id FROM jobs) DELETE FROM jobs WHERE id IN (SELECT id FROM doomed)",
            "DELETE jobs",
            "DELETE",
        ),
        ("WITH x AS (SELECT 1)", "WITH", "WITH"),
        ("CALL refresh_totals(1, 'x')", "CALL refresh_totals", "CALL"),
        ("MERGE INTO stock s USING delivery d ON s.id = d.id", "MERGE stock", "MERGE"),
        ("TRUNCATE TABLE audit_log", "TRUNCATE audit_log", "TRUNCATE"),
        ("BEGIN", "BEGIN", "BEGIN"),
        ("begin immediate", "BEGIN", "BEGIN"),
        ("COMMIT", "COMMIT", "COMMIT"),
        ("SET statement_timeout = 2000", "SET", "SET"),
        ("SET LOCAL lock_timeout = '1s'", "SET", "SET"),
        ("SAVEPOINT sa_savepoint_1", "SAVEPOINT", "SAVEPOINT"),
        ("RELEASE SAVEPOINT sa_savepoint_1", "RELEASE", "RELEASE"),
        ("SHOW max_connections", "SHOW", "SHOW"),
        ('PRAGMA main.table_info("user")', "PRAGMA", "PRAGMA"),
        ("/* app:checkout */ SELECT * FROM carts", "SELECT carts", "SELECT"),
        ("", "", ""),
        ("  -- only a comment", "", ""),
        ("'just a string'", "", ""),
    ],
)
def test_summary(sql: str, summary: str, operation: str) -> None:
    fp = fingerprint(sql)
    assert (fp.summary, fp.operation) == (summary, operation)


def test_summary_of_select_from_a_quoted_name_with_a_literal_lookalike() -> None:
    fp = fingerprint("SELECT * FROM 'users' WHERE x = 1")  # SQLite accepts a string here
    assert fp.summary == "SELECT"


# --------------------------------------------------------------------------- cache


def test_cache_hits_return_the_same_object_and_are_counted() -> None:
    cache_clear()
    sql = "SELECT * FROM cache_probe WHERE id = %(id)s"
    first = fingerprint(sql)
    again = fingerprint("".join(["SELECT * FROM cache_probe", " WHERE id = %(id)s"]))
    assert again is first
    assert cache_info() == (1, 1)
    assert isinstance(first, Fingerprint)


def test_cache_is_bounded() -> None:
    cache_clear()
    for i in range(fpmod._MAX_ENTRIES * 2 + 10):
        fingerprint(f"SELECT c FROM t WHERE x = 1 AND col_{i} = 2")
    assert 0 < len(fpmod._cache) <= fpmod._MAX_ENTRIES
    hits, misses = cache_info()
    assert (hits, misses) == (0, fpmod._MAX_ENTRIES * 2 + 10)
    # the character budget bounds a few huge statements too
    big = "SELECT " + ", ".join(f"c{i}" for i in range(30_000))
    for i in range(40):
        fingerprint(f"{big}, extra_{i} FROM t")
    assert fpmod._GENERIC.chars <= fpmod._MAX_CHARS
    assert fpmod._GENERIC.chars == sum(len(k) + len(v.normalized) for k, v in fpmod._cache.items())
    cache_clear()


def test_cache_is_safe_under_threads() -> None:
    cache_clear()
    statements = [f"SELECT * FROM t{i % 300} WHERE id = {i}" for i in range(6000)]
    errors: list[BaseException] = []
    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        try:
            results[k] = [fingerprint(s).id for s in statements[k % 2 :: 2] + statements]
        except BaseException as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = [fpmod._make(s).id for s in statements]
    for k, ids in results.items():
        assert ids == [fpmod._make(s).id for s in statements[k % 2 :: 2]] + expected
    assert len(fpmod._cache) <= fpmod._MAX_ENTRIES
    cache_clear()


# --------------------------------------------------------------------------- property


@dataclass(frozen=True)
class Lit:
    sql: str  # as embedded in the statement
    canonical: str  # another literal of the same kind, with other values
    secrets: tuple[str, ...]  # pieces of the value that must never come out
    #: False when the generic lexer may redact more than the literal (a standard string
    #: whose end depends on backslash escapes): then only literal-freedom is checked.
    exact: bool = True


_ALNUM_RUN = re.compile(r"[^\W_]{3,}")
_DIGIT_RUN = re.compile(r"\d{3,}")

# Pieces chosen to break a naive normalizer: quotes of every kind, escapes, comment and
# dollar-quote openers, placeholders, digits, newlines and non-ASCII text.
_text = st.lists(
    st.one_of(
        st.sampled_from(list("'\"\\`$%?:;-/*#\n\t ()[],.=_0123456789")),
        st.sampled_from(["--", "/*", "*/", "''", "\\'", "$$", "$t$", "é", "ß", "中", "😀"]),
        st.characters(codec="utf-8"),
        st.text(alphabet="abcxyz019", min_size=3, max_size=8),
    ),
    max_size=20,
).map("".join)


def _secrets_of_text(value: str) -> tuple[str, ...]:
    return tuple(_ALNUM_RUN.findall(value))


@st.composite
def _string_literals(draw: st.DrawFn) -> Lit:
    value = draw(_text)
    kind = draw(st.sampled_from(["std", "e", "n", "dollar", "date", "interval"]))
    if kind == "std":
        sql = "'" + value.replace("'", "''") + "'"
        if "\\" in value:
            return Lit(sql, "'x'", _secrets_of_text(value), exact=False)
    elif kind == "e":
        sql = "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    elif kind == "n":
        sql = "N'" + value.replace("'", "''") + "'"
        if "\\" in value:
            return Lit(sql, "'x'", _secrets_of_text(value), exact=False)
    elif kind == "dollar":
        tag = draw(st.sampled_from(["", "q", "body", "x_1"]))
        quote = f"${tag}$"
        assume((value + quote).find(quote) == len(value))  # PostgreSQL could not say it
        sql = f"{quote}{value}{quote}"
    elif kind == "date":
        day = draw(st.dates())
        return Lit(f"DATE '{day.isoformat()}'", "DATE '2000-01-01'", ())
    else:
        n = draw(st.integers(1, 10**6))
        return Lit(f"INTERVAL '{n} days'", "INTERVAL '1 day'", tuple(_DIGIT_RUN.findall(str(n))))
    return Lit(sql, "'x'", _secrets_of_text(value))


def _number_literal(text: str) -> Lit:
    return Lit(text, "0", tuple(_DIGIT_RUN.findall(text)))


_literals = st.one_of(
    _string_literals(),
    st.integers(-(10**15), 10**15).map(str).map(_number_literal),
    st.floats(allow_nan=False, allow_infinity=False).map(repr).map(_number_literal),
    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str).map(_number_literal),
    st.integers(0, 2**64).map(lambda n: _number_literal(f"0x{n:X}")),
    st.sampled_from(["TRUE", "FALSE", "true"]).map(lambda b: Lit(b, "FALSE", ())),
)

# No template contains three digits in a row, so a digit run of the literal that shows up
# in the output can only have come from the literal.
_TEMPLATES = [
    "SELECT id, name FROM users WHERE name = {} AND age > {}",
    "SELECT {} AS v, u.name FROM users u WHERE u.id = {} LIMIT {}",
    "INSERT INTO orders (user_id, note, amount) VALUES ({}, {}, {}) RETURNING orders.id",
    "UPDATE accounts SET balance = balance + {}, note = {} WHERE id = {}",
    "SELECT * FROM t1 WHERE x IN ({}, {}, {}) -- trailing comment",
    "DELETE FROM sessions WHERE expires_at < {} /* cleanup */ AND kind = {}",
    "WITH recent AS (SELECT * FROM events WHERE ts > {}) SELECT count(*) FROM recent WHERE k = {}",
    'SELECT CASE WHEN "Score 1" >= {} THEN {} ELSE {} END FROM results',
    "SELECT * FROM docs WHERE body = {} OR title = {}",
]


def _check(template: str, lits: list[Lit]) -> None:
    n = template.count("{}")
    lits = (lits * n)[:n]
    sql = template.format(*(lit.sql for lit in lits))
    reference = template.format(*(lit.canonical for lit in lits))
    fp = fpmod._make(sql)
    ref = fpmod._make(reference)
    if all(lit.exact for lit in lits):
        assert fp.id == ref.id, (sql, fp.normalized, ref.normalized)
        assert fp.summary == ref.summary
    template_text = ref.normalized.casefold() + " " + ref.summary.casefold()
    for lit in lits:
        for secret in lit.secrets:
            s = secret.casefold()
            if s in template_text:  # the template itself contains the word
                continue
            assert s not in fp.normalized.casefold(), (sql, fp.normalized)
            assert s not in fp.summary.casefold(), (sql, fp.summary)


@given(data=st.data(), template=st.sampled_from(_TEMPLATES))
@settings(max_examples=500, deadline=None)
def test_no_literal_survives_and_the_id_ignores_values(data: st.DataObject, template: str) -> None:
    n = template.count("{}")
    _check(template, data.draw(st.lists(_literals, min_size=n, max_size=n)))


@pytest.mark.parametrize("template", _TEMPLATES)
def test_nasty_fixed_literals(template: str) -> None:
    lits = [
        Lit("E'it\\'s -- /* secret12345'", "'x'", ("secret12345",)),
        Lit("-98765", "0", ("98765",)),
        Lit("$body$ it's $$ 'quoted' $x$ 55555 $body$", "'x'", ("quoted", "55555")),
        Lit("'multi\nline -- comment\n 77777'", "'x'", ("multi", "line", "77777")),
        Lit("N'中文中文'", "'x'", ("中文中文",)),
        Lit("1.5e-300", "0", ("300",)),
        Lit("0xCAFEBABE", "0", ()),
    ]
    for shift in range(len(lits)):
        _check(template, lits[shift:] + lits[:shift])


# --------------------------------------------------------------------------- dialects

from poolguard.observe.fingerprint import fingerprinter_for  # noqa: E402
from poolguard.observe.lexer import lexer_for, nested_comment_end  # noqa: E402

SECRET = "s3cr3tvalue"


@pytest.mark.parametrize(
    ("dialect", "sql", "expected"),
    [
        # PostgreSQL: standard_conforming_strings, E'', U&'', dollar quotes, nested comments
        ("postgresql", f"SELECT 1 /* a /* b */ {SECRET} */ FROM t", "select ? from t"),
        ("postgresql", f"SELECT 1 /* a /* b */ {SECRET}", "select ?"),
        ("postgresql", f"SELECT E'it\\'s {SECRET}', x FROM t", "select ?, x from t"),
        ("postgresql", f"SELECT e'\\\\' || '{SECRET}' FROM t", "select ? || ? from t"),
        ("postgresql", f"SELECT U&'d\\0061t {SECRET}' UESCAPE '!'", "select ? uescape ?"),
        ("postgresql", 'SELECT U&"d\\0061t" FROM t', 'select U&"d\\0061t" from t'),
        ("postgresql", f"SELECT $fn$ it's {SECRET} $x$ $fn$, $1 FROM t", "select ?, ? from t"),
        ("postgresql", f"SELECT $${SECRET}$$", "select ?"),
        ("postgresql", "SELECT X'DEADBEEF', B'0101', 0b101, 0o17, 0x1F_FF", "select ?, ?, ?, ?, ?"),
        ("postgresql", "SELECT a # b, c #> '{x}' FROM t", "select a # b, c #> ? from t"),
        ("postgresql", f"SELECT 'C:\\', '{SECRET}'", "select ?, ?"),
        ("postgresql", f"SELECT N'{SECRET}', '{SECRET}''s'", "select ?, ?"),
        # MySQL and MariaDB: "..." strings, backslash escapes, #, "-- ", /*! */, introducers
        ("mysql", f'SELECT * FROM t WHERE name = "{SECRET}"', "select * from t where name = ?"),
        ("mariadb", f'SELECT "it\\"s {SECRET}", x FROM t', "select ?, x from t"),
        ("mysql", f"SELECT 'it\\'s {SECRET}', x FROM t", "select ?, x from t"),
        ("mysql", f"SELECT 'a''b {SECRET}', \"a\"\"b\", x FROM t", "select ?, ?, x from t"),
        ("mysql", f"SELECT x FROM t # {SECRET}\nWHERE y = 1", "select x from t where y = ?"),
        ("mysql", f"SELECT x FROM t -- {SECRET}", "select x from t"),
        ("mysql", "SELECT 5--1", "select ?-?"),  # not a comment: 5 - (-1)
        ("mysql", f"SELECT /*!50000 '{SECRET}' */ x FROM t", "select x from t"),
        ("mysql", f"SELECT _utf8mb4'{SECRET}', N'{SECRET}', X'0A', b'01'", None),
        ("mariadb", "SELECT `we``ird`, 0b0101, 0xFF FROM `t`", "select `we``ird`, ?, ? from `t`"),
        # SQLite: standard strings, [identifiers], $name and @name parameters
        ("sqlite", f"SELECT 'it''s {SECRET}', x FROM t", "select ?, x from t"),
        ("sqlite", "SELECT [order id] FROM [order items]", "select [order id] from [order items]"),
        ("sqlite", "SELECT * FROM t WHERE a = $a AND b = @b AND c = ?1", None),
        ("sqlite", f"SELECT 'C:\\', '{SECRET}'", "select ?, ?"),
        ("sqlite", f"SELECT X'{SECRET.encode().hex()}'", "select ?"),
        # anything else: the conservative generic reading
        ("oracle", f"SELECT 1 /* a /* b */ {SECRET} */ FROM t", "select ? from t"),
        ("mssql", f"SELECT 'it\\'s {SECRET}', x FROM t", None),
        ("", f"SELECT E'\\'{SECRET}', $q${SECRET}$q$", "select ?, ?"),
    ],
)
def test_dialect_rules_never_leak(dialect: str, sql: str, expected: str | None) -> None:
    fp = fingerprinter_for(dialect)(sql)
    assert SECRET not in fp.normalized and SECRET not in fp.summary
    assert "s3cr3t" not in fp.normalized
    if expected is not None:
        assert fp.normalized == expected
    if "$a" in sql:
        assert fp.normalized == "select * from t where a = ? and b = ? and c = ?"


def test_mysql_double_quotes_were_kept_by_the_dialect_blind_reading() -> None:
    # What 0.1 did with MariaDB's "..." strings, and still does in the generic reading
    # (where "..." is an identifier, as the SQL standard says).
    sql = f'SELECT * FROM users WHERE email = "{SECRET}@example.org"'
    assert SECRET in fingerprint(sql).normalized
    mysql = fingerprinter_for("mariadb")(sql)
    assert mysql.normalized == "select * from users where email = ?"
    assert mysql.summary == "SELECT users"


def test_fingerprinters_are_shared_cached_and_agree_on_plain_sql() -> None:
    assert fingerprinter_for("mysql") is fingerprinter_for("mariadb")
    assert fingerprinter_for("firebird") is fingerprint
    assert fingerprinter_for("postgresql") is fingerprinter_for("postgresql")
    cache_clear()
    sql = "SELECT users.id FROM users WHERE users.id IN (%(p1)s, %(p2)s) AND name = %(n)s"
    ids = {fingerprinter_for(d)(sql).id for d in ("postgresql", "mysql", "sqlite", "x")}
    assert len(ids) == 1  # a statement every dialect reads alike keeps its id
    pg = fingerprinter_for("postgresql")
    assert pg(sql) is pg(sql)
    assert cache_info() == (2, 4)
    cache_clear()
    assert cache_info() == (0, 0)


def test_summaries_follow_the_dialect() -> None:
    assert fingerprinter_for("mysql")('SELECT * FROM "users"').summary == "SELECT"
    assert fingerprinter_for("postgresql")('SELECT * FROM "users"').summary == "SELECT users"
    assert fingerprinter_for("sqlite")("SELECT * FROM [order items]").summary == (
        "SELECT order items"
    )


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite", "generic"])
@pytest.mark.parametrize(
    "sql",
    [
        "/*" * 50_000 + "*/" * 50_000,
        "/*" * 100_000,
        "*/" * 100_000,
        "'\\" * 50_000,
        '"\\' * 50_000,
        "'" + "\\\\" * 50_000 + "\\'",
        "SELECT '" + "''\\" * 30_000,
        "[" * 100_000,
    ],
)
def test_pathological_statements_are_linear_in_every_dialect(dialect: str, sql: str) -> None:
    # would hang for minutes under catastrophic backtracking or a quadratic comment scan
    assert len(fpmod._make(sql, lexer_for(dialect)).id) == 16


def test_nested_comment_end() -> None:
    s = "/* a /* b */ c */ tail"
    assert s[nested_comment_end(s, 2) :] == " tail"
    assert nested_comment_end("/* never closed /* */", 2) == len("/* never closed /* */")
    assert nested_comment_end("/**/x", 2) == 4


def _quoted(data: st.DataObject, dialect: str, value: str) -> Lit:
    """``value`` as a literal in one of ``dialect``'s quoting forms, escaped as that dialect
    requires (so that the server would read exactly ``value``)."""
    secrets = _secrets_of_text(value)
    forms = {
        "postgresql": ["std", "e", "dollar", "uamp", "n"],
        "mysql": ["my_sq", "my_sq_doubled", "my_dq", "my_n", "my_introducer"],
        "sqlite": ["std"],
        "generic": ["std", "e", "dollar", "my_sq"],
    }[dialect]
    form = data.draw(st.sampled_from(forms))
    exact = True
    bs = value.replace("\\", "\\\\")
    if form == "std":
        sql = "'" + value.replace("'", "''") + "'"
        exact = dialect != "generic" or "\\" not in value
    elif form == "n":
        sql = "N'" + value.replace("'", "''") + "'"
    elif form == "e":
        sql = "E'" + bs.replace("'", "\\'") + "'"
    elif form == "uamp":
        sql = "U&'" + bs.replace("'", "''") + "'"
    elif form == "dollar":
        tag = data.draw(st.sampled_from(["", "q", "body", "x_1"]))
        quote = f"${tag}$"
        assume((value + quote).find(quote) == len(value))  # PostgreSQL could not say it
        sql = f"{quote}{value}{quote}"
    elif form == "my_sq":
        sql = "'" + bs.replace("'", "\\'") + "'"
        exact = dialect != "generic"
    elif form == "my_sq_doubled":
        sql = "'" + bs.replace("'", "''") + "'"
    elif form == "my_dq":
        sql = '"' + bs.replace('"', '\\"') + '"'
    elif form == "my_n":
        sql = "N'" + bs.replace("'", "\\'") + "'"
    else:
        sql = "_utf8mb4'" + bs.replace("'", "''") + "'"
        return Lit(sql, "_utf8mb4'x'", secrets)
    return Lit(sql, "'x'", secrets, exact)


@given(
    data=st.data(),
    dialect=st.sampled_from(["postgresql", "mysql", "sqlite", "generic"]),
    template=st.sampled_from(_TEMPLATES),
)
@settings(max_examples=600, deadline=None)
def test_no_literal_survives_in_any_dialects_quoting(
    data: st.DataObject, dialect: str, template: str
) -> None:
    lex = lexer_for(dialect)
    n = template.count("{}")
    lits = [_quoted(data, dialect, data.draw(_text)) for _ in range(n)]
    sql = template.format(*(lit.sql for lit in lits))
    fp = fpmod._make(sql, lex)
    ref = fpmod._make(template.format(*(lit.canonical for lit in lits)), lex)
    if all(lit.exact for lit in lits):
        assert fp.id == ref.id, (sql, fp.normalized, ref.normalized)
        assert fp.summary == ref.summary
    template_text = ref.normalized.casefold() + " " + ref.summary.casefold()
    for lit in lits:
        for secret in lit.secrets:
            s = secret.casefold()
            if s in template_text:
                continue
            assert s not in fp.normalized.casefold(), (sql, fp.normalized)
            assert s not in fp.summary.casefold(), (sql, fp.summary)
