"""A lean HTTP/1.1 keep-alive client pool on trio + h11, for the agent's upstream.

Why not httpx/httpcore: profiling the agent at 32 concurrent requests showed
httpcore's pool bookkeeping (scanning every idle connection with poll() on each
request, expiry checks, tracing hooks) as the largest share of the agent's CPU.
This pool keeps idle connections on a LIFO stack and checks only the one it
takes (one non-blocking poll), so a request costs O(1) bookkeeping.

Bounded: at most ``max_connections`` connections exist; callers beyond that
wait (with the caller's own deadline). Cancellation closes the connection in
use, which is how a cancelled request reaches the upstream at once.

A request body goes up in a task of its own while the exchange reads the
response: an upstream may answer before it has read the body (a 413 from a
form handler, a 401 before a large PUT), stop reading and close, and that
answer must not be lost to a blocked or broken send. A client "SHOULD monitor
the network connection for an error response while it is transmitting the
request" and then "immediately cease transmitting the body" (RFC 9112 9.5):
a final status of 300 or more stops the upload at once; an earlier 2xx lets
it go on (a full-duplex upstream) until the response is complete. A
connection whose upload was cut short is closed, never pooled.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import trio

from .._errors import UpstreamClosed, UpstreamConnectError
from .._runtime.fastpath import send_all

__all__ = [
    "BodySource",
    "Pool",
    "PoolResponse",
    "PoolStatistics",
    "UpstreamClosed",
    "UpstreamConnectError",
]

READ_SIZE = 256 * 1024

BodySource = Callable[[], Awaitable[bytes | None]]
"""A request body, read a chunk at a time: the next bytes, or None at its end
(``TunnelStream.read`` is one)."""

_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen
class PoolStatistics:
    idle: int
    """Kept-alive connections waiting to be reused."""
    in_use: int
    """Requests in flight (each holds one connection)."""


class _Conn:
    __slots__ = ("_read_scope", "h11", "io_timeout", "sock", "stream", "uploading")

    def __init__(self, stream: _Stream, io_timeout: float) -> None:
        self.stream = stream
        raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self.sock = raw.socket
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.io_timeout = io_timeout
        self.uploading = False
        """A request body is still going up (its task runs)."""
        self._read_scope: trio.CancelScope | None = None

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

    async def next_event(self) -> h11.Event:
        """The next event; TooSlowError after ``io_timeout`` without data, counted
        from the end of the upload (an upstream may rightly wait for the whole
        body before it says anything)."""
        while True:
            event = self.next_event_nowait()
            if isinstance(event, h11.Event):
                return event
            deadline = math.inf if self.uploading else trio.current_time() + self.io_timeout
            with trio.CancelScope(deadline=deadline) as self._read_scope:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise UpstreamClosed(f"upstream connection lost: {exc}") from None
                finally:
                    self._read_scope = None
                self.h11.receive_data(bytes(data))
                continue
            raise trio.TooSlowError

    def upload_over(self) -> None:
        """The upload ended (sent, stopped or broken): a read waiting now gets
        its deadline."""
        self.uploading = False
        if self._read_scope is not None:
            self._read_scope.deadline = trio.current_time() + self.io_timeout


class _Upload:
    """The request body on its way upstream, in a task beside the exchange.

    It never raises: a network error just ends it (the upstream stopped taking
    the body and may have answered already: the exchange reads on); a failure
    of the body's source, or a body h11 refuses, is kept in ``error`` and
    cancels ``abort``, the scope of the exchange, which raises it.
    """

    __slots__ = ("_abort", "_conn", "_read", "_scope", "_stopping", "error", "writing")

    def __init__(self, conn: _Conn, read: BodySource, abort: trio.CancelScope) -> None:
        self._conn = conn
        self._read = read
        self._abort = abort
        self._scope = trio.CancelScope()
        self._stopping = False
        self.writing = False
        self.error: Exception | None = None
        conn.uploading = True

    def stop(self) -> None:
        """Send no more of the body (the connection must then be closed).

        A write in progress is not cancelled: a cancelled write breaks a TLS
        stream for the reads too (trio's SSLStream), and the answer is still
        to be read. It ends when it completes or the connection is closed."""
        self._stopping = True
        if not self.writing:
            self._scope.cancel()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self._abort.cancel()

    async def run(self) -> None:
        conn = self._conn
        try:
            with self._scope:
                while True:
                    try:
                        chunk = await self._read()
                    except Exception as exc:  # noqa: BLE001 (re-raised by the exchange)
                        self._fail(exc)
                        return
                    if self._stopping:
                        return
                    event = h11.EndOfMessage() if chunk is None else h11.Data(data=chunk)
                    self.writing = True
                    try:
                        await conn.send(event)
                    except h11.LocalProtocolError as exc:  # e.g. more than its Content-Length
                        self._fail(UpstreamClosed(f"cannot send this request upstream: {exc}"))
                        return
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # closed or reset by the upstream: its answer may be in
                    finally:
                        self.writing = False
                    if chunk is None or self._stopping:
                        return
        finally:
            conn.upload_over()


class PoolResponse:
    """A response whose body is read with ``aiter_chunks()``."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers

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
                event = await conn.next_event()
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
        single read from the upstream once the request is sent (not a deadline
        on a whole exchange: an upload or a long stream may take as long as
        data keeps moving)."""
        if not (math.isfinite(io_timeout) and io_timeout > 0):
            raise ValueError("io_timeout must be > 0")
        self.io_timeout = io_timeout
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._idle: list[tuple[_Conn, float]] = []
        self._slots = trio.Semaphore(max_connections)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(idle=len(self._idle), in_use=self.max_connections - self._slots.value)

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
            reason = connect_failure(exc)
            raise UpstreamConnectError(
                f"cannot connect to {self.host}:{self.port}: {reason}", reason=reason
            ) from exc
        return _Conn(stream, self.io_timeout)

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
        body: BodySource | None,
    ) -> AsyncIterator[PoolResponse]:
        """Send a request and yield the response (status and headers read; body to
        be read inside the block). The connection returns to the pool if the
        exchange completed cleanly, else it is closed.

        Raises UpstreamConnectError, UpstreamClosed, trio.TooSlowError, or
        what ``body`` raised."""
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
                if body is None:
                    try:
                        response = await self._exchange(conn, method, target, headers)
                    except UpstreamClosed:
                        if not reused:
                            raise
                        # A kept-alive connection the server closed just now: once more, fresh.
                        await trio.aclose_forcefully(conn.stream)
                        conn = await self._connect()
                        response = await self._exchange(conn, method, target, headers)
                    yield response
                else:
                    async with self._upload_exchange(
                        conn, method, target, headers, body
                    ) as response:
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
        self, conn: _Conn, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> PoolResponse:
        """A request without a body: head and end in one write, then the response head."""
        data = conn.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
        try:
            await conn.write(data + (conn.h11.send(h11.EndOfMessage()) or b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamClosed(f"upstream connection lost while sending: {exc}") from None
        return await _response_head(conn)

    @asynccontextmanager
    async def _upload_exchange(
        self,
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: BodySource,
    ) -> AsyncIterator[PoolResponse]:
        """A request with a body: the body goes up in a task of its own while
        this one reads the response (the module docstring says why)."""
        data = conn.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
        try:
            await conn.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamClosed(f"upstream connection lost while sending: {exc}") from None
        single: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as abort:
                    upload = _Upload(conn, body, abort)
                    nursery.start_soon(upload.run)
                    try:
                        response = await _response_head(conn)
                        if conn.uploading and response.status >= 300:
                            upload.stop()  # it does not want the rest
                        yield response
                    finally:
                        upload.stop()  # the response is complete (or abandoned)
                        if upload.writing:  # blocked: the upstream reads no more
                            await trio.aclose_forcefully(conn.stream)
        except BaseExceptionGroup as group:
            # The upload task never raises: this is the block's own exception
            # (or cancellation of both tasks), to be seen as if there were no task.
            if len(group.exceptions) != 1:
                raise
            single = group.exceptions[0]
        if single is not None:
            raise single  # outside the except clause: its context stays its own
        if abort.cancelled_caught and upload.error is not None:
            raise upload.error


async def _response_head(conn: _Conn) -> PoolResponse:
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.InformationalResponse):
            continue  # 1xx: not forwarded
        if isinstance(event, h11.Response):
            return PoolResponse(conn, event.status_code, list(event.headers))
        if isinstance(event, h11.ConnectionClosed):
            raise UpstreamClosed("upstream closed the connection without a response")


def connect_failure(exc: BaseException) -> str:
    """Why a connect failed, briefly ("connection refused"). trio's
    ``open_tcp_stream`` raises one OSError for all the addresses it tried, with
    each attempt's error in its cause."""
    errors: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        errors = list(exc.__cause__.exceptions)
    elif isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        errors = [exc.__cause__]  # the TLS handshake failed
    reasons: list[str] = []
    for error in errors:
        if isinstance(error, socket.gaierror):
            reason = f"cannot resolve the host ({error.strerror})"
        elif isinstance(error, OSError) and error.errno and not isinstance(error, ssl.SSLError):
            reason = os.strerror(error.errno).lower()
        else:
            reason = str(error) or type(error).__name__
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)
