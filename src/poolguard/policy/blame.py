"""Blaming a lock holder for the lock waits it causes.

A statement that holds a row lock while it runs long makes every writer of that row wait;
the writers fail on ``lock_timeout`` (their time-outs earn no quarantine strike, rightly:
they are victims), while the holder earns a strike only when its own, longer statement
time-out ends it. Lock holders are serialised by their own lock, so three of those take
three whole statement time-outs (15 s with the defaults), while every writer of the row fails.

So when a victim's lock wait ends, the guard asks the server which backends block the
sessions still waiting for a lock and, if one of them is its own connection and has been
running one statement since before the victim started waiting, that statement takes the
strike: it is what keeps the lock held. One question to the server serves every victim for
:data:`CACHE_SECONDS`, and only one is asked at a time, so a pile-up of victims costs a
handful of queries a second, on a connection of their own (the victim's transaction is
aborted and is the application's to roll back).

This module is the policy (when to ask, whom to blame); the question itself is the dialect
enforcer's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["CACHE_SECONDS", "Blocker", "LockBlame", "Victim", "culprits"]

#: How long one answer about the blocking backends serves further victims.
CACHE_SECONDS = 0.25


@dataclass(frozen=True)
class Blocker:
    """One of the guard's connections and the statement it is running."""

    pid: int
    fingerprint: str
    summary: str
    running_since: float


@dataclass(frozen=True)
class Victim:
    """A lock wait that just ended: when it began and ended, and what of ours was running."""

    waited_since: float
    waited_until: float
    running: tuple[Blocker, ...]


class LockBlame:
    """Which backends block lock waiters, asked rarely and never twice at once.

    Victims often time out together (they queued behind the same lock). One of them asks the
    server; the others leave their case with it instead of waiting (an asyncio task must not
    block the loop the asker needs) or asking too, and the asker judges them all.
    """

    __slots__ = ("_answer", "_asking", "_mutex", "_pending", "blamed")

    def __init__(self) -> None:
        self._answer: tuple[float, frozenset[int]] | None = None
        self._asking = threading.Lock()
        self._mutex = threading.Lock()
        self._pending: list[Victim] = []
        #: Strikes given to lock holders so far (for stats).
        self.blamed = 0

    def judge(self, victim: Victim, now: float, ask: Callable[[], Iterable[int]]) -> list[Blocker]:
        """The statements to blame for ``victim``'s wait, and for those of the victims that
        left their case while this call asked the server. ``ask`` may raise: the cases it
        was to settle are dropped (blame is best effort)."""
        answer = self._answer
        if answer is not None and now - answer[0] < CACHE_SECONDS:
            return culprits(answer[1], victim)
        with self._mutex:
            self._pending.append(victim)
        if not self._asking.acquire(blocking=False):
            return []  # someone is asking: it judges this victim too
        try:
            try:
                pids = frozenset(ask())
            finally:
                with self._mutex:
                    pending, self._pending = self._pending, []
            self._answer = (now, pids)
        finally:
            self._asking.release()
        return [b for v in pending for b in culprits(pids, v)]


def culprits(blockers: frozenset[int], victim: Victim) -> list[Blocker]:
    """The statements to blame: on a blocking backend, and running for at least the second
    half of the victim's wait. The lock was usually taken by an earlier, quick statement of
    the same transaction; what kept it held is the statement that has run since. A holder
    making progress through quick statements is not blamed for whichever one is running at
    the moment of asking."""
    since = (victim.waited_since + victim.waited_until) / 2
    return [b for b in victim.running if b.pid in blockers and b.running_since <= since]
