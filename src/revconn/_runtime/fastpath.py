"""Write-path helpers that skip trio's schedule points when nothing has to wait.

trio makes every blocking-capable operation a schedule point, even when it
completes at once: ``trio.Lock.acquire()`` on a free lock and a socket send the
kernel takes whole both yield to the scheduler. On the forwarding path each
such yield was a full pass of trio's run loop (an ``epoll_wait`` and the
resumption of a deep await stack), several per request per process. These
helpers take the immediate path when there is one and fall back to trio's
waiting otherwise; a cancelled caller is still stopped at once
(``checkpoint_if_cancelled``), and the callers' loops reach a real schedule
point at their next read.
"""

from __future__ import annotations

import errno
import os
from types import TracebackType

import trio

__all__ = ["FastSendStream", "WriteLock", "send_all"]

_CLOSED = frozenset({errno.EBADF, errno.ENOTSOCK})


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


async def send_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``, without a schedule point when the kernel takes
    all of ``data`` at once (the usual case for a response head or a tunnel
    message); the rest, if any, goes through trio's send (waits for the socket
    to drain). Callers serialise their writes (a WriteLock).

    Only a plain ``trio.SocketStream`` is written to with ``os.write`` on its
    file descriptor; any other stream (TLS above all: its socket carries
    records, and plaintext written there would corrupt the session) is sent
    to with its own ``send_all``."""
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    await trio.lowlevel.checkpoint_if_cancelled()
    fd = stream.socket.fileno()
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        if fd == -1 or exc.errno in _CLOSED:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


class FastSendStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose ``send_all`` is :func:`send_all`: for a library that
    writes through a trio Stream (the agent's trio-websocket), a message the
    kernel takes whole costs no schedule point. Everything else is the
    wrapped stream's; the library serialises its own sends. Plain TCP only
    (the annotation says so): a TLS stream is used as it is."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await send_all(self.stream, data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()
