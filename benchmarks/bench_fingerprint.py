"""Per-call cost of statement fingerprinting and statistics on the statement hot path.

    python benchmarks/bench_fingerprint.py [--number N]

``fingerprint()`` runs for every statement. SQLAlchemy hands the cursor the same compiled
string again and again, so what every application pays is the cache hit; a miss (the
tokenizer) is paid once per distinct statement string, and again for each new length of an
expanded ``IN`` list. ``StatsRegistry.record()`` also runs for every statement.

Cases:

* hit: the same string object, and an equal string built anew (its hash is not cached yet),
  through ``fingerprint`` (generic) and through a dialect's ``fingerprinter_for`` function;
* miss: a typical ~330-character ORM statement, a short one, and a 70 KiB bulk insert, with
  the generic lexer and each dialect's;
* record: one execution into an existing row, and a connection hold.

Each figure is the best of five runs, in microseconds per call.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from poolguard.observe import fingerprint as fpmod
from poolguard.observe.fingerprint import fingerprint, fingerprinter_for
from poolguard.observe.lexer import lexer_for
from poolguard.observe.stats import StatsRegistry

TYPICAL = (
    "SELECT users.id, users.name, users.email, users.created_at, orders.id AS order_id, "
    "orders.total FROM users JOIN orders ON orders.user_id = users.id "
    "WHERE users.id = %(id_1)s AND orders.status IN (%(status_1_1)s, %(status_1_2)s, "
    "%(status_1_3)s) AND orders.created_at > %(created_at_1)s "
    "ORDER BY orders.created_at DESC LIMIT %(param_1)s"
)
SHORT = "SELECT * FROM users WHERE id = ?"
BULK = "INSERT INTO t (a, b, c) VALUES " + ", ".join(
    f"({i}, 'name {i}', {i}.5)" for i in range(2500)
)


def best(fn: Callable[[], object], number: int) -> float:
    """Best of five, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def _dialect_misses(dialect: str, miss_n: int) -> list[tuple[str, float]]:
    lex = lexer_for(dialect)
    return [
        (f"miss: typical, {dialect}", best(lambda: fpmod._make(TYPICAL, lex), miss_n)),
        (
            f"miss: bulk insert, {dialect}",
            best(lambda: fpmod._make(BULK, lex), max(1, miss_n // 100)),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per hit/record run")
    args = parser.parse_args(argv)
    n = args.number
    miss_n = max(1, n // 200)

    fingerprint(TYPICAL)
    fresh_n = max(1, n // 20)
    # equal strings, each a new object whose hash has not been computed yet
    it = iter([TYPICAL[:100] + TYPICAL[100:] for _ in range(fresh_n * 5)])
    rows: list[tuple[str, float]] = [
        ("empty lambda (harness overhead)", best(lambda: None, n)),
        ("hit: same str object", best(lambda: fingerprint(TYPICAL), n)),
        ("hit: equal str, hash not cached", best(lambda: fingerprint(next(it)), fresh_n)),
        (f"miss: typical ({len(TYPICAL)} chars)", best(lambda: fpmod._make(TYPICAL), miss_n)),
        (f"miss: short ({len(SHORT)} chars)", best(lambda: fpmod._make(SHORT), miss_n)),
        (
            f"miss: bulk insert ({len(BULK) // 1024} KiB)",
            best(lambda: fpmod._make(BULK), max(1, miss_n // 100)),
        ),
    ]
    pg = fingerprinter_for("postgresql")
    pg(TYPICAL)
    rows.append(("hit: fingerprinter_for('postgresql')", best(lambda: pg(TYPICAL), n)))
    for dialect in ("postgresql", "mysql", "sqlite"):
        rows += _dialect_misses(dialect, miss_n)
    reg = StatsRegistry()
    fp = fingerprint(TYPICAL)
    reg.record(fp, 0.001)
    rows.append(("StatsRegistry.record", best(lambda: reg.record(fp, 0.00123), n)))
    rows.append(
        ("StatsRegistry.record(error=True)", best(lambda: reg.record(fp, 0.5, error=True), n))
    )
    rows.append(("StatsRegistry.record_hold", best(lambda: reg.record_hold(fp, 0.02), n)))
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:10.3f} us")
    print("(figures include the harness overhead of the first line)")


if __name__ == "__main__":
    main()
