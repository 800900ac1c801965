"""A lean HTTP/1.1 keep-alive client pool on trio + h11, for the agent's upstream.

Why not httpx/httpcore: profiling the agent at 32 concurrent requests showed
httpcore's pool bookkeeping (scanning every idle connection with poll() on each
request, expiry checks, tracing hooks) as the largest share of the agent's CPU.
This pool keeps idle connections on a LIFO stack and checks only the one it
takes (one non-blocking poll), so a request costs O(1) bookkeeping.

Bounded: at most ``max_connections`` connections exist; callers beyond that
wait (with the caller's own deadline). Cancellation closes the connection in
use, which is how a cancelled request reaches the upstream at once.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import trio

from .._runtime.fastpath import send_all

__all__ = ["Pool", "PoolResponse", "UpstreamClosed", "UpstreamConnectError"]

READ_SIZE = 256 * 1024


class UpstreamConnectError(OSError):
    """The upstream could not be reached (connection refused, no route, ...)."""


class UpstreamClosed(Exception):
    """The upstream broke the HTTP/1.1 exchange (closed early, malformed response)."""


_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class _Conn:
    __slots__ = ("h11", "sock", "stream")

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self.sock = raw.socket
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    async def write(self, data: bytes) -> None:
        if isinstance(self.stream, trio.SocketStream):
            await send_all(self.stream, data)  # no schedule point if sent at once
        else:
            await self.stream.send_all(data)

    def stale(self) -> bool:
        """An idle connection the server has closed (or sent junk on) is readable."""
        try:
            return bool(self.sock.is_readable())
        except OSError:
            return True

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.write(data)

    def next_event_nowait(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event from what is already buffered (NEED_DATA if none)."""
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamClosed(f"malformed response from upstream: {exc}") from None

    async def next_event(self, read_timeout: float) -> h11.Event:
        while True:
            event = self.next_event_nowait()
            if isinstance(event, h11.Event):
                return event
            with trio.fail_after(read_timeout):
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise UpstreamClosed(f"upstream connection lost: {exc}") from None
            self.h11.receive_data(bytes(data))


class PoolResponse:
    """A response whose body is read with ``aiter_body()``."""

    __slots__ = ("_conn", "_read_timeout", "headers", "status")

    def __init__(
        self, conn: _Conn, status: int, headers: list[tuple[bytes, bytes]], read_timeout: float
    ) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._read_timeout = read_timeout

    async def aiter_chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """Body chunks as ``(data, last)``. ``last`` is True on the final chunk
        when the end of the message was already buffered: a small response
        then leaves as one DATA frame with END_STREAM. A chunk is never held
        back waiting for the network (streaming responses stay live)."""
        conn = self._conn
        pending: bytes | None = None
        while True:
            event: object
            if pending is None:
                event = await conn.next_event(self._read_timeout)
            else:
                event = conn.next_event_nowait()
                if not isinstance(event, h11.Event):  # nothing more buffered
                    chunk, pending = pending, None
                    yield chunk, False
                    continue
            if isinstance(event, h11.Data):
                if pending is not None:
                    yield pending, False
                pending = event.data  # a fresh bytearray from h11: no copy needed
            elif isinstance(event, h11.EndOfMessage):
                yield (pending if pending is not None else b""), True
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamClosed("upstream closed the connection mid-body")


class Pool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
        idle_timeout: float = 30.0,
        io_timeout: float = 60.0,
    ) -> None:
        """``io_timeout``: the longest wait for a connection, a connect, or any
        single read from the upstream (not a deadline on a whole exchange: an
        upload or a long stream may take as long as data keeps moving)."""
        if not (math.isfinite(io_timeout) and io_timeout > 0):
            raise ValueError("io_timeout must be > 0")
        self.io_timeout = io_timeout
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self._idle: list[tuple[_Conn, float]] = []
        self._slots = trio.Semaphore(max_connections)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await trio.aclose_forcefully(conn.stream)

    async def _connect(self) -> _Conn:
        timeout = self.io_timeout
        stream: _Stream
        try:
            with trio.fail_after(timeout):
                if self.ssl_context is not None:
                    stream = await trio.open_ssl_over_tcp_stream(
                        self.host, self.port, ssl_context=self.ssl_context, https_compatible=True
                    )
                    await stream.do_handshake()
                else:
                    stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc}"
            ) from None
        return _Conn(stream)

    def _take_idle(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < self.idle_timeout and not conn.stale():
                return conn
            conn.sock.close()
        return None

    @asynccontextmanager
    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
    ) -> AsyncIterator[PoolResponse]:
        """Send a request and yield the response (status and headers read; body to
        be read inside the block). The connection returns to the pool if the
        exchange completed cleanly, else it is closed."""
        try:
            self._slots.acquire_nowait()  # no schedule point while below the limit
        except trio.WouldBlock:
            with trio.fail_after(self.io_timeout):
                await self._slots.acquire()
        try:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            clean = False
            try:
                try:
                    response = await self._exchange(conn, method, target, headers, body)
                except UpstreamClosed:
                    if not (reused and body is None):
                        raise
                    # A kept-alive connection the server closed just now: once more, fresh.
                    await trio.aclose_forcefully(conn.stream)
                    conn = await self._connect()
                    response = await self._exchange(conn, method, target, headers, body)
                yield response
                if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                    conn.h11.start_next_cycle()
                    clean = True
            except h11.LocalProtocolError as exc:
                raise UpstreamClosed(f"cannot send this request upstream: {exc}") from None
            finally:
                if clean:
                    self._idle.append((conn, trio.current_time()))
                else:
                    conn.sock.close()
        finally:
            self._slots.release()

    async def _exchange(
        self,
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
    ) -> PoolResponse:
        try:
            head = conn.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
            if body is None:  # head and end in one write
                await conn.write(head + (conn.h11.send(h11.EndOfMessage()) or b""))
            else:
                await conn.write(head)
                async for chunk in body:
                    await conn.send(h11.Data(data=chunk))
                await conn.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamClosed(f"upstream connection lost while sending: {exc}") from None
        while True:
            event = await conn.next_event(self.io_timeout)
            if isinstance(event, h11.InformationalResponse):
                continue  # 1xx: not forwarded
            if isinstance(event, h11.Response):
                return PoolResponse(conn, event.status_code, list(event.headers), self.io_timeout)
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamClosed("upstream closed the connection without a response")
