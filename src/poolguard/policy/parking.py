"""How a gate's waiter waits: on its own lock (threads) or future (event loops), for any
timeout a caller can give. Apart from :mod:`poolguard.policy.gate` because it is the one
part that knows nothing of slots or partitions, only of the platform's limits on a wait."""

from __future__ import annotations

import asyncio
import threading
import time

__all__ = ["MAX_STEP", "park", "park_async"]

#: The longest single wait on a lock or a future: far below ``threading.TIMEOUT_MAX`` and the
#: platform's ``time_t``, far above any sensible checkout bound (longer waits loop).
MAX_STEP = 86_400.0


def park(lock: threading.Lock, timeout: float) -> bool:
    """Wait for a granted waiter's lock, up to ``timeout`` seconds (any positive float,
    ``inf`` included); True when granted.

    One ``Lock.acquire`` cannot wait past ``threading.TIMEOUT_MAX`` nor past what the
    platform's ``time_t`` holds (1e10 s overflows): longer waits go in steps of
    :data:`MAX_STEP`, so a huge ``checkout_timeout`` means "wait", never ``OverflowError``.
    """
    if not timeout > 0:  # zero, negative and NaN: no wait
        return False
    if timeout <= MAX_STEP:
        return lock.acquire(timeout=timeout)
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False
        if lock.acquire(timeout=min(left, MAX_STEP)):
            return True


async def park_async(future: asyncio.Future[None], timeout: float) -> None:
    """As :func:`park` for an async waiter; raises ``TimeoutError`` when none came. The
    future is shielded: a time-out or a cancel leaves it for :meth:`Gate._abandon`."""
    if not timeout > 0:
        raise asyncio.TimeoutError
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        try:
            await asyncio.wait_for(asyncio.shield(future), min(left, MAX_STEP))
            return
        except (asyncio.TimeoutError, TimeoutError):
            if left <= MAX_STEP:
                raise
