"""The lock-holder blame policy on its own (pure): whom to blame, when to ask the server.

End to end on a real PostgreSQL: tests/test_postgresql.py (queued victims blame the holder).
"""

from __future__ import annotations

import pytest

from poolguard.policy.blame import CACHE_SECONDS, Blocker, LockBlame, Victim, culprits

ROGUE = Blocker(pid=10, fingerprint="f-rogue", summary="SELECT", running_since=0.0)
QUICK = Blocker(pid=11, fingerprint="f-quick", summary="UPDATE t", running_since=0.9)
BYSTANDER = Blocker(pid=12, fingerprint="f-read", summary="SELECT r", running_since=0.0)


def victim(since: float = 0.0, until: float = 1.0) -> Victim:
    return Victim(since, until, (ROGUE, QUICK, BYSTANDER))


def test_blames_only_blockers_running_through_the_second_half_of_the_wait() -> None:
    # pid 12 runs as long but blocks nobody; pid 11 blocks but started late in the wait
    # (a holder moving through quick statements); pid 10 blocks and has run all along.
    assert culprits(frozenset({10, 11}), victim()) == [ROGUE]
    assert culprits(frozenset({11}), victim()) == []
    assert culprits(frozenset(), victim()) == []
    # Started exactly at the wait's midpoint: it has kept the lock for half the wait.
    half = Blocker(pid=11, fingerprint="f", summary="S", running_since=0.5)
    assert culprits(frozenset({11}), Victim(0.0, 1.0, (half,))) == [half]


def test_one_answer_serves_victims_for_a_while() -> None:
    blame = LockBlame()
    asked: list[float] = []

    def ask() -> list[int]:
        asked.append(1.0)
        return [10]

    assert blame.judge(victim(), 1.0, ask) == [ROGUE]
    assert blame.judge(victim(), 1.0 + CACHE_SECONDS / 2, ask) == [ROGUE]
    assert len(asked) == 1
    assert blame.judge(victim(), 1.0 + CACHE_SECONDS, ask) == [ROGUE]
    assert len(asked) == 2


def test_victims_arriving_while_one_asks_are_judged_by_the_asker() -> None:
    """Nobody waits for the asker (an asyncio task must not block the loop it needs), and
    nobody's case is lost: the asker judges all of them."""
    blame = LockBlame()
    late: list[list[Blocker]] = []

    def ask() -> list[int]:
        # Two more victims' waits end while the server is being asked.
        late.append(blame.judge(victim(), 1.0, lambda: pytest.fail("asked twice")))
        late.append(blame.judge(victim(), 1.0, lambda: pytest.fail("asked twice")))
        return [10]

    assert blame.judge(victim(), 1.0, ask) == [ROGUE, ROGUE, ROGUE]
    assert late == [[], []]


def test_a_failed_question_drops_its_cases_and_the_next_victim_asks_again() -> None:
    blame = LockBlame()

    def broken() -> list[int]:
        raise ConnectionError("max_connections reached")

    with pytest.raises(ConnectionError):
        blame.judge(victim(), 1.0, broken)
    # Nothing cached, nothing pending, the question is free again.
    assert blame.judge(victim(), 1.1, lambda: [10]) == [ROGUE]
