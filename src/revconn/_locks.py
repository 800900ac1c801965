"""A lock for the hot write paths whose uncontended acquire costs no schedule point.

``trio.Lock.acquire()`` always yields to the scheduler, even when the lock is
free. On the forwarding path every write takes a lock (the tunnel's, the
WebSocket's, a public connection's), and each of those yields was a full pass
of trio's run loop (an ``epoll_wait`` and the resumption of a deep await
stack) per request per process. The write that follows is a checkpoint anyway
(trio's socket send), so cancellation is still seen promptly.
"""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["WriteLock"]


class WriteLock:
    """``async with`` mutual exclusion: FIFO like ``trio.Lock`` when contended,
    no schedule point when free."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
