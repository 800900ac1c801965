"""The data plane's HTTP/1.1 exchange, written once: dispatch on the raw
request target, the agent lookup (through the Registry interface), opening
the stream, the upload with backpressure, the response relay, the abort when
the agent is lost after the response started, the reset when the client goes.

The listener (``listener.py``) is a thin adapter around it: it accepts
sockets and runs one :class:`HttpConnection` per connection. Semantics:

* a client that disconnects resets its stream (the agent cancels the
  upstream call);
* an agent lost after the response started aborts the client connection, so
  a truncated body never looks complete (no final chunk, no clean close);
* an answer given before the request body was read (ours or the agent's)
  is followed by a lingering close, so the client sees it rather than a reset.
"""

from __future__ import annotations

import http
import logging
import math
from collections.abc import Iterable
from typing import NoReturn, Protocol

import h11
import trio

from .. import _codes
from .._errors import StreamError
from .._proto.headers import clean_headers
from .._runtime.fastpath import WriteLock, send_all
from .registry import Registry, RequestStream
from .replies import Reply, bad_status, json_reply, stream_failure
from .routing import Route, Target, dispatch, forward
from .websocket import WebSocketTransport, upgrade_response

__all__ = ["MAX_HEAD", "DataPlane", "HttpConnection"]

log = logging.getLogger("revconn.exchange")

MAX_HEAD = 64 * 1024
"""Largest request head (request line + headers) accepted: 431 beyond."""
READ_SIZE = 64 * 1024
LINGER = 5.0
"""After answering before the request body was read: how long at most to keep
reading (and discarding) it, so the client sees the answer rather than a reset
(closing a socket with unread data sends RST, which can destroy the answer)."""
_REASONS = {int(status): status.phrase.encode("ascii") for status in http.HTTPStatus}
SEND_JOIN_LIMIT = 64 * 1024
"""Pieces of a write are joined into one send below this size (one syscall);
larger bodies go out as they are (no copy)."""


class DataPlane(Protocol):
    """What an exchange needs from the gateway."""

    @property
    def registry(self) -> Registry: ...

    @property
    def idle_timeout(self) -> float:
        """Keep-alive idle time, and the time allowed for a request head (s)."""
        ...

    @property
    def max_message_size(self) -> int:
        """Largest WebSocket message accepted from an agent."""
        ...

    @property
    def scheme(self) -> str:
        """``http`` or ``https``: what X-Forwarded-Proto says."""
        ...

    @property
    def shutting_down(self) -> bool: ...

    def admit_agent(
        self, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> str | Reply:
        """The agent's name, or the refusal to answer its upgrade with."""
        ...


_Next = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


class _InFlight:
    """One request in flight on a connection."""

    __slots__ = ("done", "name", "scope", "stream")

    def __init__(self, stream: RequestStream, name: str) -> None:
        self.stream = stream
        self.name = name
        self.scope = trio.CancelScope()
        self.done = False


class HttpConnection:
    """HTTP/1.1 on one accepted connection: requests are dispatched, forwarded
    to agents (or answered by the gateway), until the connection ends or
    becomes an agent's WebSocket.

    ``run()`` is this connection's reader task: it parses with h11, uploads
    request bodies (with backpressure: the stream's flow-control window) and
    notices a client that goes away. Per forwarded request one relay task
    writes the response. Memory is bounded: one h11 buffer (request heads up to
    ``MAX_HEAD``) plus the stream's window.
    """

    __slots__ = (
        "_cycle_done",
        "_exchange",
        "_method",
        "_nursery",
        "_send_lock",
        "_timeout",
        "_tunnel",
        "client",
        "h11",
        "plane",
        "stream",
    )

    def __init__(self, plane: DataPlane, stream: trio.SocketStream, client: str | None):
        self.plane = plane
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._send_lock = WriteLock()
        self._exchange: _InFlight | None = None
        self._cycle_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._timeout = trio.CancelScope()
        self._method = b""
        self._tunnel: tuple[str, WebSocketTransport] | None = None

    # -- writing (the relay task, and the reader for 100/4xx) ----------------------
    async def _write(self, *events: h11.Event) -> None:
        parts: list[bytes] = []
        for event in events:
            if isinstance(event, h11.Data) and len(event.data) > SEND_JOIN_LIMIT:
                parts.extend(self.h11.send_with_data_passthrough(event) or [])
            else:
                data = self.h11.send(event)
                if data:
                    parts.append(data)
        if not parts:
            return  # e.g. the end of a Content-Length body: nothing to write
        async with self._send_lock:
            if len(parts) > 1 and sum(map(len, parts)) <= SEND_JOIN_LIMIT:
                parts = [b"".join(parts)]
            for part in parts:
                await send_all(self.stream, part)

    async def _reply(self, reply: Reply, *, close: bool = False) -> None:
        headers = [*reply.headers, (b"connection", b"close")] if close else reply.headers
        body = b"" if self._method == b"HEAD" else reply.body
        response = h11.Response(
            status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b"")
        )
        events: list[h11.Event] = [response]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self._write(*events)

    # -- the reader (this connection's own task) ----------------------------------
    async def run(self) -> tuple[str, WebSocketTransport] | None:
        """Serve HTTP requests until the connection ends; returns the agent's
        name and WebSocket if it turned into an agent tunnel."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._timeout:
                await self._read_loop()
            if self._timeout.cancelled_caught:
                await self._timed_out()
            nursery.cancel_scope.cancel()
        return self._tunnel

    async def _read_loop(self) -> None:
        conn = self.h11
        event: h11.Event | type[h11.PAUSED] | None = None
        while True:
            try:
                if event is None:
                    self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
                    event = await self._next_event()
                if event is h11.PAUSED:
                    # A pipelined request waits until the current response is done.
                    self._timeout.deadline = math.inf
                    await self._cycle_done.wait()
                    if conn.our_state is not h11.IDLE:
                        return
                    event = None
                    continue
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed
                self._method = event.method
                event = await self._request(event)
            except h11.RemoteProtocolError as exc:
                ex = self._exchange
                if ex is not None and not ex.done:
                    self._client_gone(ex)
                else:
                    await self._bad_request(exc)
                return

    async def _timed_out(self) -> None:
        """Idle or slow client: say 408 if a request head had begun, then close."""
        conn = self.h11
        if conn.their_state is h11.IDLE and conn.our_state is h11.IDLE and conn.trailing_data[0]:
            detail = f"request head not received within {self.plane.idle_timeout:g} s"
            with trio.move_on_after(1):
                await self._reply(
                    json_reply(408, {"error": "request_timeout", "detail": detail}), close=True
                )

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        conn = self.h11
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.stream.receive_some(READ_SIZE))
                continue
            return event  # type: ignore[return-value]

    async def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            error = "request_header_too_large" if status == 431 else "bad_request"
            reply = json_reply(status, {"error": error, "detail": str(exc)})
            await self._reply(reply, close=True)

    async def _request(self, request: h11.Request) -> h11.Event | type[h11.PAUSED] | None:
        """Forward one request; returns the connection's next event if it was
        read while watching for the client going away."""
        decision = dispatch(request.target)
        if isinstance(decision, Reply):
            await self._answer_early(decision)
            return None
        if decision is Target.AGENT:
            await self._agent_tunnel(request)
            return h11.ConnectionClosed()  # this connection is an agent's WebSocket now
        if decision is Target.HEALTH:
            await self._answer_early(self._health(request.method))
            return None
        assert isinstance(decision, Route)
        outbound = forward(
            self.plane.registry,
            decision,
            request.method,
            request.headers,
            client=self.client,
            proto=self.plane.scheme,
        )
        if isinstance(outbound, Reply):
            await self._answer_early(outbound)
            return None
        first = self.h11.next_event()  # EndOfMessage right away for a bodiless request
        bodiless = isinstance(first, h11.EndOfMessage)
        stream = outbound.open(end_stream=bodiless)
        if isinstance(stream, Reply):
            await self._answer_early(stream)
            return None
        session = outbound.session
        exchange = _InFlight(stream, outbound.name)
        self._exchange = exchange
        self._cycle_done = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._relay, exchange)
        if bodiless:
            await session.flush()
        else:
            await self._upload(exchange, first)
        # Now watch for the client going away; the relay re-arms the idle
        # timeout when the response is done.
        self._timeout.deadline = math.inf
        if exchange.done:
            return None
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed) and not exchange.done:
            self._client_gone(exchange)
            raise trio.BrokenResourceError("client closed the connection")
        return event  # the next request, PAUSED (pipelined) or ConnectionClosed

    def _health(self, method: bytes) -> Reply:
        if method not in (b"GET", b"HEAD"):
            return json_reply(
                405,
                {"error": "method_not_allowed", "detail": "use GET"},
                [(b"allow", b"GET, HEAD")],
            )
        if self.plane.shutting_down:
            return json_reply(503, {"status": "shutting_down"})
        return json_reply(200, {"status": "ok"})

    async def _agent_tunnel(self, request: h11.Request) -> None:
        """An agent dialing in: answer the WebSocket handshake (101) and hand the
        connection to its tunnel, or refuse with a plain HTTP response."""
        headers = list(request.headers)
        accept = upgrade_response(request.method, headers)
        if isinstance(accept, Reply):
            await self._answer_early(accept, close=True)
            return
        query = request.target.partition(b"?")[2]
        admitted = self.plane.admit_agent(query, headers)
        if isinstance(admitted, Reply):
            await self._answer_early(admitted, close=True)
            return
        if not isinstance(self.h11.next_event(), h11.EndOfMessage):
            reply = json_reply(
                400, {"error": "bad_websocket_handshake", "detail": "unexpected request body"}
            )
            await self._answer_early(reply, close=True)
            return
        switch = h11.InformationalResponse(
            status_code=101, headers=accept, reason=b"Switching Protocols"
        )
        await self.stream.send_all(self.h11.send(switch) or b"")
        trailing, _ = self.h11.trailing_data
        transport = WebSocketTransport(self.stream, trailing, self.plane.max_message_size)
        self._tunnel = (admitted, transport)  # run() returns it to the listener

    async def _upload(self, exchange: _InFlight, first: _Next) -> None:
        """Send the request body up the stream; a reset or an early response ends it."""
        conn = self.h11
        stream = exchange.stream
        event = first
        try:
            while True:
                if event is h11.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        await self._write(h11.InformationalResponse(status_code=100, headers=[]))
                    self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
                    data = await self.stream.receive_some(READ_SIZE)
                    self._timeout.deadline = math.inf
                    if not data:
                        self._client_gone(exchange)
                        raise trio.BrokenResourceError("client closed during the upload")
                    conn.receive_data(data)
                elif isinstance(event, h11.Data):
                    await stream.send_body(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    await stream.end()
                    return
                else:
                    raise AssertionError(event)
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:  # a malformed chunked body
                    self._client_gone(exchange)
                    raise trio.BrokenResourceError("malformed request body") from None
        except StreamError:
            # The agent reset the stream or answered early; its reply (or error)
            # is on the way. Drop the rest of the body, then close.
            await self._discard_body()

    async def _discard_body(self) -> None:
        await self._cycle_done.wait()
        await self._linger()

    async def _linger(self) -> NoReturn:
        """The answer is out but the client is still sending: end our side
        (FIN after the answer), read and drop what still comes (up to LINGER
        seconds, constant memory), then close."""
        with trio.move_on_after(LINGER):
            async with self._send_lock:
                await self.stream.send_eof()
            while await self.stream.receive_some(READ_SIZE):
                pass
        raise trio.BrokenResourceError("closed after an early answer")

    async def _answer_early(self, reply: Reply, *, close: bool = False) -> None:
        """Answer without the agent; keep the connection only if no body is pending."""
        close = close or not isinstance(self.h11.next_event(), h11.EndOfMessage)
        self._exchange = None
        await self._reply(reply, close=close)
        if close:
            await self._linger()
        self.h11.start_next_cycle()

    def _client_gone(self, exchange: _InFlight) -> None:
        exchange.stream.reset(_codes.H2_CANCEL)
        exchange.scope.cancel()

    def abandon(self) -> None:
        """Connection over: whatever is in flight is reset."""
        ex = self._exchange
        if ex is not None and not ex.done:
            self._client_gone(ex)

    # -- the relay (one task per request) -------------------------------------
    async def _relay(self, exchange: _InFlight) -> None:
        stream = exchange.stream
        try:
            with exchange.scope:
                await self._relay_response(exchange)
        finally:
            exchange.done = True
            if stream.local_ended and stream.remote_ended:
                stream.close()
            else:
                stream.reset(_codes.H2_CANCEL)
            self._cycle_done.set()

    async def _relay_response(self, exchange: _InFlight) -> None:
        stream = exchange.stream
        try:
            response = await stream.receive_response()
        except StreamError as exc:
            await self._reply(stream_failure(exc, exchange.name), close=not stream.local_ended)
            self._finish_cycle()
            return
        status = response.status
        invalid = bad_status(status, exchange.name)
        if invalid is not None:
            await self._reply(invalid, close=True)
            self._abort()
            return
        head = h11.Response(
            status_code=status,
            headers=clean_headers(response.headers),
            reason=_REASONS.get(status, b""),
        )
        try:
            if response.end_stream:
                await self._write(head, h11.EndOfMessage())
            else:
                chunk = await stream.read()
                if chunk is None:
                    await self._write(head, h11.EndOfMessage())
                else:
                    await self._write(head, h11.Data(data=chunk))
                    while (chunk := await stream.read()) is not None:
                        await self._write(h11.Data(data=chunk))
                    await self._write(h11.EndOfMessage())
        except StreamError as exc:
            log.info("agent %r: response aborted mid-body: %s", exchange.name, exc)
            self._abort()
            return
        except h11.LocalProtocolError as exc:
            # The agent's response contradicts itself (e.g. more or less body than
            # its Content-Length): the client must not take it as complete.
            log.info("agent %r: bad response framing: %s", exchange.name, exc)
            self._abort()
            return
        self._finish_cycle()

    def _finish_cycle(self) -> None:
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
        elif conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self._abort()

    def _abort(self) -> None:
        """Close the connection now (no final chunk: a truncated body stays visible)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
